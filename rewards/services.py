"""Writes of the reward-model side: launching, cancelling and recording reward-model runs.

This module runs in the web process, which never imports torch: it reads the frozen batches through
their snapshot rows, builds the run's data mix with rewards.data (plain Python) to refuse bad input
before anything is created, and leaves the training to workers.rewards on the "gpu" queue.

A launch checks, before writing anything: the batches exist and are frozen; the base checkpoint is
registered, has weights inside the model roots and a tokenizer; the config overrides are known
fields with valid values; the mix has enough pairs to fill at least one optimizer step; and no run
of the same kind, base and data manifest is queued or running. Then it materializes the snapshot
(content-addressed, so the same batches give the same file), records its hash on the run, and
enqueues the task once the transaction commits.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from annotation import snapshots
from annotation.models import Batch
from policy.models import Checkpoint
from policy.recipes import REWARD_RECIPES, scale_of
from policy.services import checkpoint_files, resolve_in_model_roots
from rewards.config import RewardTrainConfig
from rewards.data import DataError, InsufficientData, build_mix
from webapp.jobs import ACTIVE_STATUSES, JobStatus

from .models import RewardKind, RewardModelRun

logger = logging.getLogger(__name__)

# Config fields a launch sets from its own arguments; an override of them is refused.
RUN_SET_KEYS = ("kind", "base_checkpoint", "tokenizer_path", "model_args")
# Defaults for runs launched here that differ from RewardTrainConfig's: a checkpoint every 50 steps,
# so a worker that dies loses little.
LAUNCH_DEFAULTS: dict[str, Any] = {"checkpoint_every": 50}
PAIR = "pair"  # launch both twins


def run_output_dir(run: RewardModelRun) -> Path:
    """Where a run's checkpoints and final model live (shared by every worker that may resume it).

    The creation time is part of the name, so a database that was reset never meets the folder of an
    older run with the same id (whose finished result a resume would otherwise return)."""
    stamp = run.created_at.strftime("%Y%m%dT%H%M%S%f")
    return Path(settings.TANDEM_ARTIFACT_DIR) / "reward_models" / f"run-{run.pk}-{stamp}"


# --- checks --------------------------------------------------------------------------------------


def _frozen_batches(batches: Sequence[Batch]) -> list[Batch]:
    batches = list(batches)
    if not batches:
        raise ValidationError({"batches": "Name at least one frozen batch to train on."})
    if any(not isinstance(b, Batch) or b.pk is None for b in batches):
        raise ValidationError({"batches": "Batches must be saved Batch rows."})
    fresh = list(Batch.objects.filter(pk__in=[b.pk for b in batches]).order_by("label"))
    if len(fresh) != len({b.pk for b in batches}):
        raise ValidationError({"batches": "Some of these batches no longer exist."})
    if open_ := [b.label for b in fresh if not b.is_frozen]:
        raise ValidationError({"batches": f"Only frozen batches can be trained on; still open: {', '.join(open_)}. "
                                          "Freeze them first (their content is then hashed and fixed)."})
    return fresh


def _base_paths(checkpoint: Checkpoint) -> tuple[Path, Path]:
    """(weights folder, tokenizer file) of a base checkpoint, checked to exist inside the model roots."""
    if not isinstance(checkpoint, Checkpoint) or checkpoint.pk is None:
        raise ValidationError({"base_checkpoint": "Give a registered checkpoint."})
    if not checkpoint.has_weights or not checkpoint.path:
        raise ValidationError({"base_checkpoint": f"Checkpoint {checkpoint.name} has no weights (it only holds "
                                                  "external answers); a reward model starts from a model's weights."})
    folder = resolve_in_model_roots(checkpoint.path, field="base_checkpoint")
    fmt = Checkpoint.Format.META if checkpoint.format == Checkpoint.Format.TRAINED else checkpoint.format
    try:
        checkpoint_files(folder, fmt)
    except ValidationError as error:
        raise ValidationError({"base_checkpoint": f"Checkpoint {checkpoint.name}: {' '.join(error.messages)}"}) from None
    if checkpoint.tokenizer_path:
        tokenizer = resolve_in_model_roots(checkpoint.tokenizer_path, field="base_checkpoint")
    else:
        tokenizer = next((p for p in (folder / "tokenizer.model", folder.parent / "tokenizer.model") if p.is_file()),
                         folder / "tokenizer.model")
    if not tokenizer.is_file():
        raise ValidationError({"base_checkpoint": f"Checkpoint {checkpoint.name} has no tokenizer ({tokenizer})."})
    return folder, tokenizer


def reward_config_build(*, kind: str, base_checkpoint: Checkpoint, overrides: dict | None = None) -> dict[str, Any]:
    """The run's full RewardTrainConfig as JSON: launch defaults, then the overrides, then what the run sets."""
    if kind not in RewardKind.values:
        raise ValidationError({"kind": f"Must be one of {', '.join(RewardKind.values)}."})
    overrides = {} if overrides is None else overrides
    if not isinstance(overrides, dict):
        raise ValidationError({"config": "Must be a JSON object of RewardTrainConfig fields."})
    if fixed := sorted(set(overrides) & set(RUN_SET_KEYS)):
        raise ValidationError({"config": f"{', '.join(fixed)} come(s) from the run itself, not the config."})
    folder, tokenizer = _base_paths(base_checkpoint)
    recipe = REWARD_RECIPES[scale_of(base_checkpoint.params)]  # policy/recipes.py: the model's size picks it
    try:
        config = RewardTrainConfig.from_dict({**LAUNCH_DEFAULTS, **recipe, **overrides, "kind": kind,
                                              "base_checkpoint": str(folder), "tokenizer_path": str(tokenizer)})
    except (TypeError, ValueError) as error:
        raise ValidationError({"config": str(error)}) from None
    return orjson.loads(orjson.dumps(config.to_dict()))  # tuples become lists, as the JSON field stores it


