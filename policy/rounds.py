"""Writes of RLHF rounds: launch (every check before anything is created), cancel, resume, and the
bookkeeping the worker does through them (claim, stage and progress, success, failure).

Runs in the web process: no torch here. The worker (workers/rounds.py) calls the same services, so
every status change of a round goes through this module, under a lock on the round's row.
"""
from __future__ import annotations

import datetime
import json
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
from .recipes import ROUND_STAGES, scale_of
from .round_config import ConfigError, RoundConfig

logger = logging.getLogger(__name__)

Stage = RLHFRound.Stage
# The order stages run in; a launch may pick any of them, in this order.
# - Rejection sampling (+ its SFT, or SFT alone on the lineage's pool) first: the fine-tuned base of the round.
# - Ghost Attention next: the paper made its data by sampling "the latest RLHF model" (it applied GAtt after
#   RLHF V3) and used it as fine-tuning data, so it samples the round's fine-tuned policy and fine-tunes before
#   PPO, whose KL penalty then anchors to a policy that already keeps the instruction across turns.
# - PPO.
# - Safety context distillation last: the paper's final refinement of its safety pipeline (§4.2.4: "Finally,
#   we refine our RLHF pipeline with context distillation"); both answers come from the round's best policy,
#   the safety RM decides per prompt which to train on, and no later stage washes it out.
STAGE_ORDER = [Stage.REJECTION_SAMPLING, Stage.SFT, Stage.GATT, Stage.PPO, Stage.CONTEXT_DISTILLATION]
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

def _clean_stages(stages: Sequence[str] | None, policy: Checkpoint) -> list[str]:
    if stages is None:  # the recipe's stages for the policy's size (policy/recipes.py)
        return list(ROUND_STAGES[scale_of(policy.params)])
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
    if list(stages) != ordered:
        raise ValidationError({"stages": f"Stages run in the order {', '.join(known)}; {', '.join(stages)} cannot "
                                         f"(write {', '.join(ordered)})."})
    if Stage.REJECTION_SAMPLING in ordered and Stage.SFT not in ordered:
        raise ValidationError({"stages": "Rejection sampling keeps the best samples for SFT: add the sft stage."})
    return ordered


def _clean_config(config: Mapping[str, Any] | RoundConfig | None, policy: Checkpoint) -> RoundConfig:
    if isinstance(config, RoundConfig):
        config = config.to_dict()
    try:
        return RoundConfig.for_policy(dict(config) if isinstance(config, Mapping) else config, policy.params)
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


def _clean_prompts(prompts: Sequence[Prompt] | None, field: str = "prompts") -> list[Prompt]:
    prompts = list(prompts or [])
    if not prompts:
        raise ValidationError({field: "The prompt set is empty: a round needs prompts to sample."})
    if any(not isinstance(p, Prompt) or p.pk is None for p in prompts):
        raise ValidationError({field: "Prompts must be saved Prompt rows."})
    if len({p.pk for p in prompts}) > MAX_PROMPTS:
        raise ValidationError({field: f"At most {MAX_PROMPTS} prompts per round."})
    return prompts


def eval_split(prompt_ids: Sequence[int], config: RoundConfig) -> set[int]:
    """The held-out prompts of a round without explicit evaluation prompts: a seeded share (eval_fraction) of
    its prompts, the same on every resume. PPO's early stopping and the round's evaluation use them."""
    ids = sorted(prompt_ids)
    n = round(len(ids) * config.eval_fraction)
    if n == 0 or n >= len(ids):
        return set()
    return set(random.Random(config.seed).sample(ids, n))


def _check_sizes(cfg: RoundConfig, stages: Sequence[str], prompts: list[Prompt], eval_prompts: list[Prompt]) -> None:
    """Refuse a round its data cannot carry, naming the field and the minimum."""
    if eval_prompts:
        overlap = sorted({p.pk for p in eval_prompts} & {p.pk for p in prompts})
        if overlap:
            raise ValidationError({"eval_prompts": f"{len(overlap)} evaluation prompt(s) are also training prompts "
                                                   f"(ids {', '.join(map(str, overlap[:10]))}): a round is evaluated "
                                                   "on prompts it never trained on."})
        n_eval, n_train = len({p.pk for p in eval_prompts}), len(prompts)
    else:
        n_eval = len(eval_split([p.pk for p in prompts], cfg))
        n_train = len(prompts) - n_eval
    if Stage.PPO in stages and n_train < cfg.ppo.batch_size:
        raise ValidationError({"config.ppo.batch_size": f"PPO samples {cfg.ppo.batch_size} training prompts per "
                                                        f"iteration and the round has {n_train}: give at least "
                                                        f"{cfg.ppo.batch_size} training prompts or a smaller batch."})
    if Stage.CONTEXT_DISTILLATION in stages:
        held_out = {p.pk for p in eval_prompts} or eval_split([p.pk for p in prompts], cfg)
        if not any(p.is_adversarial and p.pk not in held_out for p in prompts):
            raise ValidationError({"prompts": "Context distillation answers the round's adversarial (safety-tagged) "
                                              "training prompts, and it has none: add some or drop the stage."})
    if cfg.evaluation.prompts and min(n_eval, cfg.evaluation.prompts) < cfg.evaluation.min_prompts:
        raise ValidationError({"prompts": f"The round's evaluation needs at least config.evaluation.min_prompts = "
                                          f"{cfg.evaluation.min_prompts} held-out prompts and would have {n_eval} "
                                          f"(eval_fraction {cfg.eval_fraction:g} of {len(prompts)} prompts). Give "
                                          "more prompts, evaluation prompts of their own, or config.evaluation."
                                          "prompts = 0 to skip the evaluation."})


