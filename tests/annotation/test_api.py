"""The annotation API: roles, own-rows-only querysets, allowlisted filters, judging with idempotency,
pushing comparisons, batches, checkpoints."""
import json

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from annotation import selectors, services
from annotation.exports import annotator_pseudonym
from annotation.models import Assignment, Batch, Comparison, Judgment, Prompt, Response
from annotation.services import SafetyLabels
from policy.models import Checkpoint
from tests.conftest import assert_imports_no_torch
from webapp.auth import api_token_issue


@pytest.fixture(autouse=True)
def _private_cache(private_cache):
    pass


@pytest.fixture
def client_for(db):
    clients = {}

    def make(user) -> APIClient:
        if user.pk not in clients:
            _, token = api_token_issue(user=user, name="tests")
            clients[user.pk] = APIClient()
            clients[user.pk].credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
        return clients[user.pk]

    return make


@pytest.fixture
def researcher(make_user):
    return make_user("res", role="researcher")


def judge(comparison, user, chosen="A", strength=2, a_safe=True, b_safe=True):
    assignment = services.assignment_lease_next(annotator=user)
    assert assignment.comparison_id == comparison.id
    return services.judgment_submit(assignment=assignment, annotator=user, chosen=chosen, strength=strength,
                                    safety=SafetyLabels(a_safe=a_safe, b_safe=b_safe))


SUBMIT = {"chosen": "B", "strength": 3, "a_safe": True, "b_safe": False, "harm_categories": ["violence"]}