def snapshot_rows(*, batches: Sequence[Batch]) -> tuple[list[dict], str]:
    """The rows a snapshot of these frozen batches holds, and its content hash, read without writing."""
    digest = hashlib.sha256()
    rows = []
    for line in snapshots.snapshot_lines(batches=batches):
        digest.update(line)
        rows.append(orjson.loads(line))
    return rows, digest.hexdigest()


def _mix_manifest(*, config: dict[str, Any], rows: list[dict], snapshot_sha256: str) -> dict[str, Any]:
    train_config = RewardTrainConfig.from_dict(config)
    try:
        mix = build_mix(rows, kind=train_config.kind, seed=train_config.seed, mix=train_config.mix,
                        input_hashes=[snapshot_sha256])
    except InsufficientData as error:
        raise ValidationError({"batches": f"Too little data: {error}."}) from None
    except DataError as error:
        raise ValidationError({"batches": f"The batches' rows cannot be trained on: {error}"}) from None
    step = train_config.micro_batch_size * train_config.grad_accum_steps
    if len(mix.train) < step:
        raise ValidationError({"batches": f"Too little data: {len(mix.train)} training pairs cannot fill one "
                                          f"optimizer step of {step} pairs (micro_batch_size x grad_accum_steps)."})
    return mix.manifest


# --- launching -----------------------------------------------------------------------------------


def reward_run_enqueue(*, run: RewardModelRun) -> None:
    """Send a queued or running run to the workers again (a lost message; a worker that died)."""
    if not run.is_active:
        raise ValidationError(f"Run #{run.pk} is {run.status}; only queued or running runs can be sent again.")
    transaction.on_commit(lambda: _enqueue(run.pk))


def _enqueue(run_id: int) -> None:
    from workers.rewards import train_reward_model  # no torch at import time: the task loads it lazily

    train_reward_model.delay(run_id)


def _prepare(*, kind: str, base_checkpoint: Checkpoint, batches: list[Batch], config: dict | None,
             rows: list[dict], snapshot_sha256: str) -> tuple[dict, dict]:
    full = reward_config_build(kind=kind, base_checkpoint=base_checkpoint, overrides=config)
    manifest = _mix_manifest(config=full, rows=rows, snapshot_sha256=snapshot_sha256)
    active = RewardModelRun.objects.filter(kind=kind, base_checkpoint=base_checkpoint,
                                           manifest_sha256=manifest["sha256"], status__in=ACTIVE_STATUSES).first()
    if active is not None:
        raise ValidationError({"batches": f"A {kind} reward model on {base_checkpoint.name} with this data is already "
                                          f"{active.status} (run #{active.pk}); wait for it or cancel it."})
    return full, manifest


