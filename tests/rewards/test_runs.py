"""Reward-model runs, the Django side: launch validation (bad input refused before anything is created),
the admin's launch form, evaluation tables and actions, the API, and the reward_train command."""
import json
import shutil

import pytest
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.urls import reverse
from rest_framework.test import APIClient

from annotation.models import Snapshot
from annotation.snapshots import snapshot_file
from policy.models import Checkpoint
from rewards import services
from rewards.config import MixConfig
from rewards.data import build_mix, read_rows
from rewards.evaluate import metrics_from_rewards
from rewards.models import RewardModelRun
from tests.rewards import runs_helpers as h
from tests.rewards.runs_helpers import one_torch_thread, rm_base, rm_base_folder  # noqa: F401 (fixtures)
from webapp.auth import api_token_issue
from webapp.jobs import JobStatus


@pytest.fixture
def enqueued(monkeypatch):
    """Run ids the services sent to the workers (nothing reaches a broker)."""
    sent = []
    monkeypatch.setattr(services, "_enqueue", sent.append)
    return sent


def _nothing_created():
    assert RewardModelRun.objects.count() == 0 and Snapshot.objects.count() == 0


# --- services -----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_pair_launch_records_snapshot_manifest_and_enqueues_after_commit(rm_base, enqueued,
                                                                        django_capture_on_commit_callbacks):
    batch = h.judged_batch(24, test_size=4)
    with django_capture_on_commit_callbacks(execute=True):
        helpful, safety = services.reward_pair_launch(base_checkpoint=rm_base, batches=[batch], config=h.TINY_CONFIG)
        assert enqueued == []  # not before the commit
    assert enqueued == [helpful.pk, safety.pk]
    snapshot = Snapshot.objects.get()
    for run in (helpful, safety):
        assert run.status == JobStatus.QUEUED and list(run.snapshots.all()) == [snapshot]
        assert list(run.batches.all()) == [batch]
        assert run.config["base_checkpoint"] == str(h.tiny_base_dir().resolve())
        assert run.config["lr"] == h.TINY_CONFIG["lr"] and run.config["checkpoint_every"] == 2
        # The manifest is the one the worker rebuilds from the snapshot file: same ids, same hash.
        rows = read_rows(snapshot_file(snapshot))
        mix = build_mix(rows, kind=run.kind, seed=0, mix=MixConfig(**h.TINY_CONFIG["mix"]),
                        input_hashes=[snapshot.sha256])
        assert run.manifest_sha256 == mix.manifest["sha256"] == run.data_manifest["sha256"]
        assert run.data_manifest["input_hashes"] == [snapshot.sha256]
        assert run.data_manifest["counts"]["test"] == 4
    assert helpful.manifest_sha256 != safety.manifest_sha256  # different mixes of the same rows


