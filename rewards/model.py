"""The reward model: the Llama 2 backbone with its LM head replaced by a scalar head.

Llama 2 initialises both reward models (helpfulness, safety) from the chat checkpoint, so the RM
starts from the knowledge the policy has; ``RewardModel.from_policy`` does that: it loads a policy
checkpoint with ``policy.checkpoints.load_checkpoint``, drops ``output`` (the LM head) and adds
``head = nn.Linear(dim, 1)``. The reward of a sequence is the head applied to the final-normed hidden
state of its last real token, which is the EOS that closes the response. Batches are right-padded;
attention is causal, so padding after a token never changes it, and each row is read at its own
length (no attention mask needed).

On disk a reward model is a folder, written whole to a temporary folder beside it and renamed into
place, so readers see the old model or the complete new one:

    model.safetensors   backbone.* (Meta's names under "backbone.") and head.*
    config.json         {"format": "tandem-reward-model", "model_args": {...ModelArgs}, "head": {...}, ...}
    data_manifest.json  exactly which pairs trained it (rewards.data.build_mix)
    tokenizer.model     the tokenizer it reads with, when one was given
    train_config.json, metrics.json   when given
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from policy.checkpoints import load_checkpoint
from policy.model import ModelArgs, Transformer

FORMAT = "tandem-reward-model"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
MANIFEST = "data_manifest.json"
TOKENIZER = "tokenizer.model"


class RewardModelError(ValueError):
    """A reward-model folder that cannot be loaded: wrong format, missing or misshapen tensors."""


class RewardModel(nn.Module):
    def __init__(self, args: ModelArgs, *, head_bias: bool = True) -> None:
        super().__init__()
        self.args = args
        self.backbone = Transformer(args)
        del self.backbone.output  # the LM head (vocab x dim): a reward model reads one number instead
        self.head = nn.Linear(args.dim, 1, bias=head_bias)
        self.reset_head()

    def reset_head(self, generator: torch.Generator | None = None) -> None:
        """Small random head: rewards start near 0 with a spread of about 1 / sqrt(dim + 1) per unit of hidden norm."""
        with torch.no_grad():
            self.head.weight.normal_(0.0, 1 / math.sqrt(self.args.dim + 1), generator=generator)
            if self.head.bias is not None:
                self.head.bias.zero_()

    @classmethod
    def from_transformer(cls, transformer: Transformer, *, head_bias: bool = True,
                         generator: torch.Generator | None = None) -> RewardModel:
        """A reward model on a policy's weights (shared, not copied: the transformer is taken over)."""
        with torch.device("meta"):  # no memory for a random backbone we are about to replace
            model = cls(transformer.args, head_bias=head_bias)
        model.backbone = transformer
        if hasattr(transformer, "output"):
            del transformer.output
        model.head = nn.Linear(transformer.args.dim, 1, bias=head_bias)  # on the CPU, where generator draws
        model.reset_head(generator)
        param = next(transformer.parameters())
        model.head.to(device=param.device, dtype=param.dtype)
        return model

    @classmethod
    def from_policy(cls, ckpt_dir: str | os.PathLike[str], *, head_bias: bool = True, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", max_seq_len: int | None = None,
                    generator: torch.Generator | None = None) -> RewardModel:
        """Initialise from a policy checkpoint (Meta or HF format), as the paper does from the chat model."""
        transformer = load_checkpoint(ckpt_dir, dtype=dtype, device=device, max_seq_len=max_seq_len)
        return cls.from_transformer(transformer, head_bias=head_bias, generator=generator)

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """Rewards (B,) in float32 for right-padded tokens (B, T) whose real lengths are lengths (B,)."""
        B, T = tokens.shape
        if lengths.shape != (B,) or int(lengths.min()) < 1 or int(lengths.max()) > T:
            raise ValueError(f"lengths must be (B,) = ({B},) with values in 1..{T}")
        h = self.backbone.hidden_states(tokens)  # (B, T, dim)
        last = h[torch.arange(B, device=h.device), lengths.to(h.device) - 1]  # (B, dim): each row's last real token
        # The head in float32 even under bf16 autocast: one dim-long dot product, and rewards are compared
        # by differences, where bf16's 8 bits of mantissa would blur close pairs.
        bias = self.head.bias.float() if self.head.bias is not None else None
        with torch.autocast(device_type=h.device.type, enabled=False):
            return F.linear(last.float(), self.head.weight.float(), bias).squeeze(-1)  # (B,)


# --- saving and loading ----------------------------------------------------------------------


def model_config(model: RewardModel) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_args": asdict(model.args),
        "head": {"type": "linear", "in_features": model.args.dim, "out_features": 1,
                 "bias": model.head.bias is not None, "reads": "hidden state of the last non-padding token"},
        "dtype": str(model.head.weight.dtype).removeprefix("torch."),
    }


