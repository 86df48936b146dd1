"""Writes of RLHF rounds: launch (every check before anything is created), cancel, resume, and the
bookkeeping the worker does through them (claim, stage and progress, success, failure).

Runs in the web process: no torch here. The worker (workers/rounds.py) calls the same services, so
every status change of a round goes through this module, under a lock on the round's row.
"""
from __future__ import annotations

import datetime
import logging
import math
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from annotation.models import Prompt
from rewards.models import RewardModelRun
from webapp.jobs import ACTIVE_STATUSES, JobStatus

from . import services
from .models import Checkpoint, GenerationJob, RLHFRound
from .round_config import ConfigError, RoundConfig

logger = logging.getLogger(__name__)

Stage = RLHFRound.Stage
STAGE_ORDER = [Stage.REJECTION_SAMPLING, Stage.SFT, Stage.PPO]
DEFAULT_STAGES = [Stage.REJECTION_SAMPLING, Stage.SFT, Stage.PPO]
MAX_PROMPTS = 100_000
ROUNDS_FOLDER = "rounds"


class RoundNotRunnable(Exception):
    """The worker should not run this round now (finished, cancelled, deleted)."""


# --- reads the launch and the worker share ----------------------------------------------------------

def lineage_root_of(checkpoint: Checkpoint) -> Checkpoint:
    """The first ancestor of a checkpoint (itself when it has no parent); cycles cannot exist (parents are
    older rows), but a corrupt chain stops after 10,000 steps."""
    node, seen = checkpoint, 0
    while node.parent_id is not None and seen < 10_000:
        node = Checkpoint.objects.only("id", "parent_id", "name").get(pk=node.parent_id)
        seen += 1
    return node


def lineage_rounds(lineage_root: Checkpoint):
    """The lineage's succeeded rounds, oldest first."""
    return RLHFRound.objects.filter(lineage_root=lineage_root, status=JobStatus.SUCCEEDED).order_by("created_at", "id")


