"""Reward-model training on the workers: the pair through the broker and a real worker process (duplicate
delivery makes one model), a worker death midway resumed from the last checkpoint by a real worker,
progress written per step, a NaN loss marked with its step, the accuracy before training on the newest
batch, and a second delivery while the first trains."""
from pathlib import Path

import pytest

from annotation.models import Snapshot
from rewards import services
from rewards.models import RewardModelRun
from tests.conftest import wait_for
from tests.rewards import runs_helpers as h
from tests.rewards.runs_helpers import one_torch_thread, rm_base, rm_base_folder  # noqa: F401 (fixtures)
from webapp.jobs import JobStatus
from workers import rewards as reward_worker
from workers.rewards import train_reward_model


@pytest.fixture
def in_process(monkeypatch, one_torch_thread):  # noqa: F811
    """The task runs in this process; nothing goes to the broker."""
    monkeypatch.setattr(services, "_enqueue", lambda run_id: None)


class WorkerKilled(BaseException):
    """Stands for the process dying: no handler in the task sees it, the row stays "running"."""


def _finished(run_ids):
    def check():
        runs = list(RewardModelRun.objects.filter(pk__in=run_ids))
        return all(not r.is_active for r in runs) and runs
    return check


def _model_files(run: RewardModelRun) -> set[str]:
    return {p.name for p in Path(run.artifact_path).iterdir()}


@pytest.mark.django_db(transaction=True)
def test_the_pair_trains_on_a_real_worker_and_a_duplicate_delivery_makes_nothing(celery_worker_process, rm_base):
    batch = h.judged_batch(24, test_size=4)
    helpful, safety = services.reward_runs_launch(kinds=["helpfulness", "safety"], base_checkpoint=rm_base,
                                                  batches=[batch], config=h.TINY_CONFIG, enqueue=False)
    # The helpfulness run's message is delivered twice; the solo worker takes them in order, so the
    # duplicate has been handled once the safety run, queued last, is done.
    for run_id in (helpful.pk, helpful.pk, safety.pk):
        train_reward_model.delay(run_id)
    runs = wait_for(_finished([helpful.pk, safety.pk]), timeout=180, what="both reward models to train")
    snapshot = Snapshot.objects.get()
    for run in runs:
        assert run.status == JobStatus.SUCCEEDED, run.error
        assert run.step == run.total_steps > 0 and run.progress == 1.0 and run.started_at <= run.finished_at
        assert "held-out accuracy" in run.progress_message
        assert {"model.safetensors", "config.json", "data_manifest.json", "tokenizer.model"} <= _model_files(run)
        assert run.metrics["snapshots"] == [snapshot.sha256] and run.metrics["manifest_sha256"] == run.manifest_sha256
        assert run.metrics["eval"]["all"]["n"] == 4 and "by_strength" in run.metrics["eval"]["all"]
        assert run.metrics["resumed_from_step"] == 0
        out = Path(run.artifact_path).parent
        assert out == services.run_output_dir(run) and not (out / "checkpoints").exists()
        # One model per run, whatever the number of deliveries.
        assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["model", "result.json"]
    assert runs[0].metrics["weights_sha256"] != runs[1].metrics["weights_sha256"]


@pytest.mark.django_db(transaction=True)
def test_a_worker_killed_midway_is_resumed_by_the_next_from_its_last_checkpoint(
        celery_worker_process, rm_base, monkeypatch, one_torch_thread):  # noqa: F811
    monkeypatch.setattr(services, "_enqueue", lambda run_id: None)
    batch = h.judged_batch(24, test_size=4)
    run = services.reward_run_launch(kind="helpfulness", base_checkpoint=rm_base, batches=[batch],
                                     config=h.TINY_CONFIG)
    real_progress = services.reward_run_progress

    def die_after_step_3(**kwargs):
        written = real_progress(**kwargs)
        if kwargs["step"] == 3:
            raise WorkerKilled
        return written

    monkeypatch.setattr(services, "reward_run_progress", die_after_step_3)
    monkeypatch.setattr(reward_worker, "PROGRESS_INTERVAL_S", 0.0)
    with pytest.raises(WorkerKilled):
        train_reward_model(run.pk)
    run.refresh_from_db()
    assert (run.status, run.step, run.error) == (JobStatus.RUNNING, 3, "")
    out = services.run_output_dir(run)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]  # the last complete one
    # The message comes back (acks_late) or is sent again: a real worker process resumes the run.
    train_reward_model.delay(run.pk)
    (run,) = wait_for(_finished([run.pk]), timeout=120, what="the resumed run")
    assert run.status == JobStatus.SUCCEEDED, run.error
    assert run.metrics["resumed_from_step"] == 2 and run.step == run.total_steps > 3
    # The loss curve of steps 1-2 came back from the checkpoint: the whole run's curve is there.
    assert [c["step"] for c in run.metrics["train"]["curve"]] == list(range(1, run.total_steps + 1))
    assert Path(run.artifact_path).parent == out and not (out / "checkpoints").exists()


