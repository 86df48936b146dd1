"""Reward-model training (Llama 2, section 3.2.2), top to bottom, one process or many under torchrun.

    for each optimizer step (a fixed slice of the shuffled epoch, rewards.data.plan_epochs):
        for each of this process's micro-batches:        each pair one packed row, its shared prefix
                                                          once (RewardModel's packed mode)
            loss_sum = sum over pairs of -log(sigmoid(r_c - r_r - margin)) [+ centering]
            backward(loss_sum * world_size / pairs_in_step)   # DDP averages over processes -> exact mean
        clip the global gradient norm, AdamW step, LR schedule step
        every checkpoint_every steps: an atomic, resumable checkpoint

The mean is taken over the step's pairs as a whole, not per micro-batch, so a run on N processes
with accumulation A and one on 1 process with accumulation N * A take the same steps.

LR schedule: linear warm-up over max(min_warmup_steps, warmup_ratio * steps), then a cosine from the
peak down to min_lr_ratio of it at the last step. Precision: bf16 autocast on CUDA with float32
weights and optimizer state; plain float32 on CPU, where a run killed and resumed from its last
checkpoint ends bit-identical to one never interrupted (the data order, optimizer, schedule and RNG
all come back from the checkpoint).

Output folder:
    checkpoints/step-00000100/   model.safetensors, trainer_state.pt, state.json (resumable; newest kept)
    model/                       the final reward model (rewards.model.save_reward_model)
    result.json                  the TrainResult
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from policy.checkpoints import sha256_of_checkpoint
from policy.model import ModelArgs
from policy.tokenizer import Tokenizer
from rewards.config import RewardTrainConfig
from rewards.data import EncodedPair, collate, collate_packed, encode_pairs, pad_fraction, plan_epochs, plan_sha256, sort_key, tokens_per_pair
from rewards.evaluate import evaluate_sets
from rewards.loss import margin_tensor, pairwise_loss
from rewards.model import RewardModel, replace_dir, save_reward_model

Progress = Callable[[int, int, dict[str, Any]], None]
CHECKPOINTS = "checkpoints"
FINAL = "model"
RESULT = "result.json"


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite; the last good checkpoint is left as it was."""

    def __init__(self, step: int, reason: str, last_checkpoint: str | None) -> None:
        self.step, self.reason, self.last_checkpoint = step, reason, last_checkpoint
        super().__init__(f"training diverged at step {step}: {reason}; last good checkpoint: {last_checkpoint or 'none'}")


class ResumeMismatch(RuntimeError):
    """out_dir holds checkpoints of a run with another config or other data; refusing to mix them."""


@dataclass
class TrainResult:
    out_dir: str
    model_dir: str  # the final reward model folder
    steps: int
    pairs_trained: int  # pairs seen, over all epochs (remainders that do not fill a step are dropped)
    pairs_dropped: int
    resumed_from_step: int  # 0 for a fresh run
    final_loss: float  # mean loss of the last step
    train: dict[str, Any]  # loss / accuracy curve, pad fraction, truncation, throughput
    eval: dict[str, dict[str, Any]]  # rewards.evaluate metrics per test set
    manifest_sha256: str | None
    weights_sha256: str
    plan_sha256: str
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Factor on the peak LR for optimizer step `step` (0-based): linear warm-up reaching the peak at the
    last warm-up step, then a cosine from the peak to min_ratio at the last step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps - 1
    progress = min(1.0, (step - warmup_steps) / decay_steps) if decay_steps > 0 else 1.0
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_steps_for(config: RewardTrainConfig, total_steps: int) -> int:
    return min(total_steps, max(config.min_warmup_steps, math.ceil(config.warmup_ratio * total_steps)))


# --- processes and devices -------------------------------------------------------------------