@pytest.mark.django_db
def test_bad_input_is_refused_before_anything_is_created(rm_base, rm_base_folder, enqueued, tmp_path):
    open_batch = h.judged_batch(12, freeze=False)
    with pytest.raises(ValidationError) as error:
        services.reward_pair_launch(base_checkpoint=rm_base, batches=[open_batch], config=h.TINY_CONFIG)
    assert "still open" in error.value.message_dict["batches"][0]
    with pytest.raises(ValidationError) as error:
        services.reward_pair_launch(base_checkpoint=rm_base, batches=[], config=h.TINY_CONFIG)
    assert "batches" in error.value.message_dict
    _nothing_created()

    from annotation import services as annotation_services

    small = annotation_services.batch_freeze(batch=open_batch, test_size=2)  # 10 train pairs, 4 of them safety
    with pytest.raises(ValidationError) as error:  # the safety mix has too few pairs: the pair is refused whole
        services.reward_pair_launch(base_checkpoint=rm_base, batches=[small], config={"micro_batch_size": 4})
    assert "Too little data" in error.value.message_dict["batches"][0] and "safety reward model" in str(error.value)
    with pytest.raises(ValidationError) as error:  # enough pairs, but not for one step of 16
        services.reward_run_launch(kind="helpfulness", base_checkpoint=rm_base, batches=[small],
                                   config={"micro_batch_size": 16})
    assert "cannot fill one optimizer step" in error.value.message_dict["batches"][0]
    _nothing_created()

    external = Checkpoint.objects.create(name="answers-only", format=Checkpoint.Format.EXTERNAL)
    with pytest.raises(ValidationError) as error:
        services.reward_run_launch(kind="helpfulness", base_checkpoint=external, batches=[small])
    assert "has no weights" in error.value.message_dict["base_checkpoint"][0]
    unsaved = Checkpoint(name="never-registered", format=Checkpoint.Format.META, path=str(rm_base_folder))
    with pytest.raises(ValidationError) as error:
        services.reward_run_launch(kind="helpfulness", base_checkpoint=unsaved, batches=[small])
    assert "base_checkpoint" in error.value.message_dict
    gone = h.model_root() / "rm-gone"
    shutil.copytree(rm_base_folder, gone, dirs_exist_ok=True)
    vanished = h.register_base(gone, name="vanished")
    shutil.rmtree(gone)
    with pytest.raises(ValidationError) as error:
        services.reward_run_launch(kind="helpfulness", base_checkpoint=vanished, batches=[small])
    assert "is not a directory" in error.value.message_dict["base_checkpoint"][0]

    for config, expected in [({"nope": 1}, "unknown reward config keys: nope"), ({"lr": -1}, "lr > 0"),
                             ({"base_checkpoint": "/etc"}, "come(s) from the run"), ({"margin": "huge"}, "margin"),
                             ([1, 2], "JSON object")]:
        with pytest.raises(ValidationError) as error:
            services.reward_run_launch(kind="helpfulness", base_checkpoint=rm_base, batches=[small], config=config)
        assert expected in error.value.message_dict["config"][0]
    with pytest.raises(ValidationError) as error:
        services.reward_run_launch(kind="honesty", base_checkpoint=rm_base, batches=[small])
    assert "kind" in error.value.message_dict
    _nothing_created()
    assert enqueued == []


@pytest.mark.django_db
def test_one_active_run_per_kind_base_and_data(rm_base, enqueued):
    batch = h.judged_batch(24, test_size=4)
    first = services.reward_run_launch(kind="helpfulness", base_checkpoint=rm_base, batches=[batch], config=h.TINY_CONFIG)
    with pytest.raises(ValidationError) as error:
        services.reward_pair_launch(base_checkpoint=rm_base, batches=[batch], config=h.TINY_CONFIG)
    assert f"run #{first.pk}" in error.value.message_dict["batches"][0]
    assert RewardModelRun.objects.count() == 1  # the safety twin of the refused pair was not created either
    # Another seed is another data manifest (other samples, another order): allowed beside it.
    other = services.reward_run_launch(kind="helpfulness", base_checkpoint=rm_base, batches=[batch],
                                       config={**h.TINY_CONFIG, "seed": 1})
    assert other.manifest_sha256 != first.manifest_sha256
    # The database refuses a second active row even past the service.
    from django.db import IntegrityError, transaction

    with pytest.raises(IntegrityError), transaction.atomic():
        RewardModelRun.objects.create(kind="helpfulness", base_checkpoint=rm_base, manifest_sha256=first.manifest_sha256)
    cancelled = services.reward_run_cancel(run=first)
    assert cancelled.status == JobStatus.CANCELLED and cancelled.finished_at is not None
    with pytest.raises(ValidationError):
        services.reward_run_cancel(run=first)
    again = services.reward_run_relaunch(run=first)
    assert (again.kind, again.manifest_sha256, again.config) == (first.kind, first.manifest_sha256, first.config)


# --- admin ---------------------------------------------------------------------------------------


