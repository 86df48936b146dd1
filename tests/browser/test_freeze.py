"""Freezing loses no work, in real browsers: an annotator has a comparison on screen while an admin
freezes its batch from the admin's action; the annotator submits from the keyboard, and the judgment
is saved into the week's open batch while the frozen batch keeps the hash of its content."""
import pytest
from django.utils import timezone

from annotation import selectors, services
from annotation.models import Assignment, Batch, Judgment
from tests.browser.conftest import log_in

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

PASSWORD = "pw-for-tests-1"  # make_user's default


def test_a_comparison_on_screen_survives_the_freeze_of_its_batch(chromium, live_server, page, make_user,
                                                                  make_comparison):
    first, annotator = make_user("first"), make_user("kbd")
    make_user("boss", role="admin")
    comparison = make_comparison(overlap=2, text="Is the work kept?", a="Yes, it is.", b="It is lost.")
    earlier = services.assignment_lease_next(annotator=first)
    services.judgment_submit(assignment=earlier, annotator=first, chosen="B", strength=1,
                             safety=services.SafetyLabels(a_safe=True, b_safe=True))
    batch = Batch.objects.get()
    # The lease the queue will hand out, with a known screen order (it is random otherwise).
    assignment = Assignment.objects.create(comparison=comparison, annotator=annotator, displayed_order="AB",
                                           leased_at=timezone.now())

    log_in(page, "kbd", PASSWORD)
    page.goto(f"/assignments/{assignment.pk}/")
    assert page.inner_text("#prompt-text") == "Is the work kept?"
    page.keyboard.press("a")  # the left-hand response is better
    page.keyboard.press("4")  # significantly: strength 3

    admin = chromium.new_context(base_url=live_server.url).new_page()
    try:
        log_in(admin, "boss", PASSWORD)
        admin.goto("/admin/annotation/batch/")
        admin.check(f"input[name=_selected_action][value='{batch.pk}']")
        admin.select_option("select[name=action]", "freeze_selected")
        admin.click("button[name=index]")
        assert f"Froze batch {batch.label}: 1 comparisons" in admin.inner_text(".messagelist")
        assert "1 not fully judged: carried over" in admin.inner_text(".messagelist")
    finally:
        admin.context.close()
    batch.refresh_from_db()
    assert batch.is_frozen

    page.keyboard.press("Enter")
    page.wait_for_url(f"**/assignments/{assignment.pk}/submitted/")
    assert "You chose A (left)" in page.inner_text("#judgment-summary")

    judgment = Judgment.objects.select_related("comparison__batch").get(assignment=assignment)
    assert (judgment.chosen, judgment.strength) == ("A", 3)
    assert judgment.comparison.carried_from_id == comparison.pk
    assert judgment.comparison.batch.label == f"{batch.label}.2" and not judgment.comparison.batch.is_frozen
    assert list(batch.comparisons.values_list("judgments", flat=True)) == [earlier.judgment.pk]
    assert selectors.batch_content_hash(batch=batch) == batch.content_hash