class TestAssignmentsAndJudging:
    def test_next_then_submit_then_replay(self, client_for, annotator, make_comparison):
        comparison = make_comparison()
        client = client_for(annotator)
        leased = client.post("/api/v1/assignments/next")
        assert leased.status_code == 200
        body = leased.json()
        assert body["comparison"]["id"] == comparison.id
        assert body["comparison"]["response_a"]["text"] == "Answer A"
        assert "checkpoint" not in body["comparison"]["response_a"]  # annotators judge blind
        url = f"/api/v1/assignments/{body['id']}/judgment"
        first = client.post(url, SUBMIT, format="json", HTTP_IDEMPOTENCY_KEY="k-1")
        assert first.status_code == 201, first.content
        replay = client.post(url, SUBMIT, format="json", HTTP_IDEMPOTENCY_KEY="k-1")
        assert replay.status_code == 200
        assert replay.json()["id"] == first.json()["id"]
        judgment = Judgment.objects.get()
        assert (judgment.chosen, judgment.strength, judgment.a_safe, judgment.b_safe) == ("B", 3, True, False)
        assert judgment.safety_bin == "chosen_unsafe_other_safe"
        assert judgment.idempotency_key == "k-1"
        assert client.post("/api/v1/assignments/next").status_code == 204  # nothing left

    def test_submission_statements_are_pinned(self, client_for, annotator, other_annotator, make_comparison,
                                              make_user, django_assert_num_queries):
        """The hot path: the token; the transaction's begin; the lock (FOR SHARE) of the batch the judgment
        lands in; the lock of the assignment and its comparison, with the key's earlier use; the comparison's
        batch; the insert; the assignment's status; the end. A judgment on a comparison that already has its
        batch skips one; a replay reads its judgment after the two locks. (The token lookup is a prepared
        statement on PostgreSQL: a warm-up request prepares it.)"""
        services.batch_open_for()  # the week's first judgment also creates the week's batch
        make_comparison()
        warm = client_for(make_user("warm-up"))
        warm_id = warm.post("/api/v1/assignments/next").json()["id"]
        assert warm.post(f"/api/v1/assignments/{warm_id}/judgment", SUBMIT, format="json").status_code == 201
        make_comparison(overlap=2)
        first, second = client_for(annotator), client_for(other_annotator)
        ids = [c.post("/api/v1/assignments/next").json()["id"] for c in (first, second)]  # tokens' first use
        with django_assert_num_queries(8):
            assert first.post(f"/api/v1/assignments/{ids[0]}/judgment", SUBMIT, format="json",
                              HTTP_IDEMPOTENCY_KEY="k").status_code == 201
        with django_assert_num_queries(6):  # the replay: token, begin, two locks, the judgment, end
            assert first.post(f"/api/v1/assignments/{ids[0]}/judgment", SUBMIT, format="json",
                              HTTP_IDEMPOTENCY_KEY="k").status_code == 200
        with django_assert_num_queries(7):
            response = second.post(f"/api/v1/assignments/{ids[1]}/judgment", SUBMIT, format="json")
        assert response.status_code == 201 and response.json()["batch"] == Batch.objects.get().label
        assert Judgment.objects.filter(comparison__batch__isnull=False).count() == 3

    def test_key_reused_on_another_assignment_is_refused(self, client_for, annotator, make_comparison):
        make_comparison(), make_comparison()
        client = client_for(annotator)
        first = client.post("/api/v1/assignments/next").json()["id"]
        client.post(f"/api/v1/assignments/{first}/judgment", SUBMIT, format="json", HTTP_IDEMPOTENCY_KEY="k")
        second = client.post("/api/v1/assignments/next").json()["id"]
        response = client.post(f"/api/v1/assignments/{second}/judgment", SUBMIT, format="json",
                               HTTP_IDEMPOTENCY_KEY="k")
        assert response.status_code == 400
        assert "Idempotency-Key" in response.content.decode() or "idempotency_key" in response.json()
        assert Judgment.objects.count() == 1

    def test_a_batch_frozen_mid_week_loses_no_submission(self, client_for, annotator, other_annotator, admin_user,
                                                          make_comparison):
        """Both a lease open across the freeze and a comparison the week's batch never had are saved, into
        the week's next batch (today both are refused: "Batch ... is frozen")."""
        comparison = make_comparison(overlap=2)
        make_comparison()
        done = client_for(annotator).post("/api/v1/assignments/next").json()["id"]
        client_for(annotator).post(f"/api/v1/assignments/{done}/judgment", SUBMIT, format="json")
        client = client_for(other_annotator)
        open_lease = client.post("/api/v1/assignments/next").json()
        assert open_lease["comparison"]["id"] == comparison.id
        label = Batch.objects.get().label
        frozen = client_for(admin_user).post(f"/api/v1/batches/{label}/freeze", {}, format="json")
        assert frozen.status_code == 200 and frozen.json()["n_judgments"] == 1
        saved = client.post(f"/api/v1/assignments/{open_lease['id']}/judgment", SUBMIT, format="json",
                            HTTP_IDEMPOTENCY_KEY="after")
        assert saved.status_code == 201, saved.content
        assert saved.json()["batch"] == f"{label}.2" and saved.json()["assignment"] == open_lease["id"]
        assert Comparison.objects.get(pk=saved.json()["comparison"]).carried_from == comparison
        replay = client.post(f"/api/v1/assignments/{open_lease['id']}/judgment", SUBMIT, format="json",
                             HTTP_IDEMPOTENCY_KEY="after")
        assert replay.status_code == 200 and replay.json()["id"] == saved.json()["id"]
        fresh = client_for(annotator).post("/api/v1/assignments/next").json()["id"]
        saved = client_for(annotator).post(f"/api/v1/assignments/{fresh}/judgment", SUBMIT, format="json")
        assert saved.status_code == 201 and saved.json()["batch"] == f"{label}.2"
        batch = Batch.objects.get(label=label)
        assert selectors.batch_content_hash(batch=batch) == batch.content_hash

    def test_fields_the_caller_may_not_set_are_ignored(self, client_for, annotator, other_annotator, make_comparison):
        make_comparison()
        client = client_for(annotator)
        assignment = client.post("/api/v1/assignments/next").json()["id"]
        body = {**SUBMIT, "annotator": other_annotator.id, "source": "imported", "batch": 999, "is_test": True,
                "created_at": "2001-01-01T00:00:00Z", "comparison": 12345}
        response = client.post(f"/api/v1/assignments/{assignment}/judgment", body, format="json")
        assert response.status_code == 201
        judgment = Judgment.objects.get()
        assert judgment.annotator == annotator and judgment.source == "human"
        assert judgment.created_at.year > 2001 and not judgment.comparison.is_test
        assert judgment.comparison.batch.kind == Batch.Kind.WEEKLY

    def test_another_users_assignment_is_404(self, client_for, annotator, other_annotator, make_comparison):
        make_comparison()
        mine = services.assignment_lease_next(annotator=annotator)
        intruder = client_for(other_annotator)
        assert intruder.get(f"/api/v1/assignments/{mine.id}").status_code == 404
        assert intruder.post(f"/api/v1/assignments/{mine.id}/judgment", SUBMIT, format="json").status_code == 404
        assert intruder.post(f"/api/v1/assignments/{mine.id}/skip").status_code == 404
        assert intruder.get("/api/v1/assignments").json()["results"] == []
        assert not Judgment.objects.exists()
        mine.refresh_from_db()
        assert mine.status == Assignment.Status.LEASED

    def test_invalid_judgment_is_400_and_writes_nothing(self, client_for, annotator, make_comparison):
        make_comparison()
        client = client_for(annotator)
        assignment = client.post("/api/v1/assignments/next").json()["id"]
        for bad in ({**SUBMIT, "strength": 4}, {**SUBMIT, "chosen": "C"}, {k: v for k, v in SUBMIT.items() if k != "a_safe"},
                    {**SUBMIT, "harm_categories": ["nonsense"]}, {**SUBMIT, "seconds_spent": -1}):
            assert client.post(f"/api/v1/assignments/{assignment}/judgment", bad, format="json").status_code == 400
        assert not Judgment.objects.exists()

    def test_skip(self, client_for, annotator, make_comparison):
        make_comparison()
        client = client_for(annotator)
        assignment = client.post("/api/v1/assignments/next").json()["id"]
        assert client.post(f"/api/v1/assignments/{assignment}/skip").json()["status"] == "skipped"
        # a skipped lease can no longer be judged: the service's message comes back as a 400
        response = client.post(f"/api/v1/assignments/{assignment}/judgment", SUBMIT, format="json")
        assert response.status_code == 400 and "skipped" in response.content.decode()

    def test_researcher_without_annotator_role_cannot_lease(self, client_for, researcher, make_comparison):
        make_comparison()
        assert client_for(researcher).post("/api/v1/assignments/next").status_code == 403


