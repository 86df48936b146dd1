"""The demo policy's training on the "gpu" queue: one task per DemoPolicyBuild (policy.demo_services).

Safe under duplicate delivery: the task first takes an exclusive lock on the build's folder (flock,
released by the OS when the process dies; workers/locks.py), then moves the row from queued to
running under a row lock. A second delivery while a worker trains finds the lock held and returns;
one after the build finished finds it no longer active.

Idempotent and resumable: checkpoints already registered, or complete on disk, are taken as they are
and nothing is trained; each checkpoint is written whole or not at all, and a build that stopped
after demo-base resumes at demo-sft with the same result (policy.demo_policy). A worker killed
midway leaves the row "running"; the broker gives the message back (acks_late), or scripts/run sends
it again at its next start, and the next worker takes the lock and goes on. A worker asked to shut
down (Ctrl-C on scripts/run, SIGTERM) stops the build at its next step instead of finishing minutes
of training first, and puts the message back in the queue. Registration, the sampling jobs and
"succeeded" commit together, once (demo_build_succeed).

Torch is imported inside the task only: the web process imports this module to enqueue.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from celery import shared_task
from celery.exceptions import Reject

from policy import demo_services
from policy.demo_config import DemoBuildConfig
from policy.models import DemoPolicyBuild
from workers.locks import folder_lock

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 1.0  # at most one progress write (and cancellation check) per second, and each phase's last step
# Shares of the progress bar: the training steps, then the evaluation (a few seconds); registration ends it.
TRAINING_SHARE, EVAL_SHARE = 0.96, 0.03

# (phase, step done, total steps of the phase, metrics), as policy.demo_policy reports them
Progress = Callable[[str, int, int, Mapping[str, float]], None]


class BuildCancelled(Exception):
    """The build was cancelled while it trained: stop here (what is saved on disk stays)."""


class WorkerStopping(Exception):
    """The worker running the build is shutting down: stop here and leave the build running."""


def _worker_stopping() -> bool:
    """Whether this process is a Celery worker asked to shut down (always False outside a worker)."""
    from celery.worker import state

    # As celery.worker.state.maybe_shutdown reads them: a warm shutdown sets should_stop to 0 (EX_OK).
    return any(flag is not None and flag is not False for flag in (state.should_stop, state.should_terminate))


@shared_task(name="workers.demo.build_demo_policy", queue="gpu", acks_late=True)
def build_demo_policy(build_id: int) -> str:
    """Train (or take) and register the build's demo policy; returns what happened."""
    outcome = run_build(build_id)
    if outcome == "interrupted":  # back to the queue, for the next worker to resume
        raise Reject(f"demo policy build {build_id}: the worker shut down", requeue=True)
    return outcome


def run_build(build_id: int, echo: Progress | None = None) -> str:
    """Run or resume a build in this process: succeeded, failed, cancelled, interrupted (its worker is
    shutting down; the build stays running), busy (another live process holds it) or skipped (gone or
    finished). `echo` sees every step too (the command's progress bars)."""
    if _worker_stopping():
        return "interrupted"  # the message came back to a worker that is shutting down: leave it queued
    found = DemoPolicyBuild.objects.filter(pk=build_id).first()
    if found is None or not found.is_active:
        return "skipped"  # deleted, or a redelivered message of finished work
    with folder_lock(Path(found.out_dir)) as held:
        if not held:
            logger.info("demo policy build %s is being run by another process; this delivery does nothing", build_id)
            return "busy"
        build = demo_services.demo_build_claim(build_id=build_id)
        if build is None:
            return "skipped"
        try:
            built, source = _built(build, echo)
            done = demo_services.demo_build_succeed(build=build, built=built, source=source)
        except BuildCancelled:
            logger.info("demo policy build %s was cancelled while training", build_id)
            return "cancelled"
        except WorkerStopping:
            logger.info("demo policy build %s stops with its worker; it resumes when sent again", build_id)
            demo_services.demo_build_progress(build=build, phase=build.phase, progress=build.progress,
                                              message=f"Stopped with its worker during {build.phase or 'the start'}; "
                                                      "waiting for a worker to resume it.")
            return "interrupted"
        except Exception as error:  # the row says why; the worker lives on for the next task
            logger.exception("demo policy build %s failed", build_id)
            demo_services.demo_build_fail(build=build, error=f"{type(error).__name__}: {error}")
            return "failed"
        return "succeeded" if done is not None else "cancelled"


def _built(build: DemoPolicyBuild, echo: Progress | None) -> tuple[list[dict], str]:
    """The checkpoints to register and where they came from: registered already, complete on disk,
    or trained now."""
    config = DemoBuildConfig.from_dict(build.config)
    if demo_services.demo_checkpoints_registered(config=config) == {config.base_name, config.sft_name}:
        return [], "registered"
    found = demo_services.demo_checkpoints_found(out_dir=Path(build.out_dir), config=config)
    if found is not None:
        return found, "found on disk"
    # OpenMP threads that spin while waiting for a core another process holds make each training
    # step several times slower on a busy machine (the web server, annotators' sampling); passive
    # waiting costs little on an idle one. It only counts before torch is first loaded.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from policy.demo_policy import build_demo_policy as train

    return train(build.out_dir, config, _reporter(build, config, echo)), "trained"


def _reporter(build: DemoPolicyBuild, config: DemoBuildConfig, echo: Progress | None) -> Progress:
    """Progress on the build's row (shown live on /jobs/): the steps of demo-base, then demo-sft, then
    the evaluation. Raises BuildCancelled once the row is no longer running, WorkerStopping once the
    worker is asked to shut down."""
    total = max(1, config.base_steps + config.sft_steps)
    last_write = 0.0

    def report(phase: str, step: int, phase_total: int, metrics: Mapping[str, float]) -> None:
        nonlocal last_write
        if _worker_stopping():
            raise WorkerStopping(build.pk)
        if echo is not None:
            echo(phase, step, phase_total, metrics)
        now = time.monotonic()
        if step < phase_total and now - last_write < PROGRESS_INTERVAL_S:
            return
        last_write = now
        if phase == DemoPolicyBuild.Phase.EVAL:
            fraction = TRAINING_SHARE + EVAL_SHARE * step / max(1, phase_total)
            message = (f"Evaluating {config.sft_name} against {config.base_name} on {config.eval_prompts} held-out "
                       f"prompts: {step} of {phase_total} arms sampled.")
        else:
            done = step + (config.base_steps if phase == DemoPolicyBuild.Phase.SFT else 0)
            fraction = TRAINING_SHARE * done / total
            what = "pretraining" if phase == DemoPolicyBuild.Phase.BASE else "SFT on clean answers"
            loss = f", loss {metrics['loss']:.3f}" if "loss" in metrics else ""
            message = f"{phase} ({what}): step {step} of {phase_total}{loss}."
        if not demo_services.demo_build_progress(build=build, phase=phase, progress=fraction, message=message):
            raise BuildCancelled(build.pk)

    return report
