"""The annotator's pages and the researchers' pages: permissions, CSRF, submission through the
screen-side mapping, idempotency, refusals, escaping, query counts, sanitised guidelines."""
import itertools
import time

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse

from annotation import selectors, services
from annotation.forms import sign_started
from annotation.markdown import render_markdown
from annotation.models import Assignment, Batch, Guidelines, Judgment, Prompt
from policy.models import Checkpoint, GenerationJob, RLHFRound
from rewards.models import RewardModelRun
from webapp import dashboard

XSS_SCRIPT = "<script>window.__xss=1</script>"
XSS_IMG = '<img src=x onerror="window.__xss=1">'
SAFE = services.SafetyLabels(a_safe=True, b_safe=True)


def login(client: Client, user: User) -> Client:
    client.force_login(user)
    return client


def lease(user: User, *, order: str | None = None) -> Assignment:
    assignment = services.assignment_lease_next(annotator=user)
    assert assignment is not None
    if order:
        Assignment.objects.filter(pk=assignment.pk).update(displayed_order=order)
        assignment.refresh_from_db()
    return assignment


def payload(**overrides) -> dict:
    data = {"side": "left", "strength": "2", "idempotency_key": "key-1", "note": ""}
    data.update(overrides)
    return {k: v for k, v in data.items() if v is not None}


def assignment_url(assignment: Assignment, name: str = "assignment") -> str:
    return reverse(f"annotation:{name}", args=[assignment.pk])


@pytest.fixture
def researcher(make_user):
    return make_user("res", role="researcher")


# --- who may see what -------------------------------------------------------------------------

@pytest.mark.django_db
class TestPermissions:
    @pytest.mark.parametrize("name", ["annotation:home", "annotation:queue", "annotation:prompt_new", "dashboard", "jobs"])
    def test_anonymous_is_sent_to_login(self, client, name):
        response = client.get(reverse(name))
        assert response.status_code == 302
        assert response["Location"].startswith(reverse("login"))

    def test_anonymous_cannot_open_an_assignment(self, client, make_comparison, annotator):
        make_comparison()
        assignment = lease(annotator)
        response = client.get(assignment_url(assignment))
        assert response.status_code == 302 and response["Location"].startswith(reverse("login"))

    def test_anonymous_jobs_json_is_401(self, client):
        assert client.get(reverse("jobs-status")).status_code == 401

    def test_another_annotators_assignment_is_404(self, client, make_comparison, annotator, other_annotator):
        make_comparison()
        theirs = lease(other_annotator)
        login(client, annotator)
        assert client.get(assignment_url(theirs)).status_code == 404
        assert client.post(assignment_url(theirs), payload()).status_code == 404
        assert client.post(assignment_url(theirs, "skip")).status_code == 404
        assert client.get(assignment_url(theirs, "submitted")).status_code == 404
        assert client.post(assignment_url(theirs, "continue"), {"text": "hi"}).status_code == 404
        assert not Judgment.objects.exists()
        theirs.refresh_from_db()
        assert theirs.status == Assignment.Status.LEASED

    def test_another_annotators_judgment_cannot_be_continued(self, client, make_comparison, annotator, other_annotator):
        make_comparison()
        theirs = lease(other_annotator)
        services.judgment_submit(assignment=theirs, annotator=other_annotator, chosen="A", strength=1, safety=SAFE)
        login(client, annotator)
        assert client.post(assignment_url(theirs, "continue"), {"text": "next?"}).status_code == 404
        assert not Prompt.objects.filter(source=Prompt.Source.CONTINUATION).exists()

    def test_own_assignment_renders(self, client, make_comparison, annotator):
        make_comparison(text="What is two plus two?", a="Four.", b="Five.")
        assignment = lease(annotator)
        response = login(client, annotator).get(assignment_url(assignment))
        assert response.status_code == 200
        assert "What is two plus two?" in response.content.decode()

    @pytest.mark.parametrize("name", ["dashboard", "jobs"])
    def test_annotators_cannot_see_research_pages(self, client, annotator, name):
        assert login(client, annotator).get(reverse(name)).status_code == 403

    def test_annotators_cannot_read_jobs_json(self, client, annotator):
        response = login(client, annotator).get(reverse("jobs-status"))
        assert response.status_code == 403
        assert "jobs" not in response.json()

    def test_users_without_a_role_cannot_annotate(self, client, make_user, make_comparison):
        nobody = make_user("nobody", role="none")
        make_comparison()
        login(client, nobody)
        assert client.get(reverse("annotation:queue")).status_code == 403
        assert client.post(reverse("annotation:next")).status_code == 403
        assert not Assignment.objects.exists()

    def test_home_sends_researchers_to_the_dashboard(self, client, researcher, annotator):
        assert login(client, researcher).get(reverse("annotation:home")).url == reverse("dashboard")
        assert login(Client(), annotator).get(reverse("annotation:home")).status_code == 200

    def test_researcher_and_admin_see_research_pages(self, client, researcher, admin_user):
        for user in (researcher, admin_user):
            c = login(Client(), user)
            assert c.get(reverse("dashboard")).status_code == 200
            assert c.get(reverse("jobs")).status_code == 200
            assert c.get(reverse("jobs-status")).status_code == 200