class TestJudgmentsList:
    def test_annotator_sees_only_own_researcher_sees_all(self, client_for, annotator, other_annotator, researcher,
                                                         make_comparison):
        c1, c2 = make_comparison(), make_comparison()
        mine = judge(c1, annotator)
        theirs = judge(c2, other_annotator)
        own = client_for(annotator).get("/api/v1/judgments").json()["results"]
        assert [j["id"] for j in own] == [mine.id]
        assert "chosen_checkpoint" not in own[0]
        assert client_for(annotator).get(f"/api/v1/judgments/{theirs.id}").status_code == 404
        everything = client_for(researcher).get("/api/v1/judgments?ordering=id").json()["results"]
        assert [j["id"] for j in everything] == [mine.id, theirs.id]
        assert everything[0]["chosen_checkpoint"] == "model-a"
        assert everything[0]["annotator"] == annotator_pseudonym(annotator.id) != str(annotator.id)

    def test_filters(self, client_for, annotator, other_annotator, researcher, make_comparison):
        a = judge(make_comparison(), annotator, chosen="A", strength=3, a_safe=True, b_safe=False)
        b = judge(make_comparison(), other_annotator, chosen="B", strength=1)
        client = client_for(researcher)

        def ids(query):
            response = client.get(f"/api/v1/judgments?{query}")
            assert response.status_code == 200, response.content
            return sorted(j["id"] for j in response.json()["results"])

        assert ids("strength=3") == [a.id]
        assert ids("safety_bin=chosen_safe_other_unsafe") == [a.id]
        assert ids(f"annotator={annotator_pseudonym(other_annotator.id)}") == [b.id]
        assert ids("checkpoint=model-b") == [a.id, b.id]
        assert ids("checkpoint=nope") == []
        assert ids(f"batch={a.comparison.batch.label}") == [a.id, b.id]
        assert ids("batch=2001-W01") == []
        assert ids("source=imported") == []
        assert ids("split=train") == [a.id, b.id]
        assert ids("created_after=2000-01-01T00:00:00Z&created_before=2100-01-01T00:00:00Z") == [a.id, b.id]
        assert ids("created_after=2100-01-01T00:00:00Z") == []

    @pytest.mark.parametrize("query", [
        "ordering=annotator__password", "ordering=-note", "annotator__password__startswith=x", "note=x",
        "strength=7", "created_after=yesterday",
    ])
    def test_unknown_or_invalid_parameters_are_400(self, client_for, researcher, query):
        response = client_for(researcher).get(f"/api/v1/judgments?{query}")
        assert response.status_code == 400, (query, response.content)

    def test_cursor_pagination(self, client_for, annotator, researcher, make_comparison):
        made = [judge(make_comparison(), annotator).id for _ in range(5)]
        client = client_for(researcher)
        page = client.get("/api/v1/judgments?page_size=2&ordering=id").json()
        seen = [j["id"] for j in page["results"]]
        while page["next"]:
            page = client.get(page["next"]).json()
            seen += [j["id"] for j in page["results"]]
        assert seen == made

    def test_query_count_does_not_grow_with_rows(self, client_for, annotator, researcher, make_comparison):
        client = client_for(researcher)
        judge(make_comparison(), annotator)
        client.get("/api/v1/judgments")  # the token's first use writes last_used_at
        with CaptureQueriesContext(connection) as one:
            assert client.get("/api/v1/judgments").status_code == 200
        for _ in range(5):
            judge(make_comparison(), annotator)
        with CaptureQueriesContext(connection) as six:
            assert len(client.get("/api/v1/judgments").json()["results"]) == 6
        assert len(six) == len(one)


