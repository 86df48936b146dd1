"""RLHF rounds through the broker and real worker processes: a tiny round end to end (one checkpoint, the
next batch's comparisons answered by the same worker); a worker killed mid-PPO, then two workers given the
round at once: it resumes from the last saved PPO state and exactly one checkpoint comes out."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from annotation.models import Comparison
from policy import rounds
from policy.models import Checkpoint, GenerationJob, RLHFRound
from tests.conftest import REPO, _worker_database_url, wait_for
from tests.policy import round_fixtures as rf
from webapp.jobs import JobStatus
from workers.rounds import run_round


@pytest.fixture(scope="session")
def worker_world():
    yield rf.build_world("worker")
    shutil.rmtree(rf.MODEL_ROOT / "worker", ignore_errors=True)


@pytest.fixture
def world(worker_world, settings):
    # The model root is the worker's first root too (round_fixtures.MODEL_ROOT lies inside it), where
    # both processes find the round's folder.
    settings.TANDEM_DEFAULT_ARMS = ""
    sft, helpful, safety = rf.register(worker_world)
    return {"policy": sft, "helpful": helpful, "safety": safety, "prompts": rf.demo_prompts(8)}


def launch(world, config):
    return rounds.round_launch(policy=world["policy"], helpfulness_rm=world["helpful"], safety_rm=world["safety"],
                               prompts=world["prompts"], config=config, stages=["rejection_sampling", "sft", "ppo"])


@pytest.mark.worker
@pytest.mark.django_db(transaction=True)
def test_a_round_runs_through_the_worker_and_its_checkpoint_answers_the_next_batch(celery_worker_process, world):
    rnd = launch(world, rf.TINY_ROUND)
    run_round.delay(rnd.pk)  # a duplicated message: done (or skipped) after the first, never a second checkpoint
    rnd = wait_for(lambda: RLHFRound.objects.filter(pk=rnd.pk).exclude(status__in=["queued", "running"]).first(),
                   timeout=180, what="the round to finish")
    assert rnd.status == JobStatus.SUCCEEDED, rnd.error
    out = rnd.checkpoint_out
    assert (out.parent, out.produced_by_id, out.format) == (world["policy"], rnd.pk, Checkpoint.Format.TRAINED)
    job = GenerationJob.objects.get(pk=rnd.metrics["next_batch_job"])
    wait_for(lambda: GenerationJob.objects.filter(pk=job.pk, status=JobStatus.SUCCEEDED).exists(), timeout=120,
             what="the next batch's responses")
    made = Comparison.objects.filter(response_a__checkpoint=out, response_b__checkpoint=world["policy"])
    assert made.count() == 3
    time.sleep(1)  # let the duplicated message be handled too
    assert Checkpoint.objects.filter(produced_by=rnd).count() == 1
    assert celery_worker_process.poll() is None


def start_worker(queue: str, name: str, log) -> subprocess.Popen:
    env = {**os.environ, "DATABASE_URL": _worker_database_url(), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "webapp", "worker", "-Q", queue, "--pool=solo", "--without-gossip",
             "--without-mingle", "--without-heartbeat", "-l", "info", "-n", f"{name}-{os.getpid()}@%h"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )


def stop(process: subprocess.Popen, sig=signal.SIGTERM) -> None:
    if process.poll() is None:
        os.killpg(process.pid, sig)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_ready(process: subprocess.Popen, log) -> None:
    wait_for(lambda: "ready." in log.read_text() or process.poll() is not None, timeout=90, what="a worker to start")
    assert process.poll() is None, log.read_text()[-3000:]


@pytest.mark.worker
@pytest.mark.django_db(transaction=True)
def test_a_killed_worker_resumes_and_two_deliveries_make_one_checkpoint(world, monkeypatch, tmp_path):
    from django.conf import settings

    if settings.CELERY_BROKER_URL.startswith("redis"):
        import redis

        try:
            redis.Redis.from_url(settings.CELERY_BROKER_URL, socket_connect_timeout=2).ping()
        except redis.exceptions.ConnectionError:
            if os.environ.get("TANDEM_REQUIRE_WORKER") == "1":
                raise
            pytest.skip("Redis broker is not reachable")
    # A queue of this test's own, so that only the workers started here (and killed here) take the round.
    queue = f"gpu-rounds-test-{os.getpid()}"
    monkeypatch.setattr(rounds, "_enqueue_round", lambda round_id: run_round.apply_async((round_id,), queue=queue))
    config = {**rf.TINY_ROUND, "rejection_sampling": {"k": 2, "max_new_tokens": 16, "chunk_prompts": 3},
              "ppo": {**rf.TINY_ROUND["ppo"], "n_iterations": 40, "batch_size": 6, "mini_batch_size": 3,
                      "max_new_tokens": 24}, "next_batch": {"prompts": 0}}
    logs = [tmp_path / f"worker{i}.log" for i in range(3)]
    first = start_worker(queue, "rounds-a", logs[0])
    workers = [first]
    try:
        wait_ready(first, logs[0])
        rnd = launch(world, config)
        wait_for(lambda: ((RLHFRound.objects.get(pk=rnd.pk).metrics or {}).get("ppo") or {}).get("iterations", 0) >= 2,
                 timeout=180, what="PPO to be two iterations in")
        stop(first, signal.SIGKILL)  # mid-PPO, without any chance to clean up
        rnd.refresh_from_db()
        assert rnd.status == JobStatus.RUNNING and rnd.current_stage == "ppo" and rnd.checkpoint_out is None
        samples = rounds.round_dir(rnd) / "rejection_sampling" / "samples"
        written = {p.name: p.stat().st_mtime_ns for p in samples.iterdir()}

        # The round is sent again (the admin's resume action) twice, to two fresh workers at once.
        workers += [start_worker(queue, "rounds-b", logs[1]), start_worker(queue, "rounds-c", logs[2])]
        for process, log in zip(workers[1:], logs[1:]):
            wait_ready(process, log)
        rounds.round_resume(rnd=rnd)
        rounds.round_resume(rnd=rnd)
        rnd = wait_for(lambda: RLHFRound.objects.filter(pk=rnd.pk).exclude(status="running").first(), timeout=240,
                       what="the resumed round to finish")
        assert rnd.status == JobStatus.SUCCEEDED, rnd.error
        assert rnd.metrics["ppo"]["resumed_from_iteration"] >= 1  # from the last saved state, not from scratch
        assert [p["iteration"] for p in rnd.metrics["ppo"]["curve"]] == list(range(1, 41))
        assert {p.name: p.stat().st_mtime_ns for p in samples.iterdir()} == written  # sampling not redone
        wait_for(lambda: sum(log.read_text().count("run_round[") for log in logs[1:]) >= 4, timeout=60,
                 what="both deliveries to be handled")  # received + finished, twice
        outcomes = "".join(log.read_text() for log in logs[1:])
        assert outcomes.count("'succeeded'") == 1 and outcomes.count("'busy'") + outcomes.count("'skipped'") == 1
        assert Checkpoint.objects.filter(produced_by=rnd).count() == 1
    finally:
        for process in workers:
            stop(process)
        from django.db import connections

        connections.close_all()