# --- CSRF -------------------------------------------------------------------------------------

@pytest.mark.django_db
class TestCsrf:
    def forms(self, make_comparison, annotator):
        make_comparison()
        assignment = lease(annotator)
        done = make_comparison()
        done_assignment = Assignment.objects.create(comparison=done, annotator=annotator, displayed_order="AB",
                                                    leased_at=assignment.leased_at)
        services.judgment_submit(assignment=done_assignment, annotator=annotator, chosen="B", strength=0, safety=SAFE)
        return [
            (reverse("annotation:next"), {}),
            (assignment_url(assignment), payload()),
            (assignment_url(assignment, "skip"), {}),
            (assignment_url(done_assignment, "continue"), {"text": "And then?"}),
            (reverse("annotation:prompt_new"), {"text": "A fresh prompt"}),
            (reverse("logout"), {}),
        ]

    def test_every_form_refuses_a_post_without_the_token(self, make_comparison, annotator):
        forms = self.forms(make_comparison, annotator)
        client = login(Client(enforce_csrf_checks=True), annotator)

        def state():
            return (Judgment.objects.count(), Prompt.objects.count(),
                    sorted(Assignment.objects.values_list("id", "status")))

        before = state()
        for url, data in forms:
            assert client.post(url, data).status_code == 403, url
        assert state() == before
        assert "_auth_user_id" in client.session  # the logout form was refused too

    def test_with_the_token_the_form_works(self, make_comparison, annotator):
        make_comparison()
        client = login(Client(enforce_csrf_checks=True), annotator)
        page = client.get(reverse("annotation:queue"))
        token = page.cookies["csrftoken"].value if "csrftoken" in page.cookies else client.cookies["csrftoken"].value
        response = client.post(reverse("annotation:next"), {"csrfmiddlewaretoken": token})
        assert response.status_code == 302 and Assignment.objects.filter(annotator=annotator).exists()


# --- submitting -------------------------------------------------------------------------------