def _enqueue_round(round_id: int) -> None:
    from workers.rounds import run_round  # no torch at import time: the task loads it lazily

    run_round.delay(round_id)


@transaction.atomic
def round_launch(
    *, policy: Checkpoint, helpfulness_rm: RewardModelRun, safety_rm: RewardModelRun, prompts: Sequence[Prompt],
    stages: Sequence[str] | None = None, config: Mapping[str, Any] | RoundConfig | None = None,
    eval_prompts: Sequence[Prompt] | None = None, created_by: AbstractBaseUser | None = None,
) -> RLHFRound:
    """Launch a round on `policy` with the twin reward models over `prompts`.

    Every check comes first and a ValidationError names the field: a policy without weights or tokenizer
    hash, reward models not succeeded or trained on another tokenizer, an empty prompt set, stages or config
    values out of range, a lineage that already has an active round, evaluation prompts that are also training
    prompts, too few prompts for PPO's batch or for the evaluation. Nothing is created when one fails.
    The config is resolved for the policy's size (policy/recipes.py) and stored whole on the round.
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
    stages = _clean_stages(stages, policy)
    cfg = _clean_config(config, policy)
    eval_prompts = _clean_prompts(eval_prompts, field="eval_prompts") if eval_prompts is not None else []
    _check_sizes(cfg, stages, prompts, eval_prompts)
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
    if eval_prompts:
        rnd.eval_prompts.set(eval_prompts)
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
    message = "Started." if rnd.status == JobStatus.QUEUED else f"Resuming at {rnd.current_stage or 'the start'}."
    rnd.save(update_fields=rnd.set_running(message=message))
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
    evaluation = (metrics or {}).get("evaluation") or {}
    verdict = evaluation.get("verdict") or RLHFRound.Verdict.NONE
    checkpoint = Checkpoint.objects.create(
        name=_checkpoint_name(current), format=Checkpoint.Format.TRAINED, path=str(path),
        tokenizer_path=str(tokenizer), tokenizer_sha256=services._sha256_file(tokenizer),
        params=services.checkpoint_params(path, Checkpoint.Format.META), parent=current.policy_in,
        produced_by=current, sha256=services.checkpoint_files_sha256(path),
        held_back=verdict == RLHFRound.Verdict.REGRESSION,
    )  # fmt: skip
    current.checkpoint_out = checkpoint
    current.verdict = verdict
    current.status, current.progress, current.finished_at = JobStatus.SUCCEEDED, 1.0, timezone.now()
    current.metrics = {**(current.metrics or {}), **_json_safe(metrics)}
    job = _next_batch_job(current, checkpoint)
    if job is not None:
        current.metrics["next_batch_job"] = job.pk
    sent = _human_eval_comparisons(current, checkpoint)
    current.progress_message = (f"Done: {checkpoint.name}. {evaluation_line(evaluation)}"
                                + (f" Generation job {job.pk} answers {job.prompts.count()} prompts for the next "
                                   f"batch{' with the parent, ' + current.policy_in.name + ', since this checkpoint is a regression' if checkpoint.held_back else ''}."
                                   if job else "")
                                + (f" {sent} evaluation pairs sent to people." if sent else ""))[:300]
    current.save(update_fields=["checkpoint_out", "status", "progress", "finished_at", "metrics",
                                "progress_message", "verdict"])
    return checkpoint


def evaluation_line(evaluation: Mapping[str, Any] | None) -> str:
    """One sentence of a round's evaluation: the deciding win rate with its CI, n and the verdict."""
    if not evaluation:
        return "Not evaluated."
    source = evaluation.get("verdict_source") or "reward_models"
    row = evaluation.get("oracle") if source == "oracle" else evaluation.get("helpfulness_rm")
    judge = {"oracle": "the demo world's oracle", "reward_models": "the helpfulness RM"}.get(source, source)
    if not row or not row.get("n"):
        return "Not evaluated."
    lo, hi = row["ci95"]
    verdict = dict(RLHFRound.Verdict.choices).get(evaluation.get("verdict") or "", "")
    return (f"Against its parent by {judge}: win rate {row['win_rate']:.1%} (95% CI {lo:.1%}-{hi:.1%}, "
            f"{row['wins']} W / {row['losses']} L / {row['ties']} T of {row['n']} held-out prompts): {verdict}.")


