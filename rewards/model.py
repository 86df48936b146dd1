"""The reward model: the Llama 2 backbone with its LM head replaced by a scalar head.

Llama 2 initialises both reward models (helpfulness, safety) from the chat checkpoint, so the RM
starts from the knowledge the policy has; ``RewardModel.from_policy`` does that: it loads a policy
checkpoint with ``policy.checkpoints.load_checkpoint``, drops ``output`` (the LM head) and adds
``head = nn.Linear(dim, 1)``. The reward of a sequence is the head applied to the final-normed hidden
state of its last real token, which is the EOS that closes the response. Batches are right-padded;
attention is causal, so padding after a token never changes it, and each row is read at its own
length (no attention mask needed). Two savings, both exact: in training, the chosen and rejected
sequences of a pair share their dialogue prefix, and forward's packed mode puts a pair in one row,
prefix once; and since only one token per sequence is read, the last layer runs its queries,
attention output and feed-forward at that token only (a saving of about 1/n_layers of the work).

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
from torch.nn.attention import SDPBackend, sdpa_kernel

from policy.checkpoints import load_checkpoint
from policy.model import ModelArgs, Transformer, apply_rope, rope_rotations

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
        """Rewards in float32, for right-padded rows of tokens (N, T).

        lengths (N,): each row is one sequence of that length -> (N,) rewards.
        lengths (N, 3): each row is one packed pair (rewards.data.collate_packed): the shared prefix, the
        chosen continuation, the rejected continuation, of these lengths -> (2N,) rewards, chosen first;
        equal to scoring the 2N full sequences, with each prefix run once.
        lengths may stay on the CPU (as collate makes them): they are checked there, without waiting
        for the device, and then moved.
        """
        N, T = tokens.shape
        dev = tokens.device
        if lengths.dim() == 1:
            _check_lengths(lengths, N, T, "lengths")
            if T > self.args.max_seq_len:
                raise ValueError(f"sequence of {T} tokens is longer than max_seq_len {self.args.max_seq_len}")
            # Plain causal attention; right padding needs no mask, as a token never sees what follows it.
            return self._rewards(tokens, torch.arange(T, device=dev), None, (lengths.to(dev) - 1)[:, None])[:, 0]

        # Packed pairs: one row is [prefix | chosen continuation | rejected continuation | padding]. The
        # rejected continuation takes the positions right after the prefix (as the chosen one does) and may
        # not see the chosen continuation; everything else is plain causal attention. A prefix token never
        # sees what follows it, so its keys and values are those of both full sequences: the rewards are
        # exactly those of the two sequences run apart, for one prefix's work.
        if lengths.shape != (N, 3) or int(lengths.min()) < 1:
            raise ValueError(f"packed lengths must be ({N}, 3): prefix, chosen and rejected parts of >= 1 token")
        if int(lengths.sum(1).max()) > T:
            raise ValueError(f"packed pairs longer than the {T} token columns")
        if int((lengths[:, 0] + lengths[:, 1:].max(1).values).max()) > self.args.max_seq_len:
            raise ValueError(f"a sequence is longer than max_seq_len {self.args.max_seq_len}")
        prefix, chosen, rejected = (lengths.to(dev, non_blocking=True)[:, i:i + 1] for i in range(3))  # each (N, 1)
        idx = torch.arange(T, device=dev)[None, :]  # (1, T)
        in_chosen = (idx >= prefix) & (idx < prefix + chosen)  # (N, T)
        in_rejected = (idx >= prefix + chosen) & (idx < prefix + chosen + rejected)  # (N, T)
        positions = torch.where(in_rejected, idx - chosen, idx)  # (N, T): rejected restarts after the prefix
        causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()  # (T, T) query, key
        mask = causal & ~(in_rejected[:, :, None] & in_chosen[:, None, :])  # (N, T, T)
        ends = torch.cat([prefix + chosen, prefix + chosen + rejected], dim=1) - 1  # (N, 2)
        return self._rewards(tokens, positions, mask, ends).T.reshape(-1)  # (2N,): chosen, then rejected

    def _rewards(self, tokens: Tensor, positions: Tensor, mask: Tensor | None, ends: Tensor) -> Tensor:
        """Rewards (N, R) read at token indices ends (N, R). positions (T,) or (N, T) for RoPE; mask (N, T, T),
        True where a query may see a key, or None for plain causal attention.

        The backbone's layers, with one saving: only R tokens per row are read, so the last layer computes
        keys and values for every token but queries, the attention output, the feed-forward and the final
        norm only at those R tokens (the same numbers as the full layer at those positions).
        """
        bb, args = self.backbone, self.args
        N = tokens.shape[0]
        rotations = rope_rotations(positions, args.head_dim, args.rope_theta)  # (T, D/2) or (N, T, D/2)
        attn_mask = None if mask is None else mask[:, None]  # (N, 1, T, T)
        h = bb.tok_embeddings(tokens)  # (N, T, dim)
        *body, last = bb.layers
        for layer in body:
            att = layer.attention
            q, k, v = _qkv(att, layer.attention_norm(h), rotations)  # (N, H|K, T, D)
            out = _attention(q, k, v, attn_mask, causal=mask is None)
            h = h + att.wo(out.transpose(1, 2).reshape(h.shape))
            h = h + layer.feed_forward(layer.ffn_norm(h))

        att, R = last.attention, ends.shape[1]
        rows = torch.arange(N, device=h.device)[:, None]  # (N, 1)
        x = last.attention_norm(h)
        _, k, v = _qkv(att, x, rotations, queries=False)  # (N, K, T, D)
        read_rot = rotations[ends] if rotations.dim() == 2 else rotations[rows, ends]  # (N, R, D/2)
        q = apply_rope(att.wq(x[rows, ends]).view(N, R, att.n_heads, att.head_dim), read_rot).transpose(1, 2)
        if mask is None:  # a read token sees the keys up to itself
            read_mask = torch.arange(h.shape[1], device=h.device)[None, None, :] <= ends[:, :, None]  # (N, R, T)
        else:
            read_mask = mask[rows, ends]  # (N, R, T)
        out = _attention(q, k, v, read_mask[:, None], causal=False)  # (N, H, R, D)
        hr = h[rows, ends] + att.wo(out.transpose(1, 2).reshape(N, R, -1))  # (N, R, dim)
        hr = bb.norm(hr + last.feed_forward(last.ffn_norm(hr)))
        # The head in float32 even under bf16 autocast: one dim-long dot product, and rewards are compared
        # by differences, where bf16's 8 bits of mantissa would blur close pairs.
        bias = self.head.bias.float() if self.head.bias is not None else None
        with torch.autocast(device_type=hr.device.type, enabled=False):
            return F.linear(hr.float(), self.head.weight.float(), bias).squeeze(-1)  # (N, R)


def _check_lengths(lengths: Tensor, n: int, t: int, name: str) -> None:
    if lengths.shape != (n,) or int(lengths.min()) < 1 or int(lengths.max()) > t:
        raise ValueError(f"{name} must be ({n},) with values in 1..{t}")


def _attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
    """Scaled dot-product attention of q (B, H, Tq, D) over k, v (B, K, Tk, D), K dividing H."""
    if q.device.type == "cuda":
        # Not cuDNN's kernel: it builds a new execution graph for each new shape, tens of milliseconds of
        # CPU per call, and micro-batches here change shape every time. The flash and memory-efficient
        # kernels take any shape; the latter wants k and v with every query head.
        if (rep := q.shape[1] // k.shape[1]) > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)


def _qkv(att, x: Tensor, rotations: Tensor, queries: bool = True) -> tuple[Tensor | None, Tensor, Tensor]:
    """Queries, keys (rotated) and values of policy.model.Attention for x (B, T, dim), heads first."""
    B, T, _ = x.shape
    q = apply_rope(att.wq(x).view(B, T, att.n_heads, att.head_dim), rotations).transpose(1, 2) if queries else None
    k = apply_rope(att.wk(x).view(B, T, att.n_kv_heads, att.head_dim), rotations)  # (B, T, K, D)
    v = att.wv(x).view(B, T, att.n_kv_heads, att.head_dim)  # (B, T, K, D)
    return q, k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D), (B, K, T, D), (B, K, T, D)


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
    # Fresh, aligned storage (safetensors hands out views into one buffer at arbitrary offsets, on which
    # some CPU kernels take other code paths and round differently): the same weights then give the same
    # rewards bit for bit as the model that was saved.
    model.load_state_dict({name: t.clone() for name, t in state.items()}, assign=True)
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
                rewards = model(tokens.to(device), lengths)
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
