"""The sweep that re-sends running jobs whose worker died: a free folder lock on a running job means no
live worker holds it; a held lock, a job that just started, or one sent again recently is left alone."""
from datetime import timedelta

import pytest
from django.core.cache import cache
from django.utils import timezone

from policy import rounds
from policy.models import Checkpoint, RLHFRound
from rewards import services as reward_services
from rewards.models import RewardModelRun
from webapp.jobs import JobStatus
from workers import rewards as reward_worker
from workers import rounds as round_worker
from workers import sweeper
from workers.locks import folder_is_locked, folder_lock


@pytest.fixture
def sent(monkeypatch, settings, tmp_path):
    settings.TANDEM_ARTIFACT_DIR = tmp_path / "artifacts"
    settings.TANDEM_MODEL_ROOTS = [tmp_path / "models"]
    cache.clear()
    calls = {"reward_runs": [], "rounds": []}
    monkeypatch.setattr(reward_worker.train_reward_model, "delay", calls["reward_runs"].append)
    monkeypatch.setattr(round_worker.run_round, "delay", calls["rounds"].append)
    yield calls
    cache.clear()


def _jobs(*, started_ago: timedelta):
    base = Checkpoint.objects.create(name="base", format=Checkpoint.Format.META, path="/models/base")
    started = timezone.now() - started_ago
    runs = [RewardModelRun.objects.create(kind=kind, base_checkpoint=base, manifest_sha256=f"{n}" * 64,
                                          status=JobStatus.RUNNING, started_at=started)
            for n, kind in enumerate(["helpfulness", "safety"])]
    rnd = RLHFRound.objects.create(policy_in=base, lineage_root=base, helpfulness_rm=runs[0], safety_rm=runs[1],
                                   status=JobStatus.RUNNING, started_at=started)
    return runs, rnd


@pytest.mark.django_db
def test_running_jobs_without_a_live_worker_are_sent_again_once(sent):
    runs, rnd = _jobs(started_ago=timedelta(minutes=10))
    # A worker died after writing checkpoints: the folder and its lock file exist, nobody holds the lock.
    with folder_lock(reward_services.run_output_dir(runs[0])):
        pass
    assert sweeper.requeue_orphaned_jobs() == {"reward_runs": [runs[0].pk, runs[1].pk], "rounds": [rnd.pk]}
    assert sent == {"reward_runs": [runs[0].pk, runs[1].pk], "rounds": [rnd.pk]}
    # The re-sent messages may wait behind a long queue: the next sweeps do not pile up copies.
    assert sweeper.requeue_orphaned_jobs() == {"reward_runs": [], "rounds": []}
    assert sent == {"reward_runs": [runs[0].pk, runs[1].pk], "rounds": [rnd.pk]}


@pytest.mark.django_db
def test_jobs_a_live_worker_holds_are_left_alone(sent):
    runs, rnd = _jobs(started_ago=timedelta(minutes=10))
    with folder_lock(reward_services.run_output_dir(runs[1])) as held, folder_lock(rounds.round_dir(rnd)):
        assert held and folder_is_locked(reward_services.run_output_dir(runs[1]))
        assert sweeper.requeue_orphaned_jobs() == {"reward_runs": [runs[0].pk], "rounds": []}
    assert not folder_is_locked(reward_services.run_output_dir(runs[1]))


@pytest.mark.django_db
def test_just_started_and_finished_jobs_are_left_alone(sent):
    runs, rnd = _jobs(started_ago=timedelta(seconds=5))
    assert sweeper.orphaned_jobs() == {"reward_runs": [], "rounds": []}
    RewardModelRun.objects.filter(pk=runs[0].pk).update(status=JobStatus.CANCELLED, started_at=timezone.now()
                                                        - timedelta(hours=1))
    assert sweeper.orphaned_jobs() == {"reward_runs": [], "rounds": []}
    assert sweeper.orphaned_jobs(grace=timedelta(0)) == {"reward_runs": [runs[1].pk], "rounds": [rnd.pk]}
