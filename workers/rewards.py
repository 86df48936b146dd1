"""Reward-model training on the "gpu" queue: one task per RewardModelRun (the twins are two runs).

Safe under duplicate delivery: the task first takes an exclusive lock on a file in the run's output
folder (fcntl.flock, released by the OS when the process dies), then moves the row from queued to
running under a row lock (rewards.services.reward_run_claim). A second delivery while a worker trains
the run finds the lock held and returns; one after the run finished finds it no longer active.

Resumable: the output folder is fixed per run, and rewards.train writes atomic checkpoints there.
When a worker is killed midway the row stays "running"; the message comes back (acks_late) or is
sent again, the next worker gets the lock, and training continues from the last complete checkpoint
with the same data order. A NaN / infinite loss stops the run, marked failed with the step and the
reason; its last good checkpoint is kept. Torch is imported inside the task only: the web process
imports this module to enqueue.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from celery import shared_task

from annotation import snapshots
from rewards import services
from rewards.models import RewardModelRun
from webapp.jobs import JobStatus
from workers.locks import folder_lock

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 1.0  # at most one progress write (and cancellation check) per second, and the last step
CURVE_POINTS = 200  # the loss curve kept in the run's metrics, thinned to about this many points
class RunCancelled(Exception):
    """The run was cancelled while it trained: stop at this step (its checkpoints stay on disk)."""


@shared_task(name="workers.rewards.train_reward_model", queue="gpu", acks_late=True)
def train_reward_model(run_id: int) -> str | None:
    """Train the run's reward model; returns the model folder, or None when there was nothing to do."""
    found = RewardModelRun.objects.filter(pk=run_id).only("pk", "created_at").first()
    if found is None:  # deleted meanwhile
        return None
    out = services.run_output_dir(found)
    with folder_lock(out) as held:
        if not held:
            logger.info("reward run %s is being trained by another worker; this delivery does nothing", run_id)
            return None
        run = services.reward_run_claim(run_id=run_id)
        if run is None:  # deleted, finished, failed or cancelled: a late or repeated message
            return None
        from rewards.train import ResumeMismatch, TrainingDiverged

        try:
            return _train(run, out)
        except RunCancelled:
            logger.info("reward run %s was cancelled while training", run_id)
            return None
        except TrainingDiverged as error:
            services.reward_run_fail(run=run, error=str(error), step=error.step)
        except ResumeMismatch as error:
            services.reward_run_fail(run=run, error=f"Cannot resume: {error}")
        except Exception as error:  # the row says why; the worker lives on for the next task
            logger.exception("reward run %s failed", run_id)
            services.reward_run_fail(run=run, error=f"{type(error).__name__}: {error}")
        return None


def _rows(run: RewardModelRun) -> tuple[list[dict], list[str]]:
    from rewards.data import read_rows

    rows, hashes = [], []
    for snapshot in run.snapshots.order_by("sha256"):
        rows += read_rows(snapshots.snapshot_file(snapshot))
        hashes.append(snapshot.sha256)
    if not hashes:
        raise ValueError(f"run {run.pk} records no snapshot to train on")
    return rows, hashes


