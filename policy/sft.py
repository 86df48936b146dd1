"""Supervised fine-tuning on chat dialogues, with the loss on the answer tokens only.

Llama 2's SFT recipe (section 3.1): the prompt and answer of each dialogue are concatenated, the
loss is zeroed on the prompt tokens, AdamW with a cosine schedule (lr 2e-5, weight decay 0.1,
batch 64, 2 epochs). The same loop trains the demo policy from scratch, fine-tunes on the best
samples of rejection sampling, and on Ghost Attention's dialogues: every caller turns its data
into `SFTSample`s (token ids + a per-token loss mask) or passes chat dialogues, which are encoded
with `Tokenizer.encode_dialog_with_loss_mask`.

Samples are right-padded into a batch (padding is never attended to, since attention is causal,
and never in the loss). The loss of a batch is the mean cross-entropy over every answer token in
it, so long answers weigh more than short ones, as in the paper's packed batches.
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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from policy.checkpoints import save_meta
from policy.model import Transformer
from policy.tokenizer import Tokenizer

IGNORE = -100  # target id F.cross_entropy skips: prompt tokens and padding


@dataclass
class SFTConfig:
    lr: float = 2e-5  # peak learning rate (Llama 2 SFT: 2e-5)
    min_lr_ratio: float = 0.0  # the cosine ends at lr * min_lr_ratio (0: decays to zero)
    epochs: int = 2  # passes over the data, used when max_steps is 0 (Llama 2 SFT: 2)
    max_steps: int = 0  # > 0: exactly this many optimizer steps, cycling through reshuffled epochs
    batch_size: int = 64  # sequences per optimizer step (Llama 2 SFT: 64)
    micro_batch_size: int = 0  # sequences per forward/backward; 0: the whole batch at once
    max_seq_len: int = 4096  # longer samples are cut (the model's own context is also a limit)
    warmup_steps: int = 0  # linear warm-up from 0 to lr over this many steps
    weight_decay: float = 0.1  # decoupled (AdamW); matrices only, never norm gains
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    seed: int = 0  # data order
    group_by_length: bool = False  # batch samples of similar length together (less padding, less compute)
    device: str = "auto"  # "auto": cuda if available, else cpu


@dataclass(frozen=True)
class SFTSample:
    tokens: list[int]
    loss_mask: list[bool]  # True where the token is an answer token the model should learn to produce

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.loss_mask):
            raise ValueError(f"{len(self.tokens)} tokens but {len(self.loss_mask)} mask entries")


Progress = Callable[[int, int, Mapping[str, float]], None]  # (step done, total steps, metrics)
Dialog = Sequence[Mapping[str, str]]


def text_sample(tokenizer: Tokenizer, text: str) -> SFTSample:
    """Plain text (BOS text EOS) with the loss on every token: pretraining data in the same loop."""
    tokens = tokenizer.encode(text, bos=True, eos=True)
    return SFTSample(tokens, [True] * len(tokens))


def dialog_sample(tokenizer: Tokenizer, dialog: Dialog, *, last_turn_only: bool = False) -> SFTSample:
    tokens, mask = tokenizer.encode_dialog_with_loss_mask(dialog, last_turn_only=last_turn_only)
    return SFTSample(tokens, mask)


def make_batch(samples: Sequence[SFTSample], pad_id: int, max_seq_len: int) -> tuple[Tensor, Tensor]:
    """Inputs (B, T) and targets (B, T) for next-token prediction, right-padded.

    targets[b, t] is the token after inputs[b, t] when the loss mask marks that next token, else -100.
    A sample is cut to max_seq_len + 1 tokens (max_seq_len inputs).
    """
    rows = [(s.tokens[: max_seq_len + 1], s.loss_mask[: max_seq_len + 1]) for s in samples]
    T = max(len(tokens) for tokens, _ in rows) - 1
    inputs = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for b, (tokens, mask) in enumerate(rows):
        n = len(tokens) - 1
        inputs[b, :n] = torch.tensor(tokens[:-1])
        nxt = torch.tensor(tokens[1:])
        targets[b, :n] = torch.where(torch.tensor(mask[1:]), nxt, torch.full_like(nxt, IGNORE))
    return inputs, targets


def lr_at(step: int, total_steps: int, config: SFTConfig) -> float:
    """Linear warm-up to config.lr, then a cosine from lr to lr * min_lr_ratio over the remaining steps."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _as_samples(tokenizer: Tokenizer | None, data: Sequence[Dialog | SFTSample]) -> list[SFTSample]:
    samples = []
    for item in data:
        if isinstance(item, SFTSample):
            samples.append(item)
        elif tokenizer is None:
            raise ValueError("dialogs need a tokenizer to be encoded; pass SFTSample objects otherwise")
        else:
            samples.append(dialog_sample(tokenizer, item))
    return samples


