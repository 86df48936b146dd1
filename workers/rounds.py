"""RLHF rounds on the "gpu" queue: rejection sampling + SFT and/or PPO, then the output checkpoint and
the next batch's responses.

Safe under duplicate delivery and worker loss:
- the worker first takes an exclusive lock on the round's folder (flock, released by the OS when the
  process dies), so a second delivery while one worker runs the round returns at once;
- the round's row moves queued -> running under a row lock, and only a queued or running round runs;
- every stage writes atomic, resumable state under the folder (policy/round_runner.py), so a message
  redelivered after a worker was killed, or re-sent with policy.rounds.round_resume, continues from the
  last complete chunk, stage or PPO state;
- the output checkpoint is registered under a lock on the round's row, once (policy.rounds.round_succeed;
  the unique constraint on Checkpoint.produced_by backs it).
Torch is imported inside the task only: the web process imports this module to enqueue.
"""
from __future__ import annotations

import logging
from typing import Any

from celery import shared_task

from annotation.models import Prompt
from policy import rounds
from policy.models import RLHFRound
from policy.round_config import RoundConfig
from workers.generation import prompt_dialog
from workers.locks import folder_lock

logger = logging.getLogger(__name__)


@shared_task(name="workers.rounds.run_round", queue="gpu", acks_late=True)
def run_round(round_id: int) -> str:
    """Run (or resume) a round; returns what happened: succeeded, failed, cancelled, busy or skipped."""
    rnd = RLHFRound.objects.filter(pk=round_id).first()
    if rnd is None or not rnd.is_active:
        return "skipped"  # deleted, or a redelivered message of finished work
    with folder_lock(rounds.round_dir(rnd)) as held:
        if not held:
            logger.info("round %s is being run by another worker; this delivery does nothing", round_id)
            return "busy"
        try:
            rnd = rounds.round_claim(round_id=round_id)
        except rounds.RoundNotRunnable:
            return "skipped"
        return _run(rnd)


def _run(rnd: RLHFRound) -> str:
    from policy.ppo import PPODiverged
    from policy.round_runner import RoundCancelled, run_round as run_on_disk

    folder = rounds.round_dir(rnd)
    try:
        spec = _spec(rnd)
        rounds.round_progress(rnd=rnd, metrics={"eval_prompt_ids": spec.lineage["eval_prompt_ids"]})

        def report(stage: str, fraction: float, message: str, metrics: Any) -> bool:
            return rounds.round_progress(rnd=rnd, stage=stage, progress=fraction, message=message, metrics=metrics)

        result = run_on_disk(spec, folder, report)
    except RoundCancelled:
        return "cancelled"
    except PPODiverged as error:
        logger.warning("round %s: %s", rnd.pk, error)
        from policy.round_runner import _read_curve

        rounds.round_fail(rnd=rnd, error=str(error), metrics={"ppo": {
            "curve": _read_curve(folder / "ppo"), "diverged_at": error.iteration, "reason": error.reason,
            "last_good_iteration": error.last_checkpoint, "state": str(folder / "ppo" / "state.pt")}})
        return "failed"
    except Exception as error:  # the row says why; the worker lives on for the next task
        logger.exception("round %s failed", rnd.pk)
        rounds.round_fail(rnd=rnd, error=f"{type(error).__name__}: {error}")
        return "failed"
    checkpoint = rounds.round_succeed(rnd=rnd, checkpoint_dir=result.checkpoint_dir, metrics=result.metrics)
    return "succeeded" if checkpoint is not None else "cancelled"


def _as_prompt(prompt: Prompt):
    from policy.reward import Prompt as RLPrompt

    return RLPrompt(messages=prompt_dialog(prompt), is_safety=prompt.is_adversarial)


def _spec(rnd: RLHFRound):
    from django.conf import settings

    from policy.checkpoints import resolve_checkpoint_path
    from policy.round_runner import RoundSpec

    config = RoundConfig.from_dict(rnd.config)
    rnd = RLHFRound.objects.select_related("policy_in", "lineage_root", "helpfulness_rm", "safety_rm").get(pk=rnd.pk)
    prompts = list(rnd.prompts.order_by("id"))
    explicit = list(rnd.eval_prompts.order_by("id"))
    held_out = {p.pk for p in explicit} or rounds.eval_split([p.pk for p in prompts], config)
    eval_rows = explicit or [p for p in prompts if p.pk in held_out]
    roots = settings.TANDEM_MODEL_ROOTS
    policy = rnd.policy_in
    policy_dir = resolve_checkpoint_path(policy.path, roots)
    tokenizer = resolve_checkpoint_path(policy.tokenizer_path, roots) if policy.tokenizer_path else (
        policy_dir / "tokenizer.model")
    earlier = rounds.lineage_rounds(rnd.lineage_root).exclude(pk=rnd.pk)
    lineage = {
        "round": rnd.pk,
        "parent": {"id": policy.pk, "name": policy.name, "sha256": policy.sha256},
        "lineage_root": {"id": rnd.lineage_root_id, "name": rnd.lineage_root.name},
        "earlier_rounds": list(earlier.values_list("pk", flat=True)),
        "reward_models": {run.kind: {"run": run.pk, "artifact_path": run.artifact_path,
                                     "manifest_sha256": run.manifest_sha256, "tokenizer_sha256": run.tokenizer_sha256}
                          for run in (rnd.helpfulness_rm, rnd.safety_rm)},
        "snapshot_hashes": rnd.snapshot_hashes,
        "config": rnd.config,
        "stages": rnd.stages,
        "prompt_ids": [p.pk for p in prompts],
        "eval_prompt_ids": sorted(held_out),
    }  # fmt: skip
    return RoundSpec(
        policy_dir=str(policy_dir), tokenizer_path=str(tokenizer),
        helpful_rm_dir=rnd.helpfulness_rm.artifact_path, safety_rm_dir=rnd.safety_rm.artifact_path,
        prompts=[_as_prompt(p) for p in prompts if p.pk not in held_out],
        eval_prompts=[_as_prompt(p) for p in eval_rows],
        stages=list(rnd.stages), config=config, round_number=earlier.count() + 1, pool_in=rounds.lineage_pool(rnd),
        lineage=lineage,
    )  # fmt: skip