@dataclass
class _World:
    rank: int
    size: int
    device: torch.device
    owns_group: bool  # whether we started the process group (and so must end it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def _world(device_name: str) -> _World:
    """One process, or one of WORLD_SIZE under torchrun: gloo on CPU, nccl on CUDA."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank if size > 1 else torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = False
    if size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    rank = dist.get_rank() if size > 1 else 0
    return _World(rank=rank, size=size, device=device, owns_group=owns)


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


# --- model, tokenizer, optimizer -------------------------------------------------------------


def tokenizer_path_for(config: RewardTrainConfig) -> Path:
    if config.tokenizer_path:
        return Path(config.tokenizer_path)
    if config.base_checkpoint:
        base = Path(config.base_checkpoint)
        for candidate in (base / "tokenizer.model", base.parent / "tokenizer.model"):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError("no tokenizer: set tokenizer_path, or put tokenizer.model in the base checkpoint folder")


def build_model(config: RewardTrainConfig) -> RewardModel:
    """The initial reward model in float32 on the CPU: from the policy checkpoint, or random from model_args."""
    generator = torch.Generator().manual_seed(config.seed)
    if config.base_checkpoint:
        return RewardModel.from_policy(config.base_checkpoint, head_bias=config.head_bias, dtype=torch.float32,
                                       max_seq_len=config.max_seq_len, generator=generator)
    torch.manual_seed(config.seed)
    args = ModelArgs(**{**config.model_args, "max_seq_len": config.max_seq_len})
    model = RewardModel(args, head_bias=config.head_bias)
    model.reset_head(generator)
    return model


def _optimizer(model: RewardModel, config: RewardTrainConfig) -> torch.optim.AdamW:
    # Decoupled weight decay on matrices only; norm gains and the head's bias are not pulled to 0.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.adam_betas, eps=config.adam_eps)


# --- checkpoints -----------------------------------------------------------------------------


def _checkpoint_dirs(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. A folder is complete once renamed into place: temporary ones
    (".step-...tmp-") left by a killed process are not listed."""
    root = out_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def _save_checkpoint(out_dir: Path, step: int, model: RewardModel, optimizer, scheduler, state: dict[str, Any],
                     keep: int) -> Path:
    root = out_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.tmp-"))
    try:
        weights = {n: t.detach().cpu().contiguous() for n, t in model.state_dict().items()}
        safetensors.torch.save_file(weights, tmp / "model.safetensors")
        trainer_state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "step": step,
        }
        torch.save(trainer_state, tmp / "trainer_state.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
        for path in tmp.iterdir():
            with path.open("rb") as f:
                os.fsync(f.fileno())
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in _checkpoint_dirs(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stray in root.glob(".step-*"):  # temporary folders of killed runs
        shutil.rmtree(stray, ignore_errors=True)
    return final


def _load_checkpoint(path: Path, model: RewardModel, optimizer, scheduler) -> int:
    model.load_state_dict(safetensors.torch.load_file(path / "model.safetensors"))
    trainer_state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(trainer_state["optimizer"])
    scheduler.load_state_dict(trainer_state["scheduler"])
    torch.set_rng_state(trainer_state["rng"]["torch"])
    version, internal, gauss = trainer_state["rng"]["python"]
    random.setstate((version, tuple(internal), gauss))
    if trainer_state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(trainer_state["rng"]["cuda"])
    return int(trainer_state["step"])


def _check_resumable(path: Path, expected: Mapping[str, Any]) -> None:
    state = json.loads((path / "state.json").read_text())
    for key in ("config", "plan_sha256", "manifest_sha256"):
        if state.get(key) != expected.get(key):
            raise ResumeMismatch(
                f"{path} was written by a run with another {key.replace('_', ' ')}; "
                "use a fresh out_dir or resume=False to start over"
            )


# --- training --------------------------------------------------------------------------------


def train_reward_model(
    config: RewardTrainConfig,
    train_rows: Sequence[Mapping],
    eval_sets: Mapping[str, Sequence[Mapping]] | None,
    out_dir: str | os.PathLike[str],
    progress: Progress | None = None,
    resume: bool = True,
    *,
    manifest: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train one reward model on train_rows, evaluate it on eval_sets, save it under out_dir/model.

    progress(step, total_steps, metrics) is called after every optimizer step on the main process
    (metrics: loss, accuracy, lr, grad_norm, pairs_per_s). With resume, training continues from the
    newest complete checkpoint in out_dir (same config and data required), and a run that already
    finished returns its saved result. Raises TrainingDiverged on a NaN / infinite loss or gradient.
    """
    out = Path(out_dir)
    world = _world(config.device)
    try:
        return _train(config, train_rows, eval_sets or {}, out, progress, resume, manifest, world)
    finally:
        if world.owns_group:
            dist.destroy_process_group()


def _train(config, train_rows, eval_sets, out, progress, resume, manifest, world: _World) -> TrainResult:
    started = time.perf_counter()
    tokenizer_path = tokenizer_path_for(config)
    tokenizer = Tokenizer(tokenizer_path)
    model = build_model(config)
    if model.args.vocab_size != tokenizer.n_words:
        raise ValueError(f"the model's vocabulary has {model.args.vocab_size} entries, the tokenizer {tokenizer.n_words}")

    pairs: list[EncodedPair] = encode_pairs(tokenizer, train_rows, config.max_seq_len)
    micro_per_step = config.grad_accum_steps * world.size
    cost = sort_key if config.pack_pairs else (lambda p: p.length)  # the padded row length a pair needs
    plan = plan_epochs([cost(p) for p in pairs], seed=config.seed, micro_batch_size=config.micro_batch_size,
                       micro_batches_per_step=micro_per_step, epochs=config.epochs)
    step_pairs = config.micro_batch_size * micro_per_step
    if not plan:
        raise ValueError(f"{len(pairs)} training pairs cannot fill one step of {step_pairs} pairs "
                         f"(micro_batch_size x grad_accum_steps x {world.size} processes)")
    total_steps = len(plan)
    ids = [p.id for p in pairs]
    expected_state = {
        "config": config.resume_key(),
        "plan_sha256": plan_sha256(plan, ids),
        "manifest_sha256": (manifest or {}).get("sha256"),
    }
    done = _finished_result(out, expected_state) if resume else None
    if done is not None:
        return done

    model.to(world.device)
    optimizer = _optimizer(model, config)
    warmup = warmup_steps_for(config, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, total_steps, warmup, config.min_lr_ratio))

    start_step = 0
    last_checkpoint = None
    curve: list[dict[str, float]] = []  # per step: loss, accuracy, lr, grad_norm
    if resume and (existing := _checkpoint_dirs(out)):
        _check_resumable(existing[-1], expected_state)
        start_step = _load_checkpoint(existing[-1], model, optimizer, scheduler)
        curve = json.loads((existing[-1] / "state.json").read_text())["curve"]
        last_checkpoint = str(existing[-1])
    elif not resume and world.main:
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    world.barrier()

    ddp = DistributedDataParallel(model) if world.size > 1 else model
    model.train()
    loss_value = float("nan")
    step_started = time.perf_counter()
    train_seconds = 0.0
    for step in range(start_step, total_steps):
        mine = plan[step][world.rank::world.size]  # this process's micro-batches of the step
        stats = torch.zeros(2, dtype=torch.float64, device=world.device)  # loss sum, correct pairs
        for j, micro in enumerate(mine):
            batch = [pairs[i] for i in micro]
            if config.pack_pairs:
                tokens, lengths = collate_packed(batch, tokenizer.pad_id)  # (B, T), (B, 3)
            else:
                tokens, lengths = collate(batch, tokenizer.pad_id)  # (2B, T), (2B,)
            B = len(batch)
            margin = margin_tensor([p.strength for p in batch], config.margin, [p.row_margin for p in batch],
                                   device=world.device)
            # Gradients are averaged across processes only on the step's last micro-batch.
            sync = nullcontext() if world.size == 1 or j == len(mine) - 1 else ddp.no_sync()
            with sync:
                with _autocast(world.device):
                    # lengths stay on the CPU: the model checks them there without waiting for the device
                    rewards = ddp(tokens.to(world.device, non_blocking=True), lengths)  # (2B,): chosen, rejected
                r_chosen, r_rejected = rewards[:B], rewards[B:]
                losses = pairwise_loss(r_chosen, r_rejected, margin, config.center_coef)  # (B,)
                (losses.sum() * (world.size / step_pairs)).backward()
            stats[0] += losses.detach().sum().double()
            stats[1] += (r_chosen > r_rejected).sum().double()
        if world.size > 1:
            dist.all_reduce(stats)  # a NaN on any process poisons the sum, so every process stops together
        loss_value = float(stats[0]) / step_pairs
        if not math.isfinite(loss_value):
            raise TrainingDiverged(step + 1, f"loss is {loss_value}", last_checkpoint)
        if config.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip))
        else:
            grads = [p.grad.norm() for p in model.parameters() if p.grad is not None]
            grad_norm = float(torch.linalg.vector_norm(torch.stack(grads)))
        if not math.isfinite(grad_norm):
            raise TrainingDiverged(step + 1, f"gradient norm is {grad_norm}", last_checkpoint)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        now = time.perf_counter()
        train_seconds += now - step_started
        step_started = now
        metrics = {"loss": loss_value, "accuracy": float(stats[1]) / step_pairs, "lr": lr, "grad_norm": grad_norm,
                   "pairs_per_s": (step + 1 - start_step) * step_pairs / train_seconds}
        curve.append({"step": step + 1, **{k: metrics[k] for k in ("loss", "accuracy", "lr", "grad_norm")}})
        if progress is not None and world.main:
            progress(step + 1, total_steps, metrics)
        if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < total_steps:
            if world.main:
                state = {**expected_state, "step": step + 1, "total_steps": total_steps, "curve": curve}
                last_checkpoint = str(_save_checkpoint(out, step + 1, model, optimizer, scheduler, state,
                                                       config.keep_checkpoints))
            world.barrier()

    result = None
    if world.main:
        n_trained = total_steps * step_pairs
        train_metrics = {
            "curve": curve,
            "pad_fraction": pad_fraction(plan, pairs, packed=config.pack_pairs),
            "tokens_per_pair": tokens_per_pair(pairs),
            "truncated_sequences": sum(p.truncated for p in pairs),
            "pairs_per_s": (total_steps - start_step) * step_pairs / train_seconds if train_seconds else None,
            "seconds": time.perf_counter() - started,
            "world_size": world.size,
            "effective_batch": step_pairs,
            "warmup_steps": warmup,
        }
        eval_metrics = evaluate_sets(model, tokenizer, eval_sets, batch_size=config.eval_batch_size,
                                     max_seq_len=config.max_seq_len) if eval_sets else {}
        model_dir = save_reward_model(
            model, out / FINAL, manifest=manifest, tokenizer_path=tokenizer_path,
            extra_json={"train_config.json": config.to_dict(), "metrics.json": {"train": train_metrics, "eval": eval_metrics}},
        )
        result = TrainResult(
            out_dir=str(out), model_dir=str(model_dir), steps=total_steps, pairs_trained=n_trained,
            pairs_dropped=len(pairs) * config.epochs - n_trained, resumed_from_step=start_step,
            final_loss=loss_value, train=train_metrics, eval=eval_metrics,
            manifest_sha256=(manifest or {}).get("sha256"), weights_sha256=sha256_of_checkpoint(model_dir),
            plan_sha256=expected_state["plan_sha256"], config=config.to_dict(),
        )
        # Returned as JSON reads it back, so a fresh, a resumed and an already-finished run return equal results.
        result = TrainResult(**json.loads(json.dumps(result.to_dict())))
        _write_json_atomic(out / RESULT, {**result.to_dict(), "resume_state": expected_state})
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)  # the final model supersedes them
    world.barrier()
    if result is None:  # other processes return what the main process wrote
        result = _finished_result(out, expected_state)
    return result


def _finished_result(out: Path, expected_state: Mapping[str, Any]) -> TrainResult | None:
    """The saved result of a finished run with the same config and data, or None."""
    path = out / RESULT
    if not path.is_file() or not (out / FINAL).is_dir():
        return None
    saved = json.loads(path.read_text())
    if saved.pop("resume_state", None) != dict(expected_state):
        return None
    return TrainResult(**saved)


def _write_json_atomic(path: Path, content: Mapping[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(content, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


if __name__ == "__main__":
    import sys

    from rewards.cli import train_main

    sys.exit(train_main())
