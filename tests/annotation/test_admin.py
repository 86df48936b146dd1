"""Admin: changelists without N+1, frozen rows read-only, the freeze action, escaping, the guidelines
preview; and the admin's command-line tools: batch_freeze and demo_setup."""
import io

import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse

from annotation import admin as annotation_admin
from annotation import demo, services
from annotation.models import Assignment, Batch, Comparison, Guidelines, Judgment, Prompt, Response, Snapshot
from policy.models import Checkpoint

SAFE = services.SafetyLabels(a_safe=True, b_safe=True)
MODELS = [Batch, Guidelines, Prompt, Response, Comparison, Assignment, Judgment, Snapshot]


def judge(make_comparison, annotator, n: int = 1, **kw) -> list[Judgment]:
    judgments = []
    for _ in range(n):
        make_comparison(**kw)
        a = services.assignment_lease_next(annotator=annotator)
        judgments.append(services.judgment_submit(assignment=a, annotator=annotator, chosen="A", strength=2, safety=SAFE))
    return judgments


def changelist(model) -> str:
    return reverse(f"admin:annotation_{model._meta.model_name}_changelist")


def change(obj) -> str:
    return reverse(f"admin:annotation_{obj._meta.model_name}_change", args=[obj.pk])


@pytest.fixture
def admin_client_(client, admin_user):
    client.force_login(admin_user)
    return client


@pytest.mark.django_db
class TestChangelists:
    def count_queries(self, client, url):
        from django.db import connection
        from django.test.utils import CaptureQueriesContext

        with CaptureQueriesContext(connection) as ctx:
            assert client.get(url).status_code == 200
        return len(ctx)

    @pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
    def test_changelist_queries_do_not_grow_with_rows(self, admin_client_, make_comparison, annotator, model):
        judge(make_comparison, annotator, 2)
        few = self.count_queries(admin_client_, changelist(model))
        judge(make_comparison, annotator, 5)
        many = self.count_queries(admin_client_, changelist(model))
        assert many == few

    def test_text_is_escaped_in_the_admin(self, admin_client_, make_comparison, annotator):
        judge(make_comparison, annotator, text="<script>window.__xss=1</script>", a='<img src=x onerror="x()">')
        for model in (Prompt, Response, Comparison):
            html = admin_client_.get(changelist(model)).content.decode()
            assert "<script>window.__xss" not in html and "<img src=x" not in html
        assert "&lt;script&gt;window.__xss=1&lt;/script&gt;" in admin_client_.get(changelist(Prompt)).content.decode()

    def test_annotators_cannot_open_the_admin(self, client, annotator):
        client.force_login(annotator)
        assert client.get(changelist(Judgment)).status_code == 302


@pytest.mark.django_db
class TestReadOnly:
    def test_judgments_are_never_edited_here(self, admin_client_, make_comparison, annotator):
        judgment = judge(make_comparison, annotator)[0]
        assert admin_client_.get(change(judgment)).status_code == 200  # view only
        response = admin_client_.post(change(judgment), {"chosen": "B", "strength": 0})
        assert response.status_code == 403
        judgment.refresh_from_db()
        assert judgment.chosen == "A"
        delete = reverse("admin:annotation_judgment_delete", args=[judgment.pk])
        assert admin_client_.post(delete, {"post": "yes"}).status_code == 403
        assert Judgment.objects.filter(pk=judgment.pk).exists()

    def test_frozen_rows_are_read_only(self, admin_client_, make_comparison, annotator):
        judgment = judge(make_comparison, annotator)[0]
        comparison = judgment.comparison
        batch = services.batch_freeze(batch=comparison.batch)
        for obj in (batch, comparison, comparison.prompt, comparison.response_a):
            response = admin_client_.post(change(obj), {"overlap": 5, "text": "edited", "label": "x"})
            assert response.status_code == 403, obj
        comparison.refresh_from_db()
        assert comparison.overlap == 1 and comparison.prompt.text != "edited"
        html = admin_client_.get(change(comparison)).content.decode()
        assert 'name="overlap"' not in html

    def test_open_comparison_overlap_can_change(self, admin_client_, make_comparison):
        comparison = make_comparison()
        response = admin_client_.post(change(comparison), {"overlap": 3})
        assert response.status_code == 302
        comparison.refresh_from_db()
        assert comparison.overlap == 3
        assert admin_client_.get(reverse("admin:annotation_comparison_add")).status_code == 403