@pytest.mark.django_db
def test_progress_per_step_and_accuracy_before_training_on_the_newest_batch(rm_base, in_process, monkeypatch):
    older = h.judged_batch(24, test_size=4, weeks_ago=1, seed=1)
    first = services.reward_run_launch(kind="helpfulness", base_checkpoint=rm_base, batches=[older],
                                       config=h.TINY_CONFIG)
    train_reward_model(first.pk)
    newest = h.judged_batch(24, test_size=4, seed=2)
    second = services.reward_run_launch(kind="helpfulness", base_checkpoint=rm_base, batches=[older, newest],
                                        config=h.TINY_CONFIG)
    seen = []
    real_progress = services.reward_run_progress

    def record(**kwargs):
        written = real_progress(**kwargs)
        row = RewardModelRun.objects.get(pk=kwargs["run"].pk)
        seen.append((row.status, row.step, row.total_steps, round(row.progress, 6), row.progress_message))
        return written

    monkeypatch.setattr(services, "reward_run_progress", record)
    monkeypatch.setattr(reward_worker, "PROGRESS_INTERVAL_S", 0.0)
    train_reward_model(second.pk)
    second.refresh_from_db()
    total = second.total_steps
    assert second.status == JobStatus.SUCCEEDED and total == len(seen) > 1
    assert [s[:4] for s in seen] == [(JobStatus.RUNNING, k, total, round(k / total, 6)) for k in range(1, total + 1)]
    assert seen[0][4].startswith(f"Step 1 of {total}: loss ")
    pre = second.metrics["pre_training_newest_batch"]
    assert (pre["batch"], pre["run"]) == (newest.label, first.pk)
    assert pre["metrics"]["n"] == 24  # every pair of the newest batch: the first model never saw any
    assert second.metrics["eval"][f"batch:{newest.label}"]["n"] == 4  # after training: its held-out slice
    first_pre = RewardModelRun.objects.get(pk=first.pk).metrics["pre_training_newest_batch"]
    assert "metrics" not in first_pre and "no earlier helpfulness reward model" in first_pre["note"]


@pytest.mark.django_db
def test_a_nan_loss_fails_the_run_with_its_step_and_keeps_the_last_good_checkpoint(rm_base, in_process, monkeypatch):
    import torch

    import rewards.train

    batch = h.judged_batch(24, test_size=4)
    run = services.reward_run_launch(kind="helpfulness", base_checkpoint=rm_base, batches=[batch],
                                     config=h.TINY_CONFIG)
    real_loss, calls = rewards.train.pairwise_loss, []

    def nan_from_step_3(*args, **kwargs):  # one micro-batch per step here
        calls.append(1)
        losses = real_loss(*args, **kwargs)
        return losses * torch.nan if len(calls) >= 3 else losses

    monkeypatch.setattr(rewards.train, "pairwise_loss", nan_from_step_3)
    assert train_reward_model(run.pk) is None
    run.refresh_from_db()
    assert run.status == JobStatus.FAILED and run.step == 3 and run.finished_at is not None
    assert "training diverged at step 3: loss is nan" in run.error and "step-00000002" in run.error
    assert run.progress_message == "Failed at step 3." and run.artifact_path == ""
    out = services.run_output_dir(run)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]
    assert train_reward_model(run.pk) is None  # a late duplicate of a failed run does nothing
    run.refresh_from_db()
    assert run.status == JobStatus.FAILED


@pytest.mark.django_db
def test_a_delivery_while_another_worker_holds_the_run_does_nothing(rm_base, in_process):
    batch = h.judged_batch(24, test_size=4)
    run = services.reward_run_launch(kind="safety", base_checkpoint=rm_base, batches=[batch],
                                     config={**h.TINY_CONFIG, "mix": {"min_train_pairs": 4}})
    with reward_worker.folder_lock(services.run_output_dir(run)) as held:  # as a worker training it holds it
        assert held
        assert train_reward_model(run.pk) is None
        run.refresh_from_db()
        assert run.status == JobStatus.QUEUED and run.started_at is None
    services.reward_run_cancel(run=run)
    assert train_reward_model(run.pk) is None  # cancelled before a worker got to it
    run.refresh_from_db()
    assert run.status == JobStatus.CANCELLED and run.step == 0