class TestComparisonsPush:
    BODY = {
        "text": "And in winter?", "context": [{"role": "user", "content": "Weather in Oslo?"},
                                            {"role": "assistant", "content": "Mild summers."}],
        "system_prompt": "Be brief.", "is_adversarial": False, "overlap": 3,
        "response_a": {"text": "Cold.", "checkpoint": "ext-1", "temperature": 0.7},
        "response_b": {"text": "Snowy and dark.", "checkpoint": "ext-2"},
    }

    def test_push_creates_prompt_responses_checkpoints(self, client_for, admin_user):
        response = client_for(admin_user).post("/api/v1/comparisons", self.BODY, format="json")
        assert response.status_code == 201, response.content
        comparison = Comparison.objects.get(pk=response.json()["id"])
        assert comparison.origin == "api" and comparison.overlap == 3 and comparison.batch is None
        assert comparison.prompt.context == self.BODY["context"] and comparison.prompt.system_prompt == "Be brief."
        assert comparison.prompt.source == Prompt.Source.API
        assert comparison.response_a.checkpoint.name == "ext-1"
        assert comparison.response_a.checkpoint.format == Checkpoint.Format.EXTERNAL
        assert response.json()["response_b"]["checkpoint"] == "ext-2"

    @pytest.mark.parametrize("change", [
        {"context": [{"role": "assistant", "content": "x"}]},  # must start with a user turn
        {"context": [{"role": "user", "content": "x"}]},  # must end with an assistant turn
        {"text": "   "},
        {"overlap": 0},
        {"response_b": {"text": "Cold.", "checkpoint": "ext-2"}},  # identical texts
        {"response_a": {"text": "x", "checkpoint": "ext-1", "top_p": 0}},
        {"response_a": {"text": "x", "checkpoint": ""}},
    ])
    def test_invalid_push_is_400_and_writes_nothing(self, client_for, admin_user, change):
        response = client_for(admin_user).post("/api/v1/comparisons", {**self.BODY, **change}, format="json")
        assert response.status_code == 400, response.content
        assert not Prompt.objects.exists() and not Checkpoint.objects.exists()

    def test_bulk_is_all_or_nothing(self, client_for, admin_user):
        client = client_for(admin_user)
        good = {**self.BODY}
        bad = {**self.BODY, "context": [{"role": "assistant", "content": "x"}]}
        response = client.post("/api/v1/comparisons/bulk", {"comparisons": [good, bad]}, format="json")
        assert response.status_code == 400 and "comparisons[1]" in response.content.decode()
        assert not Comparison.objects.exists() and not Response.objects.exists()
        response = client.post("/api/v1/comparisons/bulk", {"comparisons": [good, good]}, format="json")
        assert response.status_code == 201 and len(response.json()["comparisons"]) == 2

    def test_only_admins_push(self, client_for, researcher, annotator):
        for user in (researcher, annotator):
            assert client_for(user).post("/api/v1/comparisons", self.BODY, format="json").status_code == 403
        assert not Prompt.objects.exists()

    def test_nul_and_lone_surrogates_are_400(self, client_for, admin_user):
        client = client_for(admin_user)
        for raw in ('{"text": "a\\u0000b"}', '{"text": "\\ud800"}', '{"text": NaN}'):
            response = client.post("/api/v1/comparisons", raw, content_type="application/json")
            assert response.status_code == 400, raw


