"""Writes of the demo policy's build (DemoPolicyBuild): queue it, claim it, record its progress, and
register what it trained, then have it answer demo-world prompts.

scripts/run queues a build at startup (`policy_demo_build --background`) and starts the site at
once; a worker on the "gpu" queue trains it (workers/demo.py), or `policy_demo_build` runs the same
task function in its own process. This module runs in the web process too and never imports torch.
"""
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from webapp.jobs import ACTIVE_STATUSES, JobStatus

from . import services
from .demo_config import DemoBuildConfig
from .models import Checkpoint, DemoPolicyBuild

logger = logging.getLogger(__name__)

DEMO_FOLDER = "demo"  # under the first model root


def demo_out_dir(out: str | None = None) -> Path:
    """The folder the demo checkpoints go to (default: <first model root>/demo), refused unless it is
    inside the model roots, where the workers may load checkpoints from."""
    roots = settings.TANDEM_MODEL_ROOTS
    default = str(Path(roots[0]) / DEMO_FOLDER) if roots else DEMO_FOLDER  # no roots: refused just below
    return services.resolve_in_model_roots(out or default, field="out")


def demo_checkpoints_registered(*, config: DemoBuildConfig) -> set[str]:
    """Which of the config's two checkpoint names are registered."""
    return set(Checkpoint.objects.filter(name__in=[config.base_name, config.sft_name]).values_list("name", flat=True))


def demo_checkpoints_found(*, out_dir: Path, config: DemoBuildConfig) -> list[dict] | None:
    """Both checkpoints as build_demo_policy describes them, when both lie complete in out_dir (each
    is written whole or not at all, so params.json means a complete folder); else None."""
    if not all((out_dir / name / "params.json").is_file() for name in (config.base_name, config.sft_name)):
        return None
    return [
        {"name": name, "path": str(out_dir / name), "parent": parent,
         "tokenizer_path": str(out_dir / name / "tokenizer.model")}
        for name, parent in ((config.base_name, None), (config.sft_name, config.base_name))
    ]  # fmt: skip


def _enqueue_build(build_id: int) -> None:
    from workers.demo import build_demo_policy  # no torch at import time: the task loads it lazily

    build_demo_policy.delay(build_id)


@transaction.atomic
def demo_build_request(
    *, config: DemoBuildConfig | None = None, out: str | None = None, answer: int = 0, enqueue: bool = True,
) -> DemoPolicyBuild:
    """The build of the demo policy into `out`: the active one for that folder, or a new one.

    With `enqueue`, its task goes to the workers once this transaction commits, also when the build
    was there already: a build whose worker died is taken up again that way (scripts/run asks at every
    start), and a second message for a build a live worker holds does nothing (workers/demo.py).
    """
    config = config or DemoBuildConfig()
    out_dir = demo_out_dir(out)
    if isinstance(answer, bool) or not isinstance(answer, int) or answer < 0:
        raise ValidationError({"answer": "A number of prompts, 0 or more."})
    active = DemoPolicyBuild.objects.filter(out_dir=str(out_dir), status__in=ACTIVE_STATUSES)
    build = active.first()
    if build is None:
        try:
            with transaction.atomic():  # a request racing this one creates it first: then take that one
                build = DemoPolicyBuild.objects.create(
                    config=asdict(config), out_dir=str(out_dir), answer=answer,
                    progress_message=f"Waiting for a worker to train {config.base_name} and {config.sft_name}.",
                )  # fmt: skip
        except IntegrityError:
            build = active.get()
    if enqueue:
        # robust: a broker that is down must not undo the row; the next request sends it again.
        transaction.on_commit(lambda: _enqueue_build(build.pk), robust=True)
    return build


@transaction.atomic
def demo_build_claim(*, build_id: int) -> DemoPolicyBuild | None:
    """Queued -> running under a row lock; a running build stays running (its worker died and it is
    resumed). None for a build that is gone, finished or cancelled."""
    build = DemoPolicyBuild.objects.select_for_update().filter(pk=build_id).first()
    if build is None or not build.is_active:
        return None
    message = ("Started: training the tokenizer." if build.status == JobStatus.QUEUED
               else f"Resuming (stopped during {build.phase or 'the start'}).")
    build.save(update_fields=build.set_running(message=message))
    return build


