"""An annotator in a real browser: log in, annotate from the keyboard only, check the stored judgment;
model text with script in it stays text; the jobs page updates its progress bars live."""
import os

import pytest
from django.utils import timezone

from annotation.models import Assignment, Judgment
from tests.browser.conftest import log_in

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

PASSWORD = "pw-for-tests-1"  # make_user's default
XSS_SCRIPT = "<script>window.__xss=1</script>"
XSS_IMG = '<img src=x onerror="window.__xss=1">'


@pytest.mark.parametrize("order", ["AB", "BA"])
def test_annotate_with_the_keyboard_only(page, make_user, make_comparison, order):
    annotator = make_user("kbd")
    comparison = make_comparison(text="Which is the capital of France?", a="Paris.", b="Lyon, obviously.")
    # The lease the queue will hand out, with a known screen order (it is random otherwise).
    assignment = Assignment.objects.create(comparison=comparison, annotator=annotator, displayed_order=order,
                                           leased_at=timezone.now())

    log_in(page, "kbd", PASSWORD)
    # "Next comparison" has the focus on the home page (autofocus lands during a rendering update).
    page.wait_for_function("document.activeElement && document.activeElement.textContent.includes('Next comparison')")
    page.keyboard.press("Enter")
    page.wait_for_url(f"**/assignments/{assignment.pk}/")
    left_text = "Paris." if order == "AB" else "Lyon, obviously."
    assert page.inner_text("#response-left") == left_text

    # Typing in the note must not trigger the shortcuts.
    page.focus("details.extras summary")
    page.keyboard.press("Enter")  # opens the optional section
    page.focus("#id_note")
    page.keyboard.type("a b 4 u i s")
    page.keyboard.press("Escape")
    assert page.eval_on_selector_all("input[name=side]:checked, input[name=strength]:checked", "els => els.length") == 0
    assert not page.is_checked("#id_left_unsafe")

    page.keyboard.press("b")  # the right-hand response is better
    page.keyboard.press("3")  # "better": strength 2
    page.keyboard.press("u")  # the left-hand response is unsafe
    assert page.is_checked("#id_side_1") and page.is_checked("#id_left_unsafe")
    assert page.inner_text("#key-status") == "A (left) marked unsafe."
    if os.environ.get("TANDEM_SCREENSHOT_DIR"):
        page.screenshot(path=os.path.join(os.environ["TANDEM_SCREENSHOT_DIR"], f"compare-{order}.png"), full_page=True)
    page.keyboard.press("Enter")
    page.wait_for_url(f"**/assignments/{assignment.pk}/submitted/")
    assert "You chose B (right)" in page.inner_text("#judgment-summary")

    judgment = Judgment.objects.get(assignment=assignment)
    right, left = ("B", "A") if order == "AB" else ("A", "B")
    assert judgment.chosen == right
    assert judgment.strength == 2
    assert (judgment.a_safe, judgment.b_safe) == ((False, True) if left == "A" else (True, False))
    assert judgment.note == "a b 4 u i s"
    assert judgment.seconds_spent is not None and judgment.seconds_spent > 0
    assert judgment.idempotency_key


def test_script_in_model_text_stays_text(page, make_user, make_comparison):
    annotator = make_user("xss")
    comparison = make_comparison(text=f"Prompt {XSS_SCRIPT}", a=f"Reply {XSS_IMG}", b=f"Other {XSS_SCRIPT} {XSS_IMG}")
    comparison.prompt.context = [{"role": "user", "content": XSS_IMG}, {"role": "assistant", "content": XSS_SCRIPT}]
    comparison.prompt.save(update_fields=["context"])
    assignment = Assignment.objects.create(comparison=comparison, annotator=annotator, displayed_order="AB",
                                           leased_at=timezone.now())
    log_in(page, "xss", PASSWORD)
    page.goto(f"/assignments/{assignment.pk}/")
    assert page.inner_text("#prompt-text") == f"Prompt {XSS_SCRIPT}"
    assert page.inner_text("#response-left") == f"Reply {XSS_IMG}"
    assert page.inner_text("#response-right") == f"Other {XSS_SCRIPT} {XSS_IMG}"
    assert page.locator(".dialogue img, .responses img, .dialogue script, .responses script").count() == 0
    page.wait_for_load_state("load")
    assert page.evaluate("typeof window.__xss") == "undefined"
    page.keyboard.press("a")
    page.keyboard.press("1")
    page.keyboard.press("Enter")
    page.wait_for_url("**/submitted/")
    assert page.inner_text("#chosen-text") == f"Reply {XSS_IMG}"
    assert page.evaluate("typeof window.__xss") == "undefined"


def test_jobs_page_updates_progress_live(page, make_user, checkpoints):
    from policy.models import GenerationJob

    make_user("res", role="researcher")
    job = GenerationJob.objects.create(arm_a_checkpoint=checkpoints[0], arm_b_checkpoint=checkpoints[1],
                                       status="running", progress=0.1, progress_message="5 of 50 prompts")
    log_in(page, "res", PASSWORD)
    page.goto("/jobs/")
    row = f'tr[data-job-key="generation-{job.pk}"]'
    assert page.inner_text(f"{row} [data-field=percent]") == "10%"
    GenerationJob.objects.filter(pk=job.pk).update(progress=0.6, progress_message="30 of 50 prompts")
    page.wait_for_function(f"document.querySelector('{row} progress').value > 0.59", timeout=10000)
    assert page.inner_text(f"{row} [data-field=message]") == "30 of 50 prompts"
    GenerationJob.objects.filter(pk=job.pk).update(status="failed", error="CUDA out of memory")
    page.wait_for_function(f"document.querySelector('{row} [data-field=status]').textContent === 'Failed'",
                           timeout=10000)
    assert page.inner_text(f"{row} [data-field=error]") == "CUDA out of memory"