def round_dir(rnd: RLHFRound) -> Path:
    """The round's folder: every stage's resumable state and the output checkpoint live under it. Inside
    the first model root, so the sampling workers may load the output like any registered checkpoint."""
    # The creation time in the name: a database restored or recreated (ids start over) never finds an
    # older round's folder and takes its results for its own.
    stamp = rnd.created_at.astimezone(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    return Path(settings.TANDEM_MODEL_ROOTS[0]).expanduser().resolve() / ROUNDS_FOLDER / f"round-{rnd.pk}-{stamp}"


def lineage_pool(rnd: RLHFRound) -> str | None:
    """The pool of best samples of the lineage's latest earlier round that kept one (None: first round)."""
    for earlier in lineage_rounds(rnd.lineage_root).exclude(pk=rnd.pk).order_by("-created_at", "-id"):
        path = (earlier.metrics or {}).get("pool_path")
        if path and Path(path).is_file():
            return path
    return None


# --- launch -----------------------------------------------------------------------------------------

def _clean_stages(stages: Sequence[str] | None) -> list[str]:
    if stages is None:
        return [s.value for s in DEFAULT_STAGES]
    if isinstance(stages, str) or not isinstance(stages, Sequence):
        raise ValidationError({"stages": "A list of stages."})
    known = [s.value for s in STAGE_ORDER]
    unknown = [s for s in stages if s not in known]
    if unknown:
        raise ValidationError({"stages": f"Unknown stage(s) {unknown}; choose among {', '.join(known)}."})
    if not stages:
        raise ValidationError({"stages": "Choose at least one stage."})
    if len(set(stages)) != len(stages):
        raise ValidationError({"stages": "A stage may appear once."})
    ordered = [s for s in known if s in stages]
    if Stage.REJECTION_SAMPLING in ordered and Stage.SFT not in ordered:
        raise ValidationError({"stages": "Rejection sampling keeps the best samples for SFT: add the sft stage."})
    return ordered


def _clean_config(config: Mapping[str, Any] | RoundConfig | None) -> RoundConfig:
    if isinstance(config, RoundConfig):
        config = config.to_dict()
    try:
        return RoundConfig.from_dict(config)
    except ConfigError as error:
        raise ValidationError({f"config.{error.field}" if error.field != "config" else "config": error.message})


def _clean_rm(run: RewardModelRun | None, kind: str, field: str, policy: Checkpoint) -> RewardModelRun:
    if not isinstance(run, RewardModelRun) or run.pk is None:
        raise ValidationError({field: "Choose a reward-model run."})
    if run.kind != kind:
        raise ValidationError({field: f"Run {run.pk} is a {run.kind} reward model, not a {kind} one."})
    if run.status != JobStatus.SUCCEEDED or not run.artifact_path:
        raise ValidationError({field: f"Reward-model run {run.pk} has not succeeded ({run.status})."})
    if not run.tokenizer_sha256:
        raise ValidationError({field: f"Reward-model run {run.pk} recorded no tokenizer: its tokenizer cannot be "
                                      "checked against the policy's."})
    if run.tokenizer_sha256 != policy.tokenizer_sha256:
        raise ValidationError({field: f"Reward-model run {run.pk} was trained with another tokenizer than policy "
                                      f"{policy.name} (sha256 {run.tokenizer_sha256[:12]} vs "
                                      f"{policy.tokenizer_sha256[:12]}): its scores would read other tokens."})
    return run


def _clean_prompts(prompts: Sequence[Prompt] | None) -> list[Prompt]:
    prompts = list(prompts or [])
    if not prompts:
        raise ValidationError({"prompts": "The prompt set is empty: a round needs prompts to sample."})
    if any(not isinstance(p, Prompt) or p.pk is None for p in prompts):
        raise ValidationError({"prompts": "Prompts must be saved Prompt rows."})
    if len({p.pk for p in prompts}) > MAX_PROMPTS:
        raise ValidationError({"prompts": f"At most {MAX_PROMPTS} prompts per round."})
    return prompts


def _enqueue_round(round_id: int) -> None:
    from workers.rounds import run_round  # no torch at import time: the task loads it lazily

    run_round.delay(round_id)


@transaction.atomic
def round_launch(
    *, policy: Checkpoint, helpfulness_rm: RewardModelRun, safety_rm: RewardModelRun, prompts: Sequence[Prompt],
    stages: Sequence[str] | None = None, config: Mapping[str, Any] | RoundConfig | None = None,
    created_by: AbstractBaseUser | None = None,
) -> RLHFRound:
    """Launch a round on `policy` with the twin reward models over `prompts`.

    Every check comes first and a ValidationError names the field: a policy without weights or tokenizer
    hash, reward models not succeeded or trained on another tokenizer, an empty prompt set, stages or config
    values out of range, a lineage that already has an active round. Nothing is created when one fails.
    The workers pick the round up once this transaction commits (queue "gpu").
    """
    if not isinstance(policy, Checkpoint) or policy.pk is None:
        raise ValidationError({"policy": "Choose a registered checkpoint."})
    if not policy.has_weights or not policy.path:
        raise ValidationError({"policy": f"Checkpoint {policy.name} has no weights to train."})
    if not policy.tokenizer_sha256:
        raise ValidationError({"policy": f"Checkpoint {policy.name} has no recorded tokenizer."})
    helpfulness_rm = _clean_rm(helpfulness_rm, RewardModelRun.Kind.HELPFULNESS, "helpfulness_rm", policy)
    safety_rm = _clean_rm(safety_rm, RewardModelRun.Kind.SAFETY, "safety_rm", policy)
    prompts = _clean_prompts(prompts)
    stages = _clean_stages(stages)
    cfg = _clean_config(config)
    root = lineage_root_of(policy)
    # Lock the lineage root so two launches on one lineage queue up here; the partial unique constraint
    # backs it (an IntegrityError below is the database refusing the same thing).
    Checkpoint.objects.select_for_update().filter(pk=root.pk).first()
    active = RLHFRound.objects.filter(lineage_root=root, status__in=ACTIVE_STATUSES).first()
    if active is not None:
        raise ValidationError({"policy": f"Round {active.pk} is still {active.status} in the lineage of {root.name}; "
                                         "cancel it or wait for it to finish."})
    if stages == [Stage.SFT] and not _has_lineage_pool(root):
        raise ValidationError({"stages": "SFT alone trains on the lineage's pool of best samples, and no earlier "
                                         "round of this lineage kept one: add rejection_sampling."})
    snapshots = sorted(set(helpfulness_rm.snapshots.values_list("sha256", flat=True))
                       | set(safety_rm.snapshots.values_list("sha256", flat=True)))
    try:
        with transaction.atomic():
            rnd = RLHFRound.objects.create(
                policy_in=policy, lineage_root=root, helpfulness_rm=helpfulness_rm, safety_rm=safety_rm,
                stages=stages, config=cfg.to_dict(), snapshot_hashes=snapshots, created_by=created_by,
                progress_message=f"Waiting for a worker: {len(prompts)} prompt(s), stages {', '.join(stages)}.",
            )
    except IntegrityError:
        raise ValidationError({"policy": f"The lineage of {root.name} already has an active round."}) from None
    rnd.prompts.set(prompts)
    transaction.on_commit(lambda: _enqueue_round(rnd.pk), robust=True)
    return rnd


def _has_lineage_pool(root: Checkpoint) -> bool:
    return any((r.metrics or {}).get("pool_path") and Path(r.metrics["pool_path"]).is_file()
               for r in lineage_rounds(root))


def prompts_for_round(*, batches: Sequence[Any] = (), tags: Sequence[str] = (), ids: Sequence[int] = (),
                      limit: int | None = None, seed: int = 0) -> list[Prompt]:
    """A prompt set by what admins have at hand: the prompts of comparisons in some batches, prompts
    carrying every one of some tags, explicit ids; their union, deduplicated, optionally a seeded
    sample of `limit` of them. Tag matching is done in Python so it works on SQLite and PostgreSQL."""
    chosen: dict[int, Prompt] = {}
    if ids:
        chosen.update({p.pk: p for p in Prompt.objects.filter(pk__in=list(ids))})
    if batches:
        chosen.update({p.pk: p for p in Prompt.objects.filter(comparisons__batch__in=list(batches)).distinct()})
    if tags:
        wanted = set(tags)
        chosen.update({p.pk: p for p in Prompt.objects.only("id", "tags").iterator() if wanted <= set(p.tags or [])})
    prompts = sorted(chosen.values(), key=lambda p: p.pk)
    if limit is not None and 0 <= limit < len(prompts):
        prompts = sorted(random.Random(seed).sample(prompts, limit), key=lambda p: p.pk)
    return list(Prompt.objects.filter(pk__in=[p.pk for p in prompts]).order_by("id"))


# --- cancel and resume ------------------------------------------------------------------------------

@transaction.atomic
def round_cancel(*, rnd: RLHFRound) -> RLHFRound:
    """Cancel a queued or running round. The worker notices between steps (a chunk, an SFT step, a PPO
    iteration), stops there and creates no checkpoint; what it wrote stays in the round's folder."""
    rnd = RLHFRound.objects.select_for_update().get(pk=rnd.pk)
    if rnd.status not in ACTIVE_STATUSES:
        raise ValidationError({"status": f"Round {rnd.pk} is {rnd.status}; only queued or running rounds can be "
                                         "cancelled."})
    rnd.status, rnd.finished_at = JobStatus.CANCELLED, timezone.now()
    rnd.progress_message = f"Cancelled at {rnd.current_stage or 'the start'}."
    rnd.save(update_fields=["status", "finished_at", "progress_message"])
    return rnd


@transaction.atomic
def round_resume(*, rnd: RLHFRound) -> RLHFRound:
    """Send an active round to the workers again, e.g. after its worker was lost. Safe while a worker still
    runs it: that worker holds the round's folder lock, so the extra delivery does nothing."""
    rnd = RLHFRound.objects.select_for_update().get(pk=rnd.pk)
    if rnd.status not in ACTIVE_STATUSES:
        raise ValidationError({"status": f"Round {rnd.pk} is {rnd.status}; only queued or running rounds resume."})
    transaction.on_commit(lambda: _enqueue_round(rnd.pk), robust=True)
    return rnd


# --- what the worker writes -------------------------------------------------------------------------

@transaction.atomic
def round_claim(*, round_id: int) -> RLHFRound:
    """Mark the round running (queued -> running; running stays running, for a resumed round) under a
    lock on its row. RoundNotRunnable when it is finished, cancelled or gone."""
    rnd = RLHFRound.objects.select_for_update().filter(pk=round_id).first()
    if rnd is None or rnd.status not in ACTIVE_STATUSES:
        raise RoundNotRunnable(f"round {round_id} is {'gone' if rnd is None else rnd.status}")
    fields = ["status", "progress_message"]
    if rnd.status == JobStatus.QUEUED:
        rnd.started_at = timezone.now()
        fields.append("started_at")
        rnd.progress_message = "Started."
    else:
        rnd.progress_message = f"Resuming at {rnd.current_stage or 'the start'}."
    rnd.status = JobStatus.RUNNING
    rnd.save(update_fields=fields)
    return rnd


def round_progress(*, rnd: RLHFRound, stage: str | None = None, progress: float | None = None,
                   message: str | None = None, metrics: Mapping[str, Any] | None = None) -> bool:
    """Record where a running round is; metrics are merged into the round's (top-level keys replaced).
    Returns False when the round is no longer running (cancelled): the worker stops at that point."""
    with transaction.atomic():
        current = RLHFRound.objects.select_for_update().filter(pk=rnd.pk).first()
        if current is None or current.status != JobStatus.RUNNING:
            return False
        fields = []
        if stage is not None:
            current.current_stage = stage
            fields.append("current_stage")
        fields += current.set_progress(progress=progress, message=message)
        if metrics:
            current.metrics = {**(current.metrics or {}), **_json_safe(metrics)}
            fields.append("metrics")
        if fields:
            current.save(update_fields=fields)
    rnd.__dict__.update({f: getattr(current, f) for f in ("current_stage", "progress", "progress_message", "metrics",
                                                           "status")})
    return True


@transaction.atomic
def round_fail(*, rnd: RLHFRound, error: str, metrics: Mapping[str, Any] | None = None) -> RLHFRound:
    """Mark a running round failed with the reason (its folder keeps the last good state)."""
    current = RLHFRound.objects.select_for_update().get(pk=rnd.pk)
    if current.status != JobStatus.RUNNING:
        return current  # cancelled meanwhile: the cancellation stands
    current.status, current.finished_at = JobStatus.FAILED, timezone.now()
    current.error = error or "failed"
    current.progress_message = f"Failed at {current.current_stage or 'the start'}."
    current.metrics = {**(current.metrics or {}), **_json_safe(metrics or {})}
    current.save(update_fields=["status", "finished_at", "error", "progress_message", "metrics"])
    return current


def _checkpoint_name(rnd: RLHFRound) -> str:
    suffix = f"-round{rnd.pk}"
    return rnd.policy_in.name[: services.MAX_NAME_LENGTH - len(suffix)] + suffix


@transaction.atomic
def round_succeed(*, rnd: RLHFRound, checkpoint_dir: str, metrics: Mapping[str, Any]) -> Checkpoint | None:
    """Register the round's output checkpoint, mark the round succeeded and enqueue the next batch's
    responses (the new checkpoint against its parent). Under a lock on the round: a second call (a
    duplicated delivery that got this far) returns the checkpoint the first one made; the unique
    constraint on Checkpoint.produced_by backs it. None when the round was cancelled meanwhile."""
    current = RLHFRound.objects.select_for_update().select_related("policy_in").get(pk=rnd.pk)
    if current.checkpoint_out_id is not None:
        return current.checkpoint_out
    if current.status != JobStatus.RUNNING:
        return None
    path = services.resolve_in_model_roots(checkpoint_dir)
    services.checkpoint_files(path, Checkpoint.Format.META)
    tokenizer = path / "tokenizer.model"
    checkpoint = Checkpoint.objects.create(
        name=_checkpoint_name(current), format=Checkpoint.Format.TRAINED, path=str(path),
        tokenizer_path=str(tokenizer), tokenizer_sha256=services._sha256_file(tokenizer),
        params=services.checkpoint_params(path, Checkpoint.Format.META), parent=current.policy_in,
        produced_by=current, sha256=services.checkpoint_files_sha256(path),
    )  # fmt: skip
    current.checkpoint_out = checkpoint
    current.status, current.progress, current.finished_at = JobStatus.SUCCEEDED, 1.0, timezone.now()
    current.metrics = {**(current.metrics or {}), **_json_safe(metrics)}
    job = _next_batch_job(current, checkpoint)
    if job is not None:
        current.metrics["next_batch_job"] = job.pk
    current.progress_message = (f"Done: {checkpoint.name}" + (f"; generation job {job.pk} answers "
                                f"{job.prompts.count()} prompts for the next batch." if job else "."))[:300]
    current.save(update_fields=["checkpoint_out", "status", "progress", "finished_at", "metrics",
                                "progress_message"])
    return checkpoint


def _next_batch_job(rnd: RLHFRound, checkpoint: Checkpoint) -> GenerationJob | None:
    """New checkpoint vs its parent on the round's prompts (held-out ones first), temperatures from the config."""
    cfg = RoundConfig.from_dict(rnd.config).next_batch
    if cfg.prompts == 0:
        return None
    held_out = set((rnd.metrics or {}).get("eval_prompt_ids") or [])
    prompts = sorted(rnd.prompts.all(), key=lambda p: (p.pk not in held_out, p.pk))[: cfg.prompts]
    return services.generation_job_create(
        prompts=prompts, arm_a=(checkpoint, cfg.new_temperature), arm_b=(rnd.policy_in, cfg.parent_temperature),
        max_new_tokens=cfg.max_new_tokens, seed=RoundConfig.from_dict(rnd.config).seed, created_by=rnd.created_by,
    )  # fmt: skip


def _json_safe(value: Any) -> Any:
    """Metrics as JSON stores them: non-finite floats (a diverged curve) become None, tuples lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)