def _fake_metrics(label: str) -> dict:
    rows = [{"id": i, "strength": i % 4, "safety_bin": "both_safe", "source": "human", "batch": label,
             "chosen": [{"role": "assistant", "content": "longer answer" if i % 2 else "a"}],
             "rejected": [{"role": "assistant", "content": "b"}]} for i in range(8)]
    metrics = metrics_from_rewards(rows, [1.0, 2.0, 0.5, -1.0, 3.0, 0.2, -0.1, 2.5], [0.0] * 8)
    return {"eval": {"all": metrics, f"batch:{label}": metrics}, "steps": 6, "train": {"pairs_per_s": 12.5},
            "pre_training_newest_batch": {"batch": label, "run": 1, "metrics": metrics}}


@pytest.mark.django_db
def test_admin_launches_from_the_form_and_shows_escaped_evaluation_tables(client, admin_user, rm_base, enqueued,
                                                                         django_capture_on_commit_callbacks):
    client.force_login(admin_user)
    batch = h.judged_batch(24, test_size=4)
    open_batch = h.judged_batch(3, freeze=False, weeks_ago=2, seed=5)
    url = reverse("admin:rewards_rewardmodelrun_add")
    page = client.get(url + f"?batches={batch.pk}")
    assert page.status_code == 200 and b"Launch training" in page.content
    # An open batch is not even offered; a config that is not an object is an error on its field.
    response = client.post(url, {"kind": "pair", "base_checkpoint": rm_base.pk, "batches": [open_batch.pk]})
    assert response.status_code == 200 and b"Select a valid choice" in response.content
    response = client.post(url, {"kind": "pair", "base_checkpoint": rm_base.pk, "batches": [batch.pk], "config": "[1]"})
    assert b"Must be a JSON object" in response.content
    response = client.post(url, {"kind": "helpfulness", "base_checkpoint": rm_base.pk, "batches": [batch.pk],
                                 "config": '{"micro_batch_size": 64}'})
    assert b"cannot fill one optimizer step" in response.content
    _nothing_created()
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(url, {"kind": "pair", "base_checkpoint": rm_base.pk, "batches": [batch.pk],
                                     "config": '{"micro_batch_size": 4, "max_seq_len": 64, "mix": {"min_train_pairs": 4}}'})
    assert response.status_code == 302
    runs = list(RewardModelRun.objects.order_by("kind"))
    assert [r.kind for r in runs] == ["helpfulness", "safety"] and sorted(enqueued) == [r.pk for r in runs]
    assert all(r.created_by == admin_user for r in runs)

    changelist = client.get(reverse("admin:rewards_rewardmodelrun_changelist"))
    assert changelist.status_code == 200 and b"<progress" in changelist.content

    run = runs[0]
    label = "<script>alert(1)</script>"
    RewardModelRun.objects.filter(pk=run.pk).update(metrics=_fake_metrics(label), status=JobStatus.SUCCEEDED,
                                                    artifact_path="/models/rm", progress=1.0)
    page = client.get(reverse("admin:rewards_rewardmodelrun_change", args=[run.pk])).content.decode()
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    for heading in ("Accuracy per test set", "Accuracy per preference strength (Table 8 layout)",
                    "Accuracy per safety bin", "Calibration on all test pairs", "Reward distributions",
                    "accuracy before training on it", "Significantly Better", "Negligibly Better / Unsure",
                    "80.7%", run.manifest_sha256):
        assert heading in page, heading
    assert "75.0% (n=8)" in page  # 6 of 8 rewards favour the chosen response

    cancel = client.post(reverse("admin:rewards_rewardmodelrun_changelist"),
                         {"action": "cancel_runs", "_selected_action": [runs[1].pk]})
    assert cancel.status_code == 302
    runs[1].refresh_from_db()
    assert runs[1].status == JobStatus.CANCELLED


# --- API -----------------------------------------------------------------------------------------


@pytest.fixture
def api(db, private_cache):
    def client_for(user) -> APIClient:
        _, token = api_token_issue(user=user, name="tests")
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
        return client

    return client_for