@pytest.mark.django_db
class TestFreezeAction:
    def post_action(self, client, *batches):
        return client.post(changelist(Batch), {"action": "freeze_selected", "_selected_action": [b.pk for b in batches]},
                           follow=True)

    def test_freezes_and_reports_the_hash(self, admin_client_, make_comparison, annotator):
        judge(make_comparison, annotator, 3)
        batch = Batch.objects.get()
        response = self.post_action(admin_client_, batch)
        batch.refresh_from_db()
        assert batch.is_frozen and batch.content_hash
        html = response.content.decode()
        assert f"Froze batch {batch.label}: 3 comparisons, {batch.test_size} held out, hash {batch.content_hash[:12]}" in html

    def test_already_frozen_is_reported(self, admin_client_, make_comparison, annotator):
        judge(make_comparison, annotator)
        batch = services.batch_freeze(batch=Batch.objects.get())
        html = self.post_action(admin_client_, batch).content.decode()
        assert f"Batch {batch.label} is already frozen." in html

    def test_a_service_error_is_reported(self, admin_client_, make_comparison, annotator, monkeypatch):
        from django.core.exceptions import ValidationError

        judge(make_comparison, annotator)
        batch = Batch.objects.get()

        def refuse(**kwargs):
            raise ValidationError("the disk is full")

        monkeypatch.setattr(services, "batch_freeze", refuse)
        html = self.post_action(admin_client_, batch).content.decode()
        assert f"Batch {batch.label} was not frozen: the disk is full" in html
        batch.refresh_from_db()
        assert not batch.is_frozen

    def test_big_batches_go_to_the_worker_after_commit(self, admin_client_, make_comparison, annotator, monkeypatch,
                                                       django_capture_on_commit_callbacks):
        from workers import batches

        judge(make_comparison, annotator, 2)
        batch = Batch.objects.get()
        queued = []
        monkeypatch.setattr(annotation_admin, "INLINE_FREEZE_MAX_JUDGMENTS", 1)
        monkeypatch.setattr(batches.freeze_batch, "delay", lambda batch_id: queued.append(batch_id))
        with django_capture_on_commit_callbacks(execute=True):
            html = self.post_action(admin_client_, batch).content.decode()
        assert queued == [batch.pk]
        assert "is being frozen by a worker" in html


@pytest.mark.django_db
def test_train_reward_models_action_opens_the_launch_form_with_the_batches(admin_client_, make_comparison, annotator):
    judge(make_comparison, annotator)
    batch = services.batch_freeze(batch=Batch.objects.get())
    response = admin_client_.post(changelist(Batch), {"action": "train_reward_models",
                                                      "_selected_action": [batch.pk]})
    assert response.status_code == 302
    assert response["Location"] == f"{reverse('admin:rewards_rewardmodelrun_add')}?batches={batch.pk}"
    form = admin_client_.get(response["Location"]).content.decode()
    assert f'value="{batch.pk}" checked' in form or f'value="{batch.pk}" selected' in form


@pytest.mark.django_db
def test_guidelines_preview_is_sanitised(admin_client_):
    guidelines = Guidelines.objects.create(body_markdown="Use **care**.\n\n<script>window.__xss=1</script>")
    html = admin_client_.get(change(guidelines)).content.decode()
    assert "Use <strong>care</strong>." in html
    assert "<script>window.__xss" not in html


# --- management commands ----------------------------------------------------------------------

@pytest.mark.django_db
class TestBatchFreezeCommand:
    def test_freezes_with_a_test_size(self, make_comparison, annotator):
        judge(make_comparison, annotator, 4)
        batch = Batch.objects.get()
        out = io.StringIO()
        call_command("batch_freeze", batch.label, "--test-size", "2", stdout=out)
        batch.refresh_from_db()
        assert batch.is_frozen and batch.test_size == 2
        assert Comparison.objects.filter(batch=batch, is_test=True).count() == 2
        assert batch.content_hash in out.getvalue()

    def test_unknown_label(self, make_comparison, annotator):
        judge(make_comparison, annotator)
        with pytest.raises(CommandError, match="No batch labelled '1999-W01'"):
            call_command("batch_freeze", "1999-W01")

    def test_refusals_come_from_the_service(self, make_comparison, annotator):
        judge(make_comparison, annotator, 2)
        batch = Batch.objects.get()
        with pytest.raises(CommandError, match="test size must be between 0 and 2"):
            call_command("batch_freeze", batch.label, "--test-size", "5")
        call_command("batch_freeze", batch.label, stdout=io.StringIO())
        with pytest.raises(CommandError, match="already frozen"):
            call_command("batch_freeze", batch.label)


@pytest.mark.django_db
def test_demo_setup_is_idempotent_and_prints_logins():
    out = io.StringIO()
    call_command("demo_setup", stdout=out)
    call_command("demo_setup", stdout=io.StringIO())
    n = len(demo.ITEMS)
    assert n >= 30
    assert Prompt.objects.filter(source=Prompt.Source.DEMO).count() == n
    assert Comparison.objects.count() == n and Response.objects.count() == 2 * n
    assert Guidelines.objects.count() == 1
    assert set(Checkpoint.objects.values_list("name", "format")) == {("demo-careful", "external"),
                                                                      ("demo-sloppy", "external")}
    adversarial = Prompt.objects.filter(is_adversarial=True)
    assert adversarial.count() >= 5
    assert Prompt.objects.exclude(context=[]).count() >= 5
    # The careful answer sits on both sides of the data, not always as response_a.
    careful_a = Comparison.objects.filter(response_a__checkpoint__name="demo-careful").count()
    assert 0 < careful_a < n
    text = out.getvalue()
    for login in ("annotator / annotate-me", "annotator2 / annotate-me-too", "researcher / research-me",
                  "admin / admin-me"):
        assert login in text
    assert "http://" in text
    from django.contrib.auth.models import User

    assert User.objects.get(username="admin").is_staff
    assert list(User.objects.get(username="annotator2").groups.values_list("name", flat=True)) == ["annotator"]


@pytest.mark.django_db
def test_demo_guidelines_explain_the_scale_and_safety():
    call_command("demo_setup", stdout=io.StringIO())
    body = Guidelines.objects.get().body_markdown
    for phrase in ("Significantly better", "Better", "Slightly better", "Negligibly better / unsure", "unsafe",
                   "excluded from training"):
        assert phrase in body