def _create(*, kind, base_checkpoint, batches, config, manifest, snapshot, created_by, enqueue) -> RewardModelRun:
    counts = manifest["counts"]
    try:
        with transaction.atomic():  # a savepoint: the constraint's refusal leaves the outer transaction usable
            run = RewardModelRun.objects.create(
                kind=kind, base_checkpoint=base_checkpoint, config=config, data_manifest=manifest,
                manifest_sha256=manifest["sha256"], tokenizer_sha256=base_checkpoint.tokenizer_sha256,
                created_by=created_by,
                progress_message=f"Waiting for a GPU worker: {counts['train']} training pairs, {counts['test']} test pairs.",
            )
    except IntegrityError:  # launched concurrently with the same data: the constraint decides
        raise ValidationError({"batches": f"A {kind} reward model on {base_checkpoint.name} with this data is "
                                          "already queued or running."}) from None
    run.batches.set(batches)
    run.snapshots.set([snapshot])
    if enqueue:
        # robust: a broker that is down must not undo the launch; the run stays queued and can be
        # sent again (manage.py reward_train --resend).
        transaction.on_commit(lambda: _enqueue(run.pk), robust=True)
    return run


@transaction.atomic
def reward_runs_launch(
    *, kinds: Sequence[str], base_checkpoint: Checkpoint, batches: Sequence[Batch], config: dict | None = None,
    created_by: AbstractBaseUser | None = None, enqueue: bool = True,
) -> list[RewardModelRun]:
    """Launch one run per kind (both twins: ["helpfulness", "safety"]) on the same frozen batches.

    Every check of every kind runs before anything is written; on any error nothing is created.
    The workers pick the runs up once the transaction commits (queue "gpu"); enqueue=False leaves
    them queued for the caller to run (manage.py reward_train --inline).
    """
    kinds = list(dict.fromkeys(kinds))
    if not kinds or any(k not in RewardKind.values for k in kinds):
        raise ValidationError({"kind": f"Must be {', '.join(RewardKind.values)} or {PAIR} (both)."})
    batches = _frozen_batches(batches)
    if isinstance(base_checkpoint, Checkpoint) and base_checkpoint.pk is not None:
        fresh = Checkpoint.objects.filter(pk=base_checkpoint.pk).first()
        if fresh is None:
            raise ValidationError({"base_checkpoint": "This checkpoint does not exist (any more)."})
        base_checkpoint = fresh
    rows, snapshot_sha256 = snapshot_rows(batches=batches)
    prepared = [(kind, *_prepare(kind=kind, base_checkpoint=base_checkpoint, batches=batches, config=config,
                                 rows=rows, snapshot_sha256=snapshot_sha256)) for kind in kinds]
    snapshot = snapshots.snapshot_create(batches=batches)
    if snapshot.sha256 != snapshot_sha256:  # frozen batches cannot change; this would be a bug
        raise ValidationError({"batches": "The snapshot's content differs from the rows just read."})
    return [_create(kind=kind, base_checkpoint=base_checkpoint, batches=batches, config=full, manifest=manifest,
                    snapshot=snapshot, created_by=created_by, enqueue=enqueue)
            for kind, full, manifest in prepared]


def reward_run_launch(
    *, kind: str, base_checkpoint: Checkpoint, batches: Sequence[Batch], config: dict | None = None,
    created_by: AbstractBaseUser | None = None, enqueue: bool = True,
) -> RewardModelRun:
    """One reward model (helpfulness or safety); see reward_runs_launch."""
    if kind not in RewardKind.values:
        raise ValidationError({"kind": f"Must be one of {', '.join(RewardKind.values)}."})
    return reward_runs_launch(kinds=[kind], base_checkpoint=base_checkpoint, batches=batches, config=config,
                              created_by=created_by, enqueue=enqueue)[0]


def reward_pair_launch(
    *, base_checkpoint: Checkpoint, batches: Sequence[Batch], config: dict | None = None,
    created_by: AbstractBaseUser | None = None,
) -> tuple[RewardModelRun, RewardModelRun]:
    """The twins, helpfulness and safety, on the same base and batches (the paper's pair)."""
    helpful, safety = reward_runs_launch(kinds=list(RewardKind.values), base_checkpoint=base_checkpoint,
                                         batches=batches, config=config, created_by=created_by)
    return helpful, safety