@pytest.mark.django_db
def test_api_roles_launch_errors_and_cancel(api, make_user, admin_user, rm_base, enqueued,
                                           django_capture_on_commit_callbacks):
    batch = h.judged_batch(24, test_size=4)
    researcher, annotator, admin = (api(make_user("res", role="researcher")), api(make_user("ann3")),
                                    api(admin_user))
    body = {"kind": "pair", "base_checkpoint": rm_base.name, "batches": [batch.label], "config": h.TINY_CONFIG}
    assert annotator.get("/api/v1/reward-runs").status_code == 403
    assert researcher.post("/api/v1/reward-runs", body, format="json").status_code == 403
    for change, field in [({"batches": ["no-such-week"]}, "batches"), ({"batches": []}, "batches"),
                          ({"base_checkpoint": "nope"}, "base_checkpoint"), ({"kind": "honesty"}, "kind"),
                          ({"config": {"lr": "fast"}}, "config"), ({"config": {"kind": "safety"}}, "config"),
                          ({"config": {"micro_batch_size": 64}}, "batches")]:
        response = admin.post("/api/v1/reward-runs", {**body, **change}, format="json")
        assert response.status_code == 400 and field in response.json(), (change, response.json())
    _nothing_created()
    with django_capture_on_commit_callbacks(execute=True):
        response = admin.post("/api/v1/reward-runs", body, format="json")
    assert response.status_code == 201
    runs = response.json()["runs"]
    assert [r["kind"] for r in runs] == ["helpfulness", "safety"] and enqueued == [r["id"] for r in runs]
    assert runs[0]["batches"] == [batch.label] and len(runs[0]["snapshots"]) == 1
    assert runs[0]["base_checkpoint"] == rm_base.name and runs[0]["status"] == "queued"
    again = admin.post("/api/v1/reward-runs", body, format="json")
    assert again.status_code == 400 and "already queued" in again.json()["batches"][0]

    listed = researcher.get("/api/v1/reward-runs?kind=safety").json()
    assert [r["id"] for r in listed["results"]] == [runs[1]["id"]] and "metrics" not in listed["results"][0]
    one = researcher.get(f"/api/v1/reward-runs/{runs[0]['id']}").json()
    assert one["metrics"] == {} and one["config"]["micro_batch_size"] == 4
    assert researcher.post(f"/api/v1/reward-runs/{runs[0]['id']}/cancel").status_code == 403
    cancelled = admin.post(f"/api/v1/reward-runs/{runs[0]['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    twice = admin.post(f"/api/v1/reward-runs/{runs[0]['id']}/cancel")
    assert twice.status_code == 400 and "status" in twice.json()
    schema = researcher.get("/api/schema/")
    assert schema.status_code == 200 and b"/api/v1/reward-runs" in schema.content


# --- the command -----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_reward_train_command_inline_and_errors(rm_base, enqueued, one_torch_thread, capsys):
    batch = h.judged_batch(24, test_size=4)
    with pytest.raises(CommandError, match="base_checkpoint: no checkpoint named 'nope'"):
        call_command("reward_train", "--base", "nope", "--batch", batch.label)
    with pytest.raises(CommandError, match="batches: no batch labelled 2000-W01"):
        call_command("reward_train", "--base", rm_base.name, "--batch", "2000-W01")
    with pytest.raises(CommandError, match="config: .*unknown reward config keys: bogus"):
        call_command("reward_train", "--base", rm_base.name, "--batch", batch.label, "--set", "bogus=1")
    _nothing_created()
    sets = [f"--set={k}={json.dumps(v)}" for k, v in h.TINY_CONFIG.items()]
    call_command("reward_train", "--base", rm_base.name, "--batch", batch.label, "--kind", "helpfulness",
                 "--inline", *sets)
    out = capsys.readouterr().out
    run = RewardModelRun.objects.get()
    assert enqueued == []  # trained here, not sent to a worker
    assert run.status == JobStatus.SUCCEEDED and f"helpfulness run #{run.pk}: succeeded" in out
    assert "held-out accuracy" in out and run.artifact_path in out
    with pytest.raises(CommandError, match="only queued or running"):
        call_command("reward_train", "--resend", str(run.pk))