def demo_build_progress(*, build: DemoPolicyBuild, phase: str, progress: float, message: str) -> bool:
    """Record where a running build is; False when it is no longer running (cancelled): stop there."""
    build.phase = phase
    build.set_progress(progress=progress, message=message)
    updated = DemoPolicyBuild.objects.filter(pk=build.pk, status=JobStatus.RUNNING).update(
        phase=build.phase, progress=build.progress, progress_message=build.progress_message)
    return bool(updated)


@transaction.atomic
def demo_build_fail(*, build: DemoPolicyBuild, error: str) -> None:
    """Mark an active build failed, with the reason (a finished or cancelled one is left as it is)."""
    current = DemoPolicyBuild.objects.select_for_update().filter(pk=build.pk).first()
    if current is None or not current.is_active:
        return
    current.status, current.error, current.finished_at = JobStatus.FAILED, error or "unknown error", timezone.now()
    fields = ["status", "error", "finished_at", *current.set_progress(message="Failed.")]
    current.save(update_fields=fields)


def _metrics(built: list[dict], source: str) -> dict[str, Any]:
    """What the build row keeps: where the checkpoints came from, each one's training metrics, the
    oracle's evaluation and the build time (both checkpoints' metrics carry the last two)."""
    metrics: dict[str, Any] = {"source": source}
    for item in built:
        if "metrics" not in item:  # found on disk: only what it takes to register it
            continue
        own = dict(item["metrics"])
        for shared in ("eval", "build_seconds", "resumed_at"):
            if shared in own:
                metrics[shared] = own.pop(shared)
        metrics[item["name"]] = own
    return metrics


@transaction.atomic
def demo_build_succeed(*, build: DemoPolicyBuild, built: list[dict], source: str) -> DemoPolicyBuild | None:
    """Register the checkpoints (names already registered keep their rows), have the default arms
    answer the prompts waiting for answers and `build.answer` demo-world prompts, and mark the build
    succeeded: all in one transaction, under the build's row lock, so it happens once. The sampling
    jobs go to the workers when it commits. None when the build is no longer running (cancelled)."""
    current = DemoPolicyBuild.objects.select_for_update().filter(pk=build.pk).first()
    if current is None or current.status != JobStatus.RUNNING:
        return None
    config = DemoBuildConfig.from_dict(current.config)
    services.demo_checkpoints_register(built=[{key: item[key] for key in ("name", "path", "tokenizer_path", "parent")}
                                              for item in built])
    metrics = _metrics(built, source)
    message = {"trained": f"Trained and registered {config.base_name} and {config.sft_name}.",
               "found on disk": f"Registered {config.base_name} and {config.sft_name} from {current.out_dir}.",
               "registered": f"{config.base_name} and {config.sft_name} were registered already."}[source]
    try:
        waiting = services.prompts_answer_waiting()
        answering = services.demo_prompts_answer(count=current.answer) if current.answer else None
    except ImproperlyConfigured as error:  # TANDEM_DEFAULT_ARMS: the policy is there; prompts wait for a fix
        logger.exception("demo policy build %s: the default sampling arms are misconfigured", current.pk)
        waiting = answering = None
        message += f" No prompts sent for answers: {error}"
    if waiting is not None:
        metrics["waiting_job"] = waiting.pk
        message += f" Sampling job {waiting.pk} answers {waiting.prompts.count()} waiting prompts."
    if answering is not None:
        metrics["answer_job"] = answering.pk
        message += f" Sampling job {answering.pk} answers {answering.prompts.count()} demo prompts."
    current.status, current.finished_at, current.phase, current.metrics = (
        JobStatus.SUCCEEDED, timezone.now(), DemoPolicyBuild.Phase.REGISTER, metrics)
    fields = ["status", "finished_at", "phase", "metrics", *current.set_progress(progress=1.0, message=message)]
    current.save(update_fields=fields)
    return current