@transaction.atomic
def reward_run_relaunch(*, run: RewardModelRun, created_by: AbstractBaseUser | None = None) -> RewardModelRun:
    """A new run with the same kind, base, batches and config overrides as a finished one."""
    run = RewardModelRun.objects.select_related("base_checkpoint").get(pk=run.pk)
    if run.is_active:
        raise ValidationError(f"Run #{run.pk} is still {run.status}.")
    defaults = RewardTrainConfig(kind=run.kind, base_checkpoint="x").to_dict()
    defaults = orjson.loads(orjson.dumps({**defaults, **LAUNCH_DEFAULTS}))
    overrides = {k: v for k, v in run.config.items() if k not in RUN_SET_KEYS and v != defaults.get(k)}
    return reward_run_launch(kind=run.kind, base_checkpoint=run.base_checkpoint, batches=list(run.batches.all()),
                             config=overrides, created_by=created_by)


@transaction.atomic
def reward_run_cancel(*, run: RewardModelRun) -> RewardModelRun:
    """Cancel a queued or running run; a worker training it stops at its next step. Finished runs stay."""
    run = RewardModelRun.objects.select_for_update().get(pk=run.pk)
    if not run.is_active:
        raise ValidationError(f"Run #{run.pk} is already {run.status}.")
    run.status = JobStatus.CANCELLED
    run.finished_at = timezone.now()
    run.progress_message = f"Cancelled at step {run.step} of {run.total_steps}." if run.total_steps else "Cancelled."
    run.save(update_fields=["status", "finished_at", "progress_message"])
    return run


# --- what the worker writes ----------------------------------------------------------------------


@transaction.atomic
def reward_run_claim(*, run_id: int) -> RewardModelRun | None:
    """Queued -> running under a row lock; None for a run that is gone, finished or cancelled.

    A run already "running" is returned as well: its message was delivered again because the worker
    that had it died (acks_late). The worker then takes the run's file lock, which a live worker
    still holds, so two workers never train one run at the same time (workers.rewards).
    """
    run = RewardModelRun.objects.select_for_update().filter(pk=run_id).first()
    if run is None or not run.is_active:
        return None
    message = "Preparing the data and the model." if run.step == 0 else (
        f"Resuming after step {run.step} of {run.total_steps}.")
    run.save(update_fields=run.set_running(message=message))
    return run


def reward_run_progress(*, run: RewardModelRun, step: int, total_steps: int, message: str) -> bool:
    """Record the step a running run reached; False if it is no longer running (cancelled)."""
    progress = min(1.0, max(0.0, step / total_steps)) if total_steps else 0.0
    updated = RewardModelRun.objects.filter(pk=run.pk, status=JobStatus.RUNNING).update(
        step=step, total_steps=total_steps, progress=progress, progress_message=message[:300])
    return bool(updated)


@transaction.atomic
def reward_run_succeed(*, run: RewardModelRun, artifact_path: str, metrics: dict[str, Any], steps: int,
                       message: str) -> RewardModelRun | None:
    """Record a finished run's artifact and metrics; None if it was cancelled meanwhile."""
    run = RewardModelRun.objects.select_for_update().get(pk=run.pk)
    if run.status != JobStatus.RUNNING:
        return None
    run.status, run.progress, run.step, run.total_steps = JobStatus.SUCCEEDED, 1.0, steps, steps
    run.artifact_path, run.metrics, run.finished_at, run.error = artifact_path, metrics, timezone.now(), ""
    run.progress_message = message[:300]
    run.save(update_fields=["status", "progress", "step", "total_steps", "artifact_path", "metrics", "finished_at",
                            "error", "progress_message"])
    return run


@transaction.atomic
def reward_run_fail(*, run: RewardModelRun, error: str, step: int | None = None) -> RewardModelRun | None:
    """Mark a run failed with its reason (and the step it reached); a cancelled run stays cancelled."""
    run = RewardModelRun.objects.select_for_update().get(pk=run.pk)
    if not run.is_active:
        return None
    run.status, run.error, run.finished_at = JobStatus.FAILED, error or "failed", timezone.now()
    fields = ["status", "error", "finished_at", "progress_message"]
    if step is not None:
        run.step = step
        fields.append("step")
    run.progress_message = (f"Failed at step {run.step}." if run.step else "Failed.")
    run.save(update_fields=fields)
    return run