def _train(run: RewardModelRun, out: Path) -> str:
    from rewards.config import RewardTrainConfig
    from rewards.data import build_mix
    from rewards.train import train_reward_model as train

    config = RewardTrainConfig.from_dict(run.config)
    rows, hashes = _rows(run)
    mix = build_mix(rows, kind=config.kind, seed=config.seed, mix=config.mix, input_hashes=hashes)
    if mix.manifest["sha256"] != run.manifest_sha256:
        raise ValueError(f"the snapshot rows give data manifest {mix.manifest['sha256'][:12]}, the run was launched "
                         f"with {run.manifest_sha256[:12]}: the snapshot files changed")
    last_write = 0.0

    def progress(step: int, total: int, metrics: dict[str, Any]) -> None:
        nonlocal last_write
        now = time.monotonic()
        if step < total and now - last_write < PROGRESS_INTERVAL_S:
            return
        last_write = now
        message = (f"Step {step} of {total}: loss {metrics['loss']:.4f}, accuracy {metrics['accuracy']:.3f}, "
                   f"{metrics['pairs_per_s']:.1f} pairs/s.")
        if not services.reward_run_progress(run=run, step=step, total_steps=total, message=message):
            raise RunCancelled(run.pk)

    result = train(config, mix.train, mix.test_sets, out, progress=progress, resume=True, manifest=mix.manifest)
    metrics = {
        "eval": result.eval,
        "train": {**result.train, "curve": _thin(result.train.get("curve", []))},
        "steps": result.steps,
        "pairs_trained": result.pairs_trained,
        "pairs_dropped": result.pairs_dropped,
        "resumed_from_step": result.resumed_from_step,
        "final_loss": result.final_loss,
        "weights_sha256": result.weights_sha256,
        "plan_sha256": result.plan_sha256,
        "manifest_sha256": result.manifest_sha256,
        "snapshots": hashes,
        "base_checkpoint": {"name": run.base_checkpoint.name, "sha256": run.base_checkpoint.sha256},
        "pre_training_newest_batch": _pre_training_accuracy(run, rows, config),
    }
    accuracy = (result.eval.get("all") or {}).get("accuracy")
    summary = f"Trained {result.steps} steps on {result.pairs_trained} pairs" + (
        f"; held-out accuracy {accuracy:.3f}." if accuracy is not None else "; no held-out pairs.")
    services.reward_run_succeed(run=run, artifact_path=result.model_dir, metrics=metrics, steps=result.steps,
                                message=summary)
    return result.model_dir


def _thin(curve: list[dict]) -> list[dict]:
    if len(curve) <= CURVE_POINTS:
        return curve
    every = -(-len(curve) // CURVE_POINTS)
    return [point for i, point in enumerate(curve) if i % every == 0 or i == len(curve) - 1]


def _pre_training_accuracy(run: RewardModelRun, rows: list[dict], config) -> dict[str, Any]:
    """How the newest earlier model of this kind, which never saw the run's newest batch, does on it.

    The paper's distribution-shift check: a reward model is evaluated on next week's batch before it
    is trained on it. Every pair of the batch counts (none of them trained that model), except the
    pairs whose chosen response is unsafe and the other safe, which no model is trained to prefer.
    """
    from policy.tokenizer import Tokenizer
    from rewards.data import UNSAFE_CHOSEN
    from rewards.evaluate import evaluate_sets
    from rewards.model import TOKENIZER, load_reward_model

    newest = max(run.batches.all(), key=lambda b: (b.frozen_at, b.pk))
    out: dict[str, Any] = {"batch": newest.label}
    earlier = (RewardModelRun.objects.filter(kind=run.kind, status=JobStatus.SUCCEEDED)
               .exclude(pk=run.pk).exclude(batches=newest).order_by("-finished_at", "-pk").first())
    if earlier is None:
        out["note"] = f"no earlier {run.kind} reward model that was not trained on {newest.label}"
        return out
    out.update(run=earlier.pk, base_checkpoint=earlier.base_checkpoint.name)
    batch_rows = [r for r in rows if r["batch"] == newest.label and r["safety_bin"] != UNSAFE_CHOSEN]
    if not batch_rows:
        out["note"] = f"{newest.label} has no pairs to evaluate"
        return out
    import torch

    device = config.device if config.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model = load_reward_model(earlier.artifact_path, device=device)
        tokenizer = Tokenizer(Path(earlier.artifact_path) / TOKENIZER)
    except (OSError, ValueError) as error:
        out["note"] = f"run {earlier.pk}'s model cannot be loaded: {error}"
        return out
    metrics = evaluate_sets(model, tokenizer, {"all": batch_rows}, batch_size=config.eval_batch_size,
                            max_seq_len=earlier.config.get("max_seq_len", config.max_seq_len))["all"]
    out["metrics"] = metrics
    return out