def _epoch_order(samples: Sequence[SFTSample], config: SFTConfig, rng: random.Random) -> list[int]:
    """A shuffled pass over the samples; with group_by_length, runs of 8 batches are sorted by length and
    cut into batches whose order is shuffled again, so a batch holds samples of similar length."""
    order = list(range(len(samples)))
    rng.shuffle(order)
    if not config.group_by_length:
        return order
    chunk = 8 * config.batch_size
    batches = []
    for lo in range(0, len(order), chunk):
        run = sorted(order[lo : lo + chunk], key=lambda i: len(samples[i].tokens))
        batches += [run[i : i + config.batch_size] for i in range(0, len(run), config.batch_size)]
    rng.shuffle(batches)
    return [i for batch in batches for i in batch]


def make_optimizer(model: Transformer, config: SFTConfig) -> torch.optim.AdamW:
    # Weight decay on matrices only: decaying RMSNorm gains toward 0 would shrink whole activations.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(config.beta1, config.beta2), eps=config.adam_eps,
    )  # fmt: skip


def sft_train(
    model: Transformer,
    tokenizer: Tokenizer | None,
    dialogs_or_samples: Sequence[Dialog | SFTSample],
    config: SFTConfig,
    progress: Progress | None = None,
) -> dict[str, float]:
    """Fine-tune `model` in place (moved to config.device) on dialogues and/or SFTSamples.

    Returns metrics: steps, samples, dropped (no answer token left after cutting), truncated,
    loss_tokens, loss_first, loss_last, loss_last10 (mean of the last 10 steps), seconds, device.
    """
    device = resolve_device(config.device)
    max_len = min(config.max_seq_len, model.args.max_seq_len)
    all_samples = _as_samples(tokenizer, dialogs_or_samples)
    truncated = sum(len(s.tokens) > max_len + 1 for s in all_samples)
    # A sample whose answer was cut away entirely teaches nothing.
    samples = [s for s in all_samples if any(s.loss_mask[1 : max_len + 1])]
    if not samples:
        raise ValueError("no sample has an answer token within max_seq_len: nothing to learn")
    pad_id = tokenizer.pad_id if tokenizer is not None else 0
    steps_per_epoch = math.ceil(len(samples) / config.batch_size)
    total = config.max_steps if config.max_steps > 0 else steps_per_epoch * config.epochs
    micro = config.micro_batch_size or config.batch_size

    model.to(device)
    was_training = model.training
    model.train()
    optimizer = make_optimizer(model, config)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    rng = random.Random(config.seed)
    order: list[int] = []
    losses: list[float] = []
    loss_tokens = 0
    start = time.perf_counter()
    for step in range(total):
        if len(order) < config.batch_size:  # next epoch: reshuffle, keep the leftovers first
            order += _epoch_order(samples, config, rng)
        batch = [samples[i] for i in order[: config.batch_size]]
        del order[: config.batch_size]
        inputs, targets = make_batch(batch, pad_id, max_len)
        n_tokens = int((targets != IGNORE).sum())
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total, config)
        optimizer.zero_grad(set_to_none=True)
        batch_loss = 0.0
        for lo in range(0, len(batch), micro):
            x, y = inputs[lo : lo + micro].to(device), targets[lo : lo + micro].to(device)
            if not (y != IGNORE).any():
                continue
            with autocast:
                logits = model(x)  # (b, T, V) float32
            # Sum over this micro-batch, divided by the answer tokens of the whole batch: the gradient
            # is that of the batch mean however the batch is split.
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum") / n_tokens
            loss.backward()
            batch_loss += loss.item()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        losses.append(batch_loss)
        loss_tokens += n_tokens
        if progress is not None:
            progress(step + 1, total, {"loss": batch_loss, "lr": optimizer.param_groups[0]["lr"]})
    model.train(was_training)
    return {
        "steps": total,
        "samples": len(samples),
        "dropped": len(all_samples) - len(samples),
        "truncated": truncated,
        "loss_tokens": loss_tokens,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_last10": sum(losses[-10:]) / len(losses[-10:]),
        "seconds": time.perf_counter() - start,
        "device": str(device),
    }


def save_checkpoint(
    model: Transformer,
    out_dir: str | os.PathLike[str],
    *,
    tokenizer_path: str | os.PathLike[str],
    config: object | None = None,
    extra: Mapping[str, object] | None = None,
) -> Path:
    """Write a complete Meta-format checkpoint directory, all at once.

    params.json + consolidated.00.pth (policy.checkpoints.save_meta), a copy of tokenizer.model, and
    training.json (the typed config that made it, plus `extra`, e.g. metrics and data versions) go
    into a temporary sibling directory that is renamed to out_dir only when complete, so a crash
    never leaves a half-written checkpoint where a reader would look. An existing out_dir is replaced.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        save_meta(model, tmp)
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
        record = {"config": asdict(config) if config is not None else None, **(extra or {})}
        (tmp / "training.json").write_text(json.dumps(record, indent=2, default=str))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; workers in other accounts read checkpoints
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