class TestBatches:
    def test_list_and_freeze_permissions(self, client_for, annotator, researcher, admin_user, make_comparison):
        for _ in range(3):
            judge(make_comparison(), annotator)
        batch = Batch.objects.get()
        listed = client_for(researcher).get("/api/v1/batches").json()["results"]
        assert listed[0]["label"] == batch.label and listed[0]["n_judgments"] == 3 and listed[0]["n_comparisons"] == 3
        assert client_for(annotator).get("/api/v1/batches").status_code == 403
        assert client_for(researcher).post(f"/api/v1/batches/{batch.label}/freeze").status_code == 403
        response = client_for(admin_user).post(f"/api/v1/batches/{batch.label}/freeze", {"test_size": 1}, format="json")
        assert response.status_code == 200, response.content
        assert response.json()["status"] == "frozen" and response.json()["test_size"] == 1
        again = client_for(admin_user).post(f"/api/v1/batches/{batch.label}/freeze", {}, format="json")
        assert again.status_code == 400 and "already frozen" in again.content.decode()
        assert client_for(admin_user).post("/api/v1/batches/2001-W01/freeze").status_code == 404


class TestCheckpoints:
    @pytest.fixture
    def model_root(self, tmp_path, settings):
        settings.TANDEM_MODEL_ROOTS = [tmp_path / "models"]
        ckpt = tmp_path / "models" / "tiny"
        ckpt.mkdir(parents=True)
        (ckpt / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 100,
                                                      "multiple_of": 32, "norm_eps": 1e-5}))
        (ckpt / "consolidated.00.pth").write_bytes(b"not really torch, but bytes to hash")
        (tmp_path / "models" / "tokenizer.model").write_bytes(b"tok")
        (tmp_path / "outside").mkdir()
        return tmp_path

    def test_register_meta(self, client_for, admin_user, model_root):
        response = client_for(admin_user).post("/api/v1/checkpoints",
                                               {"name": "tiny", "format": "meta", "path": "tiny"}, format="json")
        assert response.status_code == 201, response.content
        checkpoint = Checkpoint.objects.get(name="tiny")
        assert checkpoint.params["dim"] == 64 and len(checkpoint.sha256) == 64
        assert checkpoint.tokenizer_path.endswith("models/tokenizer.model")

    @pytest.mark.parametrize("path", ["../outside", "/etc", "missing"])
    def test_paths_outside_roots_or_missing_are_400(self, client_for, admin_user, model_root, path):
        response = client_for(admin_user).post("/api/v1/checkpoints",
                                               {"name": "x", "format": "meta", "path": path}, format="json")
        assert response.status_code == 400, response.content
        assert not Checkpoint.objects.exists()

    def test_wrong_format_files_are_400(self, client_for, admin_user, model_root):
        response = client_for(admin_user).post("/api/v1/checkpoints",
                                               {"name": "x", "format": "hf", "path": "tiny"}, format="json")
        assert response.status_code == 400 and "config.json" in response.content.decode()

    def test_researchers_read_but_do_not_register(self, client_for, researcher, checkpoints, model_root):
        client = client_for(researcher)
        assert {c["name"] for c in client.get("/api/v1/checkpoints").json()["results"]} == {"model-a", "model-b"}
        assert client.get("/api/v1/checkpoints?format=meta").json()["results"] == []
        response = client.post("/api/v1/checkpoints", {"name": "x", "format": "meta", "path": "tiny"}, format="json")
        assert response.status_code == 403


class TestUnauthenticated:
    @pytest.mark.parametrize("url", ["/api/v1/judgments", "/api/v1/batches", "/api/v1/export/preferences",
                                     "/api/v1/snapshots", "/api/v1/checkpoints", "/api/schema/"])
    def test_401(self, db, url):
        response = APIClient().get(url)
        assert response.status_code == 401
        assert response["WWW-Authenticate"].startswith("Bearer")


