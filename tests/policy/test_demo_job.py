"""The demo policy as a job, in this process (workers.demo.run_build, the task's own code): progress on the
row and on /jobs/, registration and the sampling jobs once, duplicate deliveries, a build killed after
demo-base resuming to the same checkpoint, a worker's warm shutdown putting the build back, cancellation,
failure, checkpoints taken as they are; and the startup path (demo_setup, policy_demo_build --background)
without torch in a fresh process."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from django.core.exceptions import ValidationError
from django.db import IntegrityError
from django.urls import reverse

from policy import demo_services
from policy.checkpoints import sha256_of_checkpoint
from policy.demo_config import DemoBuildConfig
from policy.models import Checkpoint, DemoPolicyBuild, GenerationJob
from tests.conftest import REPO, assert_imports_no_torch
from webapp.jobs import JobStatus
from workers import demo as demo_worker
from workers.demo import build_demo_policy, run_build
from workers.locks import folder_lock

TINY = {"vocab_size": 512, "dim": 48, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 16,
        "max_seq_len": 160, "base_steps": 12, "base_lr": 5e-3, "base_dialogs": 200, "knowledge_repeats": 1,
        "sft_steps": 8, "sft_lr": 5e-3, "sft_dialogs": 200, "batch_size": 16, "warmup_steps": 2,
        "eval_prompts": 4, "eval_max_new_tokens": 8, "device": "cpu"}  # fmt: skip
CONFIG = DemoBuildConfig(**TINY)


class Killed(BaseException):
    """Stands for the worker process dying: nothing in the task catches it."""


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models; a second thread only waits for a busy core
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """An uninterrupted build of CONFIG, made directly: its folder and the sha256 of each checkpoint."""
    from policy.demo_policy import build_demo_policy

    root = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        built = build_demo_policy(root, CONFIG)
    finally:
        torch.set_num_threads(threads)
    return root, {item["name"]: item["sha256"] for item in built}


@pytest.fixture
def world(settings, tmp_path, monkeypatch):
    """Model roots in tmp_path, the default arms, and the broker replaced by a list of what was sent."""
    settings.TANDEM_MODEL_ROOTS = [tmp_path]
    settings.TANDEM_DEFAULT_ARMS = ""
    sent = {"builds": [], "generation": []}
    monkeypatch.setattr(demo_services, "_enqueue_build", sent["builds"].append)
    from policy import services

    monkeypatch.setattr(services, "_enqueue_generation", sent["generation"].append)
    return {"out": tmp_path / "demo", "sent": sent}


def request(capture, **kwargs) -> DemoPolicyBuild:
    with capture(execute=True):
        return demo_services.demo_build_request(config=CONFIG, **kwargs)


@pytest.mark.django_db
def test_request_queues_one_build_per_folder_and_sends_it_again(world, django_capture_on_commit_callbacks):
    build = request(django_capture_on_commit_callbacks, answer=3)
    assert (build.status, build.out_dir, build.answer) == (JobStatus.QUEUED, str(world["out"]), 3)
    assert build.config == asdict(CONFIG) and "Waiting for a worker" in build.progress_message
    assert world["sent"]["builds"] == [build.pk]
    # Asked again (scripts/run's next start): the same build, sent again, in case its worker died.
    assert request(django_capture_on_commit_callbacks, answer=3) == build
    assert world["sent"]["builds"] == [build.pk, build.pk] and DemoPolicyBuild.objects.count() == 1
    with django_capture_on_commit_callbacks(execute=True):
        demo_services.demo_build_request(config=CONFIG, enqueue=False)
    assert world["sent"]["builds"] == [build.pk, build.pk]
    with pytest.raises(ValidationError, match="outside the model roots"):
        demo_services.demo_build_request(out="/somewhere/else")
    with pytest.raises(ValidationError, match="0 or more"):
        demo_services.demo_build_request(answer=-1)
    # The database itself refuses a second active build of one folder.
    with pytest.raises(IntegrityError):
        DemoPolicyBuild.objects.create(out_dir=build.out_dir, config=build.config)


@pytest.mark.django_db
def test_a_build_reports_each_step_registers_once_and_answers_demo_prompts(
    world, reference, client, make_user, monkeypatch, django_capture_on_commit_callbacks,
):
    from annotation import services as annotation_services

    early = annotation_services.prompt_write(author=make_user("early-bird"), text="Written before any policy?")
    build = demo_services.demo_build_request(config=CONFIG, answer=5, enqueue=False)
    client.force_login(make_user("res", role="researcher"))
    monkeypatch.setattr(demo_worker, "PROGRESS_INTERVAL_S", 0.0)  # every step is written
    progress, record = [], demo_services.demo_build_progress
    shown = []

    def recording(**kwargs):
        written = record(**kwargs)
        progress.append(DemoPolicyBuild.objects.values_list("status", "phase", "progress", "progress_message").get())
        if len(progress) == TINY["base_steps"] + 2:  # two steps into demo-sft: what /jobs/ shows now
            shown.append({job["key"]: job for job in client.get(reverse("jobs-status")).json()["jobs"]})
        return written

    monkeypatch.setattr(demo_services, "demo_build_progress", recording)
    with django_capture_on_commit_callbacks(execute=True):
        assert run_build(build.pk) == "succeeded"

    # Every step of demo-base, then of demo-sft, then both arms of the evaluation, in order, on the row.
    base, sft = TINY["base_steps"], TINY["sft_steps"]
    expected = ([("demo-base", f"demo-base (pretraining): step {k} of {base}") for k in range(1, base + 1)]
                + [("demo-sft", f"demo-sft (SFT on clean answers): step {k} of {sft}") for k in range(1, sft + 1)]
                + [("eval", f"{k} of 2 arms sampled") for k in (1, 2)])
    assert len(progress) == len(expected)
    for (status, phase, fraction, message), (want_phase, want_message) in zip(progress, expected):
        assert status == JobStatus.RUNNING and phase == want_phase and want_message in message
    fractions = [row[2] for row in progress]
    assert fractions == sorted(fractions) and 0 < fractions[0] and fractions[-1] < 1
    assert fractions[base - 1] == pytest.approx(demo_worker.TRAINING_SHARE * base / (base + sft))
    job = shown[0][f"demo-{build.pk}"]
    assert job["status"] == "running" and job["active"] and job["progress"] == fractions[base + 1]
    assert job["message"].startswith(f"demo-sft (SFT on clean answers): step 2 of {sft}, loss ")

    build.refresh_from_db()
    assert (build.status, build.progress, build.phase, build.error) == (JobStatus.SUCCEEDED, 1.0, "register", "")
    assert build.started_at <= build.finished_at
    assert build.metrics["source"] == "trained" and build.metrics["eval"]["n"] == 4
    assert build.metrics["demo-base"]["steps"] == base and build.metrics["demo-sft"]["steps"] == sft
    base_ckpt, sft_ckpt = Checkpoint.objects.get(name="demo-base"), Checkpoint.objects.get(name="demo-sft")
    assert (base_ckpt.parent, sft_ckpt.parent, sft_ckpt.path) == (None, base_ckpt, str(world["out"] / "demo-sft"))
    # Deterministic: the same checkpoints as a build made directly with the same config.
    assert {c.name: c.sha256 for c in (base_ckpt, sft_ckpt)} == reference[1]

    # The prompt written before any policy existed, then 5 demo prompts, sent to the workers.
    waiting, answering = GenerationJob.objects.order_by("id")
    assert list(waiting.prompts.all()) == [early] and answering.prompts.count() == 5
    assert (answering.arm_a_checkpoint, answering.arm_a_temperature, answering.arm_b_checkpoint,
            answering.arm_b_temperature) == (sft_ckpt, 0.7, base_ckpt, 1.0)
    assert world["sent"]["generation"] == [waiting.pk, answering.pk]
    assert (build.metrics["waiting_job"], build.metrics["answer_job"]) == (waiting.pk, answering.pk)
    assert f"Sampling job {answering.pk} answers 5 demo prompts" in build.progress_message

    # Duplicate deliveries after the end: nothing trains, registers or samples again.
    weights = (world["out"] / "demo-sft" / "consolidated.00.pth").stat().st_mtime_ns
    with django_capture_on_commit_callbacks(execute=True):
        assert run_build(build.pk) == "skipped"
        assert demo_services.demo_build_succeed(build=build, built=[], source="registered") is None
    assert Checkpoint.objects.count() == 2 and GenerationJob.objects.count() == 2
    assert world["sent"]["generation"] == [waiting.pk, answering.pk]
    assert (world["out"] / "demo-sft" / "consolidated.00.pth").stat().st_mtime_ns == weights
    assert run_build(10**9) == "skipped"


@pytest.mark.django_db
def test_a_delivery_while_another_process_holds_the_build_does_nothing(world):
    build = demo_services.demo_build_request(config=CONFIG, enqueue=False)
    with folder_lock(world["out"]) as held:
        assert held
        assert run_build(build.pk) == "busy"
    build.refresh_from_db()
    assert (build.status, build.started_at) == (JobStatus.QUEUED, None)


@pytest.mark.django_db
def test_a_build_killed_after_demo_base_resumes_at_demo_sft_to_the_same_checkpoints(world, reference):
    build = demo_services.demo_build_request(config=CONFIG, answer=0, enqueue=False)

    def die_in_sft(phase, step, total, metrics):
        if phase == "demo-sft":
            raise Killed

    with pytest.raises(Killed):
        run_build(build.pk, die_in_sft)
    build.refresh_from_db()
    assert build.status == JobStatus.RUNNING and build.phase == "demo-base"  # what a dead worker leaves
    assert (world["out"] / "demo-base" / "params.json").is_file() and not (world["out"] / "demo-sft").exists()
    assert not Checkpoint.objects.exists()

    seen = []
    assert run_build(build.pk, lambda phase, step, total, metrics: seen.append((phase, step))) == "succeeded"
    assert seen[0] == ("demo-base", TINY["base_steps"])  # kept from before, not trained again
    assert [s for p, s in seen if p == "demo-sft"] == list(range(1, TINY["sft_steps"] + 1))
    build.refresh_from_db()
    assert build.status == JobStatus.SUCCEEDED and build.metrics["resumed_at"] == "demo-sft"
    assert {c.name: c.sha256 for c in Checkpoint.objects.all()} == reference[1]
    assert sha256_of_checkpoint(world["out"] / "demo-sft") == reference[1]["demo-sft"]


@pytest.mark.django_db
def test_a_worker_shutting_down_stops_the_build_at_the_next_step_and_puts_it_back(world, monkeypatch):
    from celery.exceptions import Reject
    from celery.worker import state

    build = demo_services.demo_build_request(config=CONFIG, enqueue=False)
    monkeypatch.setattr(demo_worker, "PROGRESS_INTERVAL_S", 0.0)
    record, steps = demo_services.demo_build_progress, []

    def warm_shutdown_after_step_3(**kwargs):
        steps.append(kwargs["message"])
        if "step 3 of" in kwargs["message"]:
            monkeypatch.setattr(state, "should_stop", 0)  # what Ctrl-C or SIGTERM sets in a worker (0: EX_OK)
        return record(**kwargs)

    monkeypatch.setattr(demo_services, "demo_build_progress", warm_shutdown_after_step_3)
    with pytest.raises(Reject) as rejected:
        build_demo_policy(build.pk)  # the task, as the worker runs it
    assert rejected.value.requeue  # the message goes back to the queue
    assert len(steps) == 4 and "step 3 of" in steps[2]  # no fourth step: the stop note instead
    build.refresh_from_db()
    assert (build.status, build.phase, build.finished_at) == (JobStatus.RUNNING, "demo-base", None)
    assert build.progress_message == "Stopped with its worker during demo-base; waiting for a worker to resume it."
    assert not Checkpoint.objects.exists()

    monkeypatch.setattr(state, "should_stop", None)  # the next worker
    monkeypatch.setattr(demo_services, "demo_build_progress", record)
    assert run_build(build.pk) == "succeeded"
    build.refresh_from_db()
    assert build.status == JobStatus.SUCCEEDED and Checkpoint.objects.count() == 2


@pytest.mark.django_db
def test_checkpoints_on_disk_or_registered_are_taken_without_training(world, reference, monkeypatch):
    import policy.demo_policy

    def must_not_train(*args, **kwargs):
        raise AssertionError("trained although the checkpoints were there")

    monkeypatch.setattr(policy.demo_policy, "build_demo_policy", must_not_train)
    for name in ("demo-base", "demo-sft"):  # a complete pair on disk, not registered (a database reset)
        shutil.copytree(reference[0] / name, world["out"] / name)
    build = demo_services.demo_build_request(config=CONFIG, enqueue=False)
    assert run_build(build.pk) == "succeeded"
    build.refresh_from_db()
    assert build.metrics == {"source": "found on disk"} and "from " + str(world["out"]) in build.progress_message
    assert {c.name: c.sha256 for c in Checkpoint.objects.all()} == reference[1]
    assert Checkpoint.objects.get(name="demo-sft").parent == Checkpoint.objects.get(name="demo-base")
    shutil.rmtree(world["out"])
    again = demo_services.demo_build_request(config=CONFIG, enqueue=False)
    assert again != build and run_build(again.pk) == "succeeded"
    again.refresh_from_db()
    assert again.metrics == {"source": "registered"} and Checkpoint.objects.count() == 2


@pytest.mark.django_db
def test_a_cancelled_build_stops_and_a_failing_one_says_why(world, monkeypatch):
    build = demo_services.demo_build_request(config=CONFIG, enqueue=False)

    def cancel_in_base(phase, step, total, metrics):
        if step == 3:
            DemoPolicyBuild.objects.filter(pk=build.pk).update(status=JobStatus.CANCELLED)

    monkeypatch.setattr(demo_worker, "PROGRESS_INTERVAL_S", 0.0)
    assert run_build(build.pk, cancel_in_base) == "cancelled"
    build.refresh_from_db()
    assert build.status == JobStatus.CANCELLED and "step 2 of" in build.progress_message
    assert not Checkpoint.objects.exists() and not (world["out"] / "demo-base").exists()

    import policy.demo_policy

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(policy.demo_policy, "build_demo_policy", broken)
    failing = demo_services.demo_build_request(config=CONFIG, enqueue=False)
    assert run_build(failing.pk) == "failed"
    failing.refresh_from_db()
    assert (failing.status, failing.error) == (JobStatus.FAILED, "RuntimeError: out of memory")
    assert failing.finished_at is not None and not Checkpoint.objects.exists()


def test_the_web_side_and_the_startup_commands_import_no_torch(tmp_path):
    assert_imports_no_torch("import policy.demo_services, policy.demo_config, workers.demo, webapp.dashboard, "
                            "policy.management.commands.policy_demo_build, annotation.management.commands.demo_setup")
    # What scripts/run does before the server starts, in a fresh process on a fresh database: the
    # address and the logins are the last lines, at HOST:PORT; the build is queued, nothing trained.
    code = ("import django, sys; django.setup(); from django.core.management import call_command; "
            "call_command('migrate', verbosity=0); call_command('demo_setup'); "
            "call_command('policy_demo_build', '--if-missing', '--answer', '30', '--background'); "
            "sys.exit('torch imported' if 'torch' in sys.modules else 0)")
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "webapp.settings", "TANDEM_VAR_DIR": str(tmp_path),
           "DATABASE_URL": f"sqlite:///{tmp_path / 'run.sqlite3'}", "CELERY_BROKER_URL": "filesystem://localhost/",
           "TANDEM_BROKER_DIR": str(tmp_path / "broker"), "HOST": "127.0.0.9", "PORT": "8129"}
    env.pop("TANDEM_MODEL_ROOTS", None)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:] or result.stdout
    lines = result.stdout.splitlines()
    banner = lines[lines.index(next(line for line in lines if line.startswith("Tandem is at "))):]
    assert banner[0] == ("Tandem is at http://127.0.0.9:8129/  (admin: http://127.0.0.9:8129/admin/); log in as:")
    assert [line.split()[1:] for line in banner[1:5]] == [
        ["annotator", "/", "annotate-me"], ["annotator2", "/", "annotate-me-too"], ["researcher", "/", "research-me"],
        ["admin", "/", "admin-me"]]
    assert "Demo policy build 1: a worker trains demo-base and demo-sft" in banner[5]
    assert len(list((tmp_path / "broker" / "queue").glob("*.gpu.msg"))) == 1
    assert not (tmp_path / "models" / "demo" / "demo-base").exists()