def save_reward_model(
    model: RewardModel,
    out_dir: str | os.PathLike[str],
    *,
    manifest: Mapping[str, Any] | None = None,
    tokenizer_path: str | os.PathLike[str] | None = None,
    extra_json: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Write the model folder atomically: a temporary folder beside out_dir, fsynced, renamed over it.

    extra_json: more JSON files to put in, by name (e.g. {"train_config.json": {...}, "metrics.json": {...}}).
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        state = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
        safetensors.torch.save_file(state, tmp / WEIGHTS, metadata={"format": "pt"})
        files = {CONFIG: model_config(model), MANIFEST: dict(manifest or {})}
        files.update(extra_json or {})
        for name, content in files.items():
            if "/" in name or name in (WEIGHTS, TOKENIZER):
                raise ValueError(f"cannot write extra file {name!r}")
            (tmp / name).write_text(json.dumps(content, indent=2, sort_keys=True))
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / TOKENIZER)
        for path in tmp.iterdir():
            with path.open("rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o755)  # mkdtemp makes folders private; a model is read by other processes
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def replace_dir(src: Path, dst: Path) -> None:
    """Rename folder src to dst. An existing dst is first renamed aside and removed after, so dst always
    names a complete folder (it is briefly absent between the two renames, never half-written)."""
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    dir_fd = os.open(dst.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the renames durable
    finally:
        os.close(dir_fd)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_reward_model(path: str | os.PathLike[str], *, device: str | torch.device = "cpu",
                      dtype: torch.dtype | None = None) -> RewardModel:
    """A RewardModel from a folder written by save_reward_model; errors name the file and tensor."""
    folder = Path(path)
    config_path = folder / CONFIG
    if not config_path.is_file() or not (folder / WEIGHTS).is_file():
        raise RewardModelError(f"{folder} is not a reward model folder: it needs {CONFIG} and {WEIGHTS}")
    config = json.loads(config_path.read_text())
    if config.get("format") != FORMAT:
        raise RewardModelError(f"{config_path}: format is {config.get('format')!r}, not {FORMAT!r}")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise RewardModelError(f"{config_path}: format version {config['format_version']} is newer than this code")
    known = {f.name for f in fields(ModelArgs)}
    args_dict = config.get("model_args", {})
    if unknown := set(args_dict) - known:
        raise RewardModelError(f"{config_path}: unknown model_args {sorted(unknown)}")
    args = ModelArgs(**args_dict)
    with torch.device("meta"):
        model = RewardModel(args, head_bias=bool(config.get("head", {}).get("bias", True)))
    state = safetensors.torch.load_file(folder / WEIGHTS)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if missing := sorted(set(expected) - set(state)):
        raise RewardModelError(f"{folder / WEIGHTS}: missing tensors {', '.join(missing[:5])}")
    if unexpected := sorted(set(state) - set(expected)):
        raise RewardModelError(f"{folder / WEIGHTS}: unexpected tensors {', '.join(unexpected[:5])}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise RewardModelError(f"{folder / WEIGHTS}: {name} has shape {tuple(state[name].shape)}, config says {shape}")
    model.load_state_dict(state, assign=True)
    return model.to(device=device, dtype=dtype)


def load_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    return json.loads((Path(path) / MANIFEST).read_text())


# --- scoring ---------------------------------------------------------------------------------


def _autocast(device: torch.device):
    """bf16 autocast on CUDA (weights stay float32); plain float32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.inference_mode()
def rewards_of(model: RewardModel, sequences: Sequence[Sequence[int]], *, pad_id: int, batch_size: int = 32) -> list[float]:
    """Rewards of token sequences, batch_size at a time, longest first (so padding stays small and the
    largest batch comes first, where running out of memory shows at once). Same order as sequences."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    out = [0.0] * len(sequences)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            lengths = torch.tensor([len(sequences[i]) for i in idx])
            tokens = torch.full((len(idx), int(lengths.max())), pad_id, dtype=torch.long)
            for row, i in enumerate(idx):
                tokens[row, : len(sequences[i])] = torch.tensor(sequences[i], dtype=torch.long)
            with _autocast(device):
                rewards = model(tokens.to(device), lengths.to(device))
            for i, r in zip(idx, rewards.tolist()):
                out[i] = r
    finally:
        model.train(was_training)
    return out


def score_batch(model: RewardModel, tokenizer, prompts: Sequence[Sequence[Mapping[str, str]]],
                responses: Sequence[str], *, batch_size: int = 32, max_seq_len: int | None = None) -> list[float]:
    """Rewards of responses to prompts (message lists ending with a user turn), encoded as in training."""
    from rewards.data import encode_response

    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    max_len = max_seq_len or model.args.max_seq_len
    seqs = [encode_response(tokenizer, p, r, max_len)[0] for p, r in zip(prompts, responses)]
    return rewards_of(model, seqs, pad_id=tokenizer.pad_id, batch_size=batch_size)


def score(model: RewardModel, tokenizer, prompt_messages: Sequence[Mapping[str, str]], response_text: str,
          *, max_seq_len: int | None = None) -> float:
    """The reward of one response to one prompt."""
    return score_batch(model, tokenizer, [prompt_messages], [response_text], max_seq_len=max_seq_len)[0]