def _next_batch_job(rnd: RLHFRound, checkpoint: Checkpoint) -> GenerationJob | None:
    """New checkpoint vs its parent on the round's prompts (held-out ones first), temperatures from the config."""
    cfg = RoundConfig.from_dict(rnd.config).next_batch
    if cfg.prompts == 0:
        return None
    held_out = set((rnd.metrics or {}).get("eval_prompt_ids") or [])
    prompts = sorted(rnd.prompts.all(), key=lambda p: (p.pk not in held_out, p.pk))[: cfg.prompts]
    # A regression does not answer next week's prompts: its parent does, at both temperatures, until an admin
    # releases the checkpoint (policy.services.checkpoint_release).
    new = rnd.policy_in if checkpoint.held_back else checkpoint
    return services.generation_job_create(
        prompts=prompts, arm_a=(new, cfg.new_temperature), arm_b=(rnd.policy_in, cfg.parent_temperature),
        max_new_tokens=cfg.max_new_tokens, seed=RoundConfig.from_dict(rnd.config).seed, created_by=rnd.created_by,
    )  # fmt: skip


def _human_eval_comparisons(rnd: RLHFRound, checkpoint: Checkpoint) -> int:
    """Send config.evaluation.human_comparisons of the evaluation's pairs (new vs parent, the answers the
    worker wrote to evaluation/answers.jsonl) to people as comparisons, linked to the round."""
    from annotation import services as annotation_services
    from annotation.models import Comparison, Response

    wanted = RoundConfig.from_dict(rnd.config).evaluation.human_comparisons
    answers = round_dir(rnd) / "evaluation" / "answers.jsonl"
    ids = (rnd.metrics or {}).get("eval_prompt_ids") or []
    if not wanted or not answers.is_file() or rnd.human_eval_comparisons.exists():
        return 0
    cfg = RoundConfig.from_dict(rnd.config).evaluation
    prompts = {p.pk: p for p in Prompt.objects.filter(pk__in=ids)}
    sampling = {"temperature": cfg.temperature, "top_p": cfg.top_p, "evaluation_of_round": rnd.pk}
    made = []
    for line in answers.read_text().splitlines()[:wanted]:
        row = json.loads(line)
        prompt = prompts.get(ids[row["index"]]) if row["index"] < len(ids) else None
        if prompt is None or row["new"] == row["parent"]:
            continue  # the same text twice is no comparison
        a = Response.objects.create(prompt=prompt, checkpoint=checkpoint, text=row["new"] or "(empty)",
                                    temperature=cfg.temperature, sampling=sampling)
        b = Response.objects.create(prompt=prompt, checkpoint=rnd.policy_in, text=row["parent"] or "(empty)",
                                    temperature=cfg.temperature, sampling=sampling)
        made.append(annotation_services.comparison_create(prompt=prompt, response_a=a, response_b=b,
                                                          origin=Comparison.Origin.SAMPLING))
    rnd.human_eval_comparisons.set(made)
    return len(made)


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


def round_warnings(rnd: RLHFRound) -> list[str]:
    """What a researcher should know about a finished round before using its checkpoint: a regression, a
    PPO stage that kept its starting policy (with the likely cause and what to change)."""
    metrics = rnd.metrics or {}
    warnings = []
    evaluation = metrics.get("evaluation")
    if rnd.verdict == RLHFRound.Verdict.REGRESSION:
        warnings.append(f"The new checkpoint is worse than its parent ({evaluation_line(evaluation)}) It is held "
                        "back: default generation arms use the parent until an admin releases it.")
    elif rnd.verdict == RLHFRound.Verdict.NO_DIFFERENCE:
        warnings.append("No measurable difference from the parent: the 95% CI of the win rate contains one half. "
                        "More evaluation prompts narrow it; see the round's evaluation.")
    elif not evaluation and rnd.status == JobStatus.SUCCEEDED:
        warnings.append("The round was not evaluated against its parent (config.evaluation.prompts = 0 or no "
                        "held-out prompts).")
    ppo = metrics.get("ppo") or {}
    if ppo and ppo.get("best_iteration") == 0:
        curve = ppo.get("curve") or []
        clip = [p["clipfrac"] for p in curve if p.get("clipfrac") is not None]
        kl = [p["kl"] for p in curve if p.get("kl") is not None]
        cfg = RoundConfig.from_dict(rnd.config).ppo
        mean_clip = sum(clip) / len(clip) if clip else 0.0
        last_kl = kl[-1] if kl else 0.0
        if mean_clip < 1e-3:
            why = (f"the policy hardly moved (mean clip fraction {mean_clip:.4f}): raise ppo.lr (now {cfg.lr:g}) "
                   "or ppo.n_iterations")
        elif last_kl * cfg.kl_coef > 0.5:
            why = (f"the KL penalty dominates (KL {last_kl:.2f} nats x beta {cfg.kl_coef:g}): lower ppo.kl_coef or "
                   "ppo.lr")
        else:
            why = ("the held-out reward never rose above iteration 0's: the reward models may not separate this "
                   f"policy's answers; give more prompts (the round had {metrics.get('prompts', '?')}) or train the "
                   "reward models on fresher data")
        warnings.append(f"PPO ended at iteration 0 after {ppo.get('iterations')} iterations (early stopping kept the "
                        f"starting policy): {why}.")
    return warnings