class TestCheckpointHashWithoutTorch:
    def test_register_real_meta_and_hf_checkpoints(self, client_for, admin_user, tmp_path, settings):
        """The torch-free hash and params equal what policy.checkpoints computes and loads."""
        torch = pytest.importorskip("torch")
        from policy.checkpoints import load_checkpoint, save_hf, save_meta, sha256_of_checkpoint
        from policy.model import ModelArgs, Transformer

        settings.TANDEM_MODEL_ROOTS = [tmp_path]
        torch.manual_seed(0)
        model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16,
                                      max_seq_len=64))
        save_meta(model, tmp_path / "meta")
        save_hf(model, tmp_path / "hf")
        client = client_for(admin_user)
        for fmt in ("meta", "hf"):
            response = client.post("/api/v1/checkpoints", {"name": f"tiny-{fmt}", "format": fmt, "path": fmt},
                                   format="json")
            assert response.status_code == 201, response.content
            assert response.json()["sha256"] == sha256_of_checkpoint(tmp_path / fmt)
            loaded = load_checkpoint(tmp_path / fmt).args
            params = response.json()["params"]
            for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size"):
                assert params[key] == getattr(loaded, key), (fmt, key)

    def test_the_api_modules_do_not_import_torch(self):
        assert_imports_no_torch("import webapp.urls, annotation.api.views, policy.api, policy.services, "
                                "annotation.importers, annotation.snapshots, annotation.exports, webapp.auth; "
                                "from django.urls import get_resolver; get_resolver().url_patterns")


@pytest.mark.django_db(transaction=True)
def test_concurrent_replays_make_one_judgment(make_comparison, annotator):
    """Two requests with the same Idempotency-Key at the same moment: one 201, one 200, one judgment."""
    import threading

    if connection.vendor != "postgresql":
        pytest.skip("concurrent writers need PostgreSQL (SQLite serializes them)")
    make_comparison()
    assignment = services.assignment_lease_next(annotator=annotator)
    _, token = api_token_issue(user=annotator, name="race")
    barrier = threading.Barrier(4)
    statuses, bodies = [], []

    def submit():
        from django.db import connections

        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
        try:
            barrier.wait()
            response = client.post(f"/api/v1/assignments/{assignment.id}/judgment", SUBMIT, format="json",
                                   HTTP_IDEMPOTENCY_KEY="same")
            statuses.append(response.status_code)
            bodies.append(response.json()["id"])
        finally:
            connections.close_all()

    threads = [threading.Thread(target=submit) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [200, 200, 200, 201]
    assert len(set(bodies)) == 1 and Judgment.objects.count() == 1


@pytest.mark.parametrize("pk", ["20324516786969396641792", "-1", "0", "x"])
def test_out_of_range_ids_are_404(client_for, annotator, pk):
    client = client_for(annotator)
    assert client.post(f"/api/v1/assignments/{pk}/judgment", SUBMIT, format="json").status_code == 404
    assert client.get(f"/api/v1/assignments/{pk}").status_code == 404


@pytest.mark.django_db
def test_submission_payload_equals_the_judgment_serializer(make_comparison, annotator):
    """The submit response is built by hand for speed; it must stay what JudgmentSerializer (the schema) says."""
    from annotation.api.serializers import JudgmentSerializer, judgment_payload

    first, second = make_comparison(), make_comparison()
    open_batch = judge(first, annotator, chosen="B", strength=0, a_safe=False, b_safe=True)
    noted = services.judgment_submit(assignment=services.assignment_lease_next(annotator=annotator),
                                     annotator=annotator, chosen="A", strength=3, note="<b>why</b>",
                                     safety=SafetyLabels(a_safe=True, b_safe=False), harm_categories=["violence"],
                                     seconds_spent=12.5)
    assert noted.comparison_id == second.pk
    imported = Judgment.objects.create(comparison=make_comparison(), source=Judgment.Source.IMPORTED, chosen="A")
    for judgment in [open_batch, noted, imported]:
        judgment = Judgment.objects.select_related("comparison__batch").get(pk=judgment.pk)
        assert judgment_payload(judgment) == JudgmentSerializer(judgment).data
    frozen = services.batch_freeze(batch=Batch.objects.get())
    judgment = Judgment.objects.select_related("comparison__batch").get(pk=open_batch.pk)
    assert judgment.comparison.batch == frozen
    assert judgment_payload(judgment) == JudgmentSerializer(judgment).data
