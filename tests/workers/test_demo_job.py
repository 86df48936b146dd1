"""The demo policy built by a real worker process through the broker, as scripts/run has it built: queued
by `policy_demo_build --background`, progress on the row while it trains, delivered three times but
trained and registered once, and its sampling job for the demo prompts answered by the same worker."""

import os
import shutil
import time
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.core.management import call_command

from annotation.models import Comparison
from policy import demo_services
from policy.demo_config import DemoBuildConfig
from policy.models import Checkpoint, DemoPolicyBuild, GenerationJob
from tests.conftest import wait_for
from webapp.jobs import JobStatus
from workers.demo import build_demo_policy

# Inside the first model root, which the worker process shares (it reads its roots when it starts).
SUFFIX = os.environ.get("TANDEM_TEST_DB_SUFFIX", "")
OUT_ROOT = Path(django_settings.TANDEM_MODEL_ROOTS[0]) / f"test-demo-job{SUFFIX}-{os.getpid()}"
# Tiny, but with enough steps that each phase lasts a second or so: long enough to be seen on the row.
TINY = {"vocab_size": 512, "dim": 48, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 16,
        "max_seq_len": 160, "base_steps": 30, "base_lr": 5e-3, "base_dialogs": 400, "knowledge_repeats": 1,
        "sft_steps": 60, "sft_lr": 5e-3, "sft_dialogs": 400, "batch_size": 16, "warmup_steps": 3,
        "eval_prompts": 4, "eval_max_new_tokens": 8, "device": "cpu"}  # fmt: skip


@pytest.fixture
def out_dir(settings):
    settings.TANDEM_DEFAULT_ARMS = ""
    shutil.rmtree(OUT_ROOT, ignore_errors=True)
    yield OUT_ROOT / "demo"
    shutil.rmtree(OUT_ROOT, ignore_errors=True)


@pytest.mark.worker
@pytest.mark.django_db(transaction=True)
def test_the_worker_trains_registers_once_and_answers_the_demo_prompts(celery_worker_process, out_dir):
    overrides = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]
    call_command("policy_demo_build", "--out", str(out_dir), *overrides, "--if-missing", "--answer", "4",
                 "--background")
    build = DemoPolicyBuild.objects.get()
    # Delivered twice more: asked again (as scripts/run's next start does) and the task sent once more.
    assert demo_services.demo_build_request(config=DemoBuildConfig(**TINY), out=str(out_dir), answer=4) == build
    build_demo_policy.delay(build.pk)

    seen = []  # what /jobs/ would show, polled meanwhile
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        row = DemoPolicyBuild.objects.values_list("status", "phase", "progress", "progress_message").get()
        if not seen or seen[-1] != row:
            seen.append(row)
        if row[0] not in (JobStatus.QUEUED, JobStatus.RUNNING):
            break
        time.sleep(0.05)
    build.refresh_from_db()
    assert build.status == JobStatus.SUCCEEDED, build.error or seen[-1]
    running = [row for row in seen if row[0] == JobStatus.RUNNING]
    assert {"demo-base", "demo-sft"} <= {phase for _, phase, _, _ in running}, seen
    assert any(message.startswith("demo-base (pretraining): step ") for *_, message in running), seen
    assert any(message.startswith("demo-sft (SFT on clean answers): step ") for *_, message in running), seen
    fractions = [fraction for _, _, fraction, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0

    base, sft = Checkpoint.objects.get(name="demo-base"), Checkpoint.objects.get(name="demo-sft")
    assert sft.parent == base and sft.path == str(out_dir / "demo-sft") and build.metrics["source"] == "trained"
    job = GenerationJob.objects.get(pk=build.metrics["answer_job"])
    assert (job.arm_a_checkpoint, job.arm_b_checkpoint, job.prompts.count()) == (sft, base, 4)
    # The worker takes the sampling job after the build; the two extra deliveries were queued before it.
    wait_for(lambda: GenerationJob.objects.filter(pk=job.pk, status=JobStatus.SUCCEEDED).exists(), timeout=120,
             what="the demo prompts to be answered")
    assert Comparison.objects.filter(response_a__checkpoint=sft, response_b__checkpoint=base).count() == 4
    weights = (out_dir / "demo-sft" / "consolidated.00.pth").stat().st_mtime_ns
    finished = build.finished_at
    time.sleep(1)
    build.refresh_from_db()
    assert (build.status, build.finished_at) == (JobStatus.SUCCEEDED, finished)
    assert (out_dir / "demo-sft" / "consolidated.00.pth").stat().st_mtime_ns == weights
    assert (Checkpoint.objects.count(), GenerationJob.objects.count(), DemoPolicyBuild.objects.count()) == (2, 1, 1)
    assert celery_worker_process.poll() is None