@pytest.mark.django_db
class TestSubmit:
    @pytest.mark.parametrize(
        "order, side, left_unsafe, right_unsafe, chosen, a_safe, b_safe",
        [
            ("AB", "left", False, True, "A", True, False),
            ("AB", "right", True, False, "B", False, True),
            ("BA", "left", False, True, "B", False, True),  # left shows response_b
            ("BA", "right", True, False, "A", True, False),
            ("BA", "left", True, True, "B", False, False),
        ],
    )
    def test_screen_sides_map_to_response_a_b(self, client, make_comparison, annotator, order, side, left_unsafe,
                                              right_unsafe, chosen, a_safe, b_safe):
        make_comparison()
        assignment = lease(annotator, order=order)
        data = payload(side=side, strength="3", left_unsafe="on" if left_unsafe else None,
                       right_unsafe="on" if right_unsafe else None, harm_categories=["violence", "hate"],
                       note="Borderline.", seconds_spent="12.5")
        response = login(client, annotator).post(assignment_url(assignment), data)
        assert response.status_code == 302 and response["Location"] == assignment_url(assignment, "submitted")
        judgment = Judgment.objects.get()
        assert (judgment.chosen, judgment.strength, judgment.a_safe, judgment.b_safe) == (chosen, 3, a_safe, b_safe)
        assert judgment.harm_categories == ["violence", "hate"] and judgment.note == "Borderline."
        assert judgment.seconds_spent == 12.5 and judgment.idempotency_key == "key-1"

    def test_screen_label_for_each_response_follows_displayed_order(self, client, make_comparison, annotator):
        make_comparison(a="I am response_a.", b="I am response_b.")
        assignment = lease(annotator, order="BA")
        html = login(client, annotator).get(assignment_url(assignment)).content.decode()
        left = html.index('id="response-left"')
        right = html.index('id="response-right"')
        assert left < html.index("I am response_b.") < right < html.index("I am response_a.")

    def test_replayed_submission_makes_one_judgment(self, client, make_comparison, annotator):
        make_comparison()
        make_comparison()
        assignment = lease(annotator)
        login(client, annotator)
        first = client.post(assignment_url(assignment), payload(side="right", strength="1"))
        second = client.post(assignment_url(assignment), payload(side="right", strength="1"))
        assert first.status_code == second.status_code == 302
        assert first["Location"] == second["Location"] == assignment_url(assignment, "submitted")
        # A replay with a fresh key and other answers still cannot add a second judgment.
        client.post(assignment_url(assignment), payload(side="left", strength="3", idempotency_key="key-2"))
        judgment = Judgment.objects.get()
        right_is = "B" if assignment.displayed_order == "AB" else "A"
        assert (judgment.chosen, judgment.strength, judgment.idempotency_key) == (right_is, 1, "key-1")

    def test_each_render_gets_a_fresh_idempotency_key(self, client, make_comparison, annotator):
        make_comparison()
        assignment = lease(annotator)
        login(client, annotator)
        keys = {client.get(assignment_url(assignment)).context["form"].initial["idempotency_key"] for _ in range(3)}
        assert len(keys) == 3

    @pytest.mark.parametrize(
        "overrides, message",
        [
            ({"strength": "7"}, "Select a valid choice"),
            ({"strength": "-1"}, "Select a valid choice"),
            ({"strength": "better"}, "Select a valid choice"),
            ({"strength": None}, "Say how much better"),
            ({"side": "middle"}, "Select a valid choice"),
            ({"side": None}, "Choose the better response"),
            ({"left_unsafe": "maybe"}, "Mark each response safe or unsafe"),
            ({"harm_categories": ["violence", "bananas"]}, "Select a valid choice"),
            ({"seconds_spent": "-3"}, "greater than or equal to 0"),
            ({"idempotency_key": None}, "required"),
            ({"note": "x" * (services.MAX_NOTE_LENGTH + 1)}, "at most"),
        ],
    )
    def test_invalid_input_is_a_form_error_and_writes_nothing(self, client, make_comparison, annotator, overrides,
                                                             message):
        make_comparison()
        assignment = lease(annotator)
        response = login(client, annotator).post(assignment_url(assignment), payload(**overrides))
        assert response.status_code == 400
        assert message in response.content.decode()
        assert "Not saved." in response.content.decode()
        assert not Judgment.objects.exists()
        assignment.refresh_from_db()
        assert assignment.status == Assignment.Status.LEASED and assignment.comparison.batch is None

    def test_a_batch_frozen_while_the_page_is_open_still_saves(self, client, make_comparison, annotator):
        make_comparison()
        assignment = lease(annotator)
        batch = services.batch_freeze(batch=services.batch_open_for())  # this week's batch, frozen early
        response = login(client, annotator).post(assignment_url(assignment), payload())
        assert response.status_code == 302 and response["Location"] == assignment_url(assignment, "submitted")
        judgment = Judgment.objects.get()
        assert judgment.assignment == assignment and judgment.comparison.batch.label == f"{batch.label}.2"
        assert batch.comparisons.count() == 0

    def test_a_lease_open_across_a_freeze_still_saves(self, client, make_comparison, annotator, other_annotator):
        comparison = make_comparison(overlap=2, text="Still there?", a="Yes.", b="No.")
        first = lease(other_annotator)
        services.judgment_submit(assignment=first, annotator=other_annotator, chosen="A", strength=2, safety=SAFE)
        assignment = lease(annotator, order="BA")
        login(client, annotator)
        page = client.get(assignment_url(assignment)).content.decode()
        batch = services.batch_freeze(batch=Batch.objects.get())
        response = client.post(assignment_url(assignment), payload(side="left", strength="3"))
        assert response.status_code == 302 and response["Location"] == assignment_url(assignment, "submitted")
        judgment = Judgment.objects.get(assignment=assignment)
        assert judgment.comparison.carried_from == comparison and judgment.comparison.batch.label == f"{batch.label}.2"
        assert judgment.chosen == "B" and judgment.strength == 3  # "left" was B: the screen order held
        assert "Still there?" in page and "You chose <strong>A (left)</strong>" in client.get(response["Location"]).content.decode()
        assert Judgment.objects.filter(comparison=comparison).count() == 1
        batch.refresh_from_db()
        assert selectors.batch_content_hash(batch=batch) == batch.content_hash

    def test_without_js_the_signed_render_time_is_the_timer(self, client, make_comparison, annotator):
        make_comparison()
        assignment = lease(annotator)
        started = sign_started(assignment_id=assignment.pk, at=time.time() - 30)
        login(client, annotator).post(assignment_url(assignment), payload(started=started))
        assert 29 <= Judgment.objects.get().seconds_spent <= 60

    def test_a_tampered_render_time_is_ignored(self, client, make_comparison, annotator):
        make_comparison()
        assignment = lease(annotator)
        forged = sign_started(assignment_id=assignment.pk, at=time.time() - 30)[:-2] + "xx"
        login(client, annotator).post(assignment_url(assignment), payload(started=forged))
        assert Judgment.objects.get().seconds_spent is None

    def test_skip_moves_on_to_the_next_comparison(self, client, make_comparison, annotator):
        make_comparison(), make_comparison()
        assignment = lease(annotator)
        response = login(client, annotator).post(assignment_url(assignment, "skip"))
        assignment.refresh_from_db()
        nxt = Assignment.objects.get(status=Assignment.Status.LEASED)
        assert assignment.status == Assignment.Status.SKIPPED
        assert response["Location"] == assignment_url(nxt) and nxt.comparison_id != assignment.comparison_id

    def test_opening_a_submitted_assignment_shows_the_submitted_page(self, client, make_comparison, annotator):
        make_comparison()
        assignment = lease(annotator)
        services.judgment_submit(assignment=assignment, annotator=annotator, chosen="A", strength=2, safety=SAFE)
        response = login(client, annotator).get(assignment_url(assignment))
        assert response["Location"] == assignment_url(assignment, "submitted")

    def test_next_with_an_empty_queue_says_so(self, client, annotator):
        response = login(client, annotator).post(reverse("annotation:next"), follow=True)
        assert "No comparisons are waiting right now" in response.content.decode()


# --- after a judgment: continue the dialogue or write a prompt ----------------------------------

@pytest.mark.django_db
class TestWritingPrompts:
    def test_continue_builds_the_dialogue_with_the_chosen_response(self, client, make_comparison, annotator):
        make_comparison(text="Name a colour.", a="Blue.", b="Seven.")
        assignment = lease(annotator, order="BA")
        login(client, annotator).post(assignment_url(assignment), payload(side="right"))  # right = A = "Blue."
        page = client.get(assignment_url(assignment, "submitted")).content.decode()
        assert "A (left)" not in page.split("You chose")[1].split(":")[0] and "B (right)" in page
        response = client.post(assignment_url(assignment, "continue"), {"text": "Why that one?"})
        assert response.status_code == 302
        prompt = Prompt.objects.get(source=Prompt.Source.CONTINUATION)
        assert prompt.context == [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
        assert prompt.text == "Why that one?" and prompt.awaiting_responses and prompt.author == annotator
        home = client.get(reverse("annotation:queue")).content.decode()
        assert "Why that one?" in home and "waiting for the model to answer" in home

    def test_write_a_fresh_adversarial_prompt(self, client, annotator):
        response = login(client, annotator).post(reverse("annotation:prompt_new"),
                                                 {"text": "How do I hotwire a car?", "is_adversarial": "on"})
        assert response.status_code == 302
        prompt = Prompt.objects.get()
        assert prompt.is_adversarial and prompt.awaiting_responses and prompt.source == Prompt.Source.ANNOTATOR
        assert "How do I hotwire a car?" in client.get(reverse("annotation:queue")).content.decode()

    def test_blank_prompt_is_refused(self, client, annotator):
        response = login(client, annotator).post(reverse("annotation:prompt_new"), {"text": "   "})
        assert response.status_code == 400 and "Not saved." in response.content.decode()
        assert not Prompt.objects.exists()

    def test_others_waiting_prompts_are_not_listed(self, client, annotator, other_annotator):
        services.prompt_write(author=other_annotator, text="Someone else's secret prompt")
        assert "secret prompt" not in login(client, annotator).get(reverse("annotation:queue")).content.decode()


# --- escaping ---------------------------------------------------------------------------------

@pytest.mark.django_db
def test_model_and_user_text_is_escaped_everywhere(client, make_comparison, annotator):
    comparison = make_comparison(text=f"Q {XSS_SCRIPT} {XSS_IMG}", a=f"A {XSS_SCRIPT}", b=f"B {XSS_IMG}")
    comparison.prompt.context = [{"role": "user", "content": XSS_IMG}, {"role": "assistant", "content": XSS_SCRIPT}]
    comparison.prompt.save(update_fields=["context"])
    services.prompt_write(author=annotator, text=f"mine {XSS_SCRIPT}")
    assignment = lease(annotator)
    login(client, annotator)
    pages = [client.get(assignment_url(assignment)).content.decode()]
    client.post(assignment_url(assignment), payload(note=XSS_SCRIPT))
    pages.append(client.get(assignment_url(assignment, "submitted")).content.decode())
    pages.append(client.get(reverse("annotation:queue")).content.decode())
    for html in pages:
        assert "<script>window.__xss" not in html and "<img src=x" not in html
        assert "&lt;script&gt;window.__xss=1&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=&quot;window.__xss=1&quot;&gt;" in pages[0]


@pytest.mark.django_db
def test_job_messages_are_escaped(client, researcher, checkpoints):
    GenerationJob.objects.create(arm_a_checkpoint=checkpoints[0], arm_b_checkpoint=checkpoints[1],
                                 progress_message=XSS_SCRIPT, status="failed", error=XSS_IMG)
    html = login(client, researcher).get(reverse("jobs")).content.decode()
    assert "<script>window.__xss" not in html and "<img src=x" not in html and "&lt;script&gt;" in html


# --- guidelines -------------------------------------------------------------------------------

def test_guidelines_markdown_is_sanitised():
    html = render_markdown(
        "# Title\n\n**bold** and `code`\n\n<script>alert(1)</script>\n\n<img src=x onerror=alert(1)>\n\n"
        '[bad](javascript:alert(1)) [good](https://example.org) <a href="https://x.org" onclick="alert(1)">raw</a>\n\n'
        "| a | b |\n|---|---|\n| 1 | 2 |\n"
    )
    assert "<h1>Title</h1>" in html and "<strong>bold</strong>" in html and "<code>code</code>" in html
    assert "<table>" in html and "<td>1</td>" in html
    assert "<script" not in html and "<img" not in html and "javascript:" not in html and "<a href=\"https://x.org\"" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # raw HTML is shown as text, not run
    assert '<a href="https://example.org" rel="noopener noreferrer">good</a>' in html


@pytest.mark.django_db
def test_guidelines_panel_shows_the_sanitised_html(client, make_comparison, annotator):
    Guidelines.objects.create(body_markdown=f"Pick the **better** one.\n\n{XSS_SCRIPT}")
    make_comparison()
    html = login(client, annotator).get(assignment_url(lease(annotator))).content.decode()
    assert "Pick the <strong>better</strong> one." in html
    assert "<script>window.__xss" not in html


# --- query counts -----------------------------------------------------------------------------

@pytest.mark.django_db
class TestQueryCounts:
    def test_comparison_page(self, client, make_comparison, annotator, django_assert_num_queries):
        Guidelines.objects.create(body_markdown="Be careful.")
        comparison = make_comparison()
        comparison.prompt.context = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        comparison.prompt.save(update_fields=["context"])
        assignment = lease(annotator)
        login(client, annotator)
        # session, user, roles, the assignment with prompt + both responses + batch, guidelines
        with django_assert_num_queries(5):
            assert client.get(assignment_url(assignment)).status_code == 200

    @pytest.mark.parametrize("n_waiting", [1, 6])
    def test_home_page_does_not_grow_with_waiting_prompts(self, client, annotator, n_waiting,
                                                          django_assert_num_queries):
        for i in range(n_waiting):
            services.prompt_write(author=annotator, text=f"Prompt {i}")
        login(client, annotator)
        # session, user, roles, done today, done in this batch, waiting prompts
        with django_assert_num_queries(6):
            assert client.get(reverse("annotation:queue")).status_code == 200

    def test_submit(self, client, make_comparison, annotator, django_assert_max_num_queries):
        make_comparison()
        assignment = lease(annotator)
        login(client, annotator)
        with django_assert_max_num_queries(16):
            assert client.post(assignment_url(assignment), payload()).status_code == 302

    @pytest.mark.parametrize("n_jobs", [1, 4])
    def test_jobs_json_does_not_grow_with_jobs(self, client, researcher, checkpoints, n_jobs,
                                               django_assert_num_queries):
        for i in range(n_jobs):
            GenerationJob.objects.create(arm_a_checkpoint=checkpoints[0], arm_b_checkpoint=checkpoints[1],
                                         arm_b_temperature=1.0 + i)
        login(client, researcher)
        # session, user, roles, one query per job kind (four kinds)
        with django_assert_num_queries(7):
            assert len(client.get(reverse("jobs-status")).json()["jobs"]) == n_jobs


# --- dashboard and jobs -----------------------------------------------------------------------

def _independent_agreement(choices_per_comparison):
    pairs = agree = 0
    for choices in choices_per_comparison:
        for x, y in itertools.combinations(choices, 2):
            pairs += 1
            agree += x == y
    return agree, pairs


@pytest.mark.django_db
def test_dashboard_agreement_counts_pairs_of_judgments(client, make_comparison, make_user, researcher):
    annotators = [make_user(f"a{i}") for i in range(4)]
    plan = [("A", "A", "B", "A"), ("B", "B"), ("A",)]  # a single judgment has no pair: left out
    for choices in plan:
        make_comparison(overlap=len(choices))
        for user, chosen in zip(annotators, choices):
            a = lease(user)
            services.judgment_submit(assignment=a, annotator=user, chosen=chosen, strength=1, safety=SAFE)
    overall, by_batch = dashboard.agreement_by_batch()
    expected = _independent_agreement(plan)
    assert (overall.agreeing_pairs, overall.pairs, overall.comparisons) == (*expected, 2) == (4, 7, 2)
    assert list(by_batch) == [Batch.objects.get().label]
    html = login(client, researcher).get(reverse("dashboard")).content.decode()
    assert "57%" in html and "4 of 7 pairs" in html
    assert ">7<" in html  # judgments in the batch


@pytest.mark.django_db
def test_dashboard_throughput_and_batches(client, make_comparison, annotator, researcher,
                                          django_assert_num_queries):
    for _ in range(3):
        make_comparison()
        services.judgment_submit(assignment=lease(annotator), annotator=annotator, chosen="A", strength=0, safety=SAFE)
    batch = services.batch_freeze(batch=Batch.objects.get())
    login(client, researcher)
    # session, user, roles, agreement, batches, throughput
    with django_assert_num_queries(6):
        response = client.get(reverse("dashboard"))
    assert response.context["throughput"]["today"] == 3 and response.context["throughput"]["week"] == 3
    html = response.content.decode()
    assert batch.label in html and batch.content_hash[:14] in html and "Frozen" in html


@pytest.mark.django_db
def test_jobs_json_reports_progress_of_every_kind(client, researcher, checkpoints):
    gen = GenerationJob.objects.create(arm_a_checkpoint=checkpoints[0], arm_b_checkpoint=checkpoints[1],
                                       status="running", progress=0.25, progress_message="12 of 48 prompts")
    rm = RewardModelRun.objects.create(kind="helpfulness", base_checkpoint=checkpoints[0], manifest_sha256="a" * 64,
                                       status="succeeded", progress=1.0, artifact_path="/x")
    srm = RewardModelRun.objects.create(kind="safety", base_checkpoint=checkpoints[0], manifest_sha256="b" * 64,
                                        status="failed", error="out of memory")
    rnd = RLHFRound.objects.create(policy_in=checkpoints[0], lineage_root=checkpoints[0], helpfulness_rm=rm,
                                   safety_rm=srm, status="queued")
    login(client, researcher)
    data = client.get(reverse("jobs-status")).json()
    by_key = {job["key"]: job for job in data["jobs"]}
    assert by_key[f"generation-{gen.pk}"] == {
        "key": f"generation-{gen.pk}", "status": "running", "status_display": "Running", "progress": 0.25,
        "message": "12 of 48 prompts", "error": "", "active": True}
    assert by_key[f"reward-{rm.pk}"]["progress"] == 1.0 and not by_key[f"reward-{rm.pk}"]["active"]
    assert by_key[f"reward-{srm.pk}"]["error"] == "out of memory"
    assert by_key[f"round-{rnd.pk}"]["status"] == "queued" and data["any_active"] is True
    page = client.get(reverse("jobs")).content.decode()
    assert f'data-job-key="generation-{gen.pk}"' in page and 'value="0.2500"' in page
    assert "annotation/jobs.js" in page
    gen.progress = 0.5
    gen.save(update_fields=["progress"])
    assert {j["key"]: j for j in client.get(reverse("jobs-status")).json()["jobs"]}[f"generation-{gen.pk}"]["progress"] == 0.5
    assert Checkpoint.objects.count() == 2
