"""Checkpoints on disk: Meta's format and Hugging Face's, loaded safely and written atomically.

Meta: ``params.json`` + ``consolidated.NN.pth``, one file per model-parallel shard (7B: 1, 13B: 2,
70B: 8). Shards are merged by the rule of Meta's tensor parallelism: the embedding, ``attention.wo``
and ``feed_forward.w2`` are split along their input dimension (dim 1), every other matrix along its
output dimension (dim 0), and the 1-D norms are replicated (taken from shard 0).

Hugging Face: ``config.json`` + ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``). HF's rotary embedding rotates the two halves of each head instead
of Meta's interleaved pairs, so ``wq`` and ``wk`` rows are permuted on the way in and out.

Nothing here unpickles arbitrary objects: ``torch.load(weights_only=True)`` and safetensors only.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor

from policy.model import ModelArgs, Transformer
from policy.tokenizer import Tokenizer

META_PARAMS = "params.json"
HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
_META_SHARD = re.compile(r"consolidated\.\d+\.pth")
# Meta's Llama 2 files also carry the rotary frequencies; the model recomputes them.
_META_NON_WEIGHTS = {"rope.freqs"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing file, unsafe content, wrong tensor, path outside the roots."""


def resolve_checkpoint_path(path: str | os.PathLike[str], roots: Iterable[str | os.PathLike[str]]) -> Path:
    """The real path of a checkpoint directory, refused unless it lies inside one of the model roots.

    A relative path is taken relative to the first root. Symlinks and ``..`` are resolved first, so
    neither can lead outside the roots.
    """
    resolved_roots = [Path(root).expanduser().resolve() for root in roots]
    if not resolved_roots:
        raise CheckpointError("no model roots are configured: refusing every checkpoint path")
    candidate = Path(path).expanduser()
    if not candidate.is_absolute():
        candidate = resolved_roots[0] / candidate
    resolved = candidate.resolve()
    if not any(resolved.is_relative_to(root) for root in resolved_roots):
        raise CheckpointError(
            f"checkpoint path {path} resolves to {resolved}, outside the model roots "
            f"{', '.join(map(str, resolved_roots))}"
        )
    return resolved


def load_checkpoint(
    ckpt_dir: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    vocab_size: int | None = None,
    max_seq_len: int | None = None,
) -> Transformer:
    """A Transformer from a Meta (params.json) or Hugging Face (config.json) checkpoint directory.

    dtype None keeps the stored dtype (bf16 for Meta's releases). vocab_size is needed only when
    params.json says -1 and no tokenizer.model lies beside it (or one level up, as Meta's download
    places it). max_seq_len overrides the stored context length (Meta's params.json has none: 4096).
    """
    ckpt = Path(ckpt_dir)
    if (ckpt / META_PARAMS).is_file():
        args = _read_meta_params(ckpt, vocab_size)
        state = _load_meta_state(ckpt, args)
    elif (ckpt / HF_CONFIG).is_file():
        args = _read_hf_config(ckpt)
        state = _from_hf(_load_hf_tensors(ckpt), args)
    else:
        raise CheckpointError(f"{ckpt} holds neither {META_PARAMS} (Meta format) nor {HF_CONFIG} (Hugging Face format)")
    if max_seq_len is not None:
        args.max_seq_len = max_seq_len
    _check_state(state, args, ckpt)
    with torch.device("meta"):  # no memory for random weights we are about to replace
        model = Transformer(args)
    model.load_state_dict(state, assign=True)
    return model.to(device=device, dtype=dtype)


def save_meta(model: Transformer, ckpt_dir: str | os.PathLike[str]) -> Path:
    """Write params.json + consolidated.00.pth (one shard), each file atomically."""
    ckpt = Path(ckpt_dir)
    ckpt.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().cpu() for name, t in model.state_dict().items()}
    with _atomic_file(ckpt / "consolidated.00.pth") as tmp, tmp.open("wb") as f:
        torch.save(state, f)  # a file object, not the temp path, whose name would end up inside the archive
    with _atomic_file(ckpt / META_PARAMS) as tmp:
        tmp.write_text(json.dumps(_meta_params(model.args), indent=2))
    return ckpt


def save_hf(model: Transformer, ckpt_dir: str | os.PathLike[str]) -> Path:
    """Write config.json + model.safetensors, readable by transformers' LlamaForCausalLM.from_pretrained."""
    ckpt = Path(ckpt_dir)
    ckpt.mkdir(parents=True, exist_ok=True)
    args = model.args
    tensors = _to_hf({name: t.detach().cpu() for name, t in model.state_dict().items()}, args)
    weights_dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    with _atomic_file(ckpt / HF_WEIGHTS) as tmp:
        safetensors.torch.save_file({n: t.contiguous() for n, t in tensors.items()}, tmp, metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "max_position_embeddings": args.max_seq_len,
        "rope_theta": args.rope_theta,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": weights_dtype,
    }
    with _atomic_file(ckpt / HF_CONFIG) as tmp:
        tmp.write_text(json.dumps(config, indent=2))
    return ckpt


def sha256_of_checkpoint(ckpt_dir: str | os.PathLike[str]) -> str:
    """A content hash of a checkpoint: its params/config and weight files, by name and bytes, in name order.

    Independent of modification times and of anything else in the directory (tokenizer, logs).
    """
    ckpt = Path(ckpt_dir)
    names = sorted(
        p.name
        for p in ckpt.iterdir()
        if p.is_file()
        and (p.name in (META_PARAMS, HF_CONFIG, HF_INDEX) or _META_SHARD.fullmatch(p.name) or p.suffix == ".safetensors")
    )
    if not any(_META_SHARD.fullmatch(n) or n.endswith(".safetensors") for n in names):
        raise CheckpointError(f"no weight files (consolidated.NN.pth or *.safetensors) in {ckpt}")
    digest = hashlib.sha256()
    for name in names:
        path = ckpt / name
        digest.update(f"{name}\0{path.stat().st_size}\0".encode())  # framing: file boundaries are unambiguous
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


# --- Meta format -------------------------------------------------------------------------------


def _read_meta_params(ckpt: Path, vocab_size: int | None) -> ModelArgs:
    params = json.loads((ckpt / META_PARAMS).read_text())
    known = {f.name for f in fields(ModelArgs)}
    if unknown := set(params) - known:
        raise CheckpointError(f"{ckpt / META_PARAMS}: unknown keys {sorted(unknown)}")
    if params.get("vocab_size", -1) <= 0:
        if vocab_size is None:
            tokenizer = next((p for p in (ckpt / "tokenizer.model", ckpt.parent / "tokenizer.model") if p.is_file()), None)
            if tokenizer is None:
                raise CheckpointError(
                    f"{ckpt / META_PARAMS} has vocab_size -1 (the tokenizer's size), but no vocab_size was given "
                    f"and no tokenizer.model lies in {ckpt} or {ckpt.parent}"
                )
            vocab_size = Tokenizer(tokenizer).n_words
        params["vocab_size"] = vocab_size
    return ModelArgs(**params)


def _meta_params(args: ModelArgs) -> dict:
    # Exactly the keys Meta's own Llama 2 code accepts in params.json (it passes max_seq_len itself);
    # rope_theta only when it differs from Llama 2's, as Code Llama's params.json does.
    params = {k: v for k, v in asdict(args).items() if k not in ("max_seq_len", "rope_theta")}
    if args.rope_theta != ModelArgs.rope_theta:
        params["rope_theta"] = args.rope_theta
    return params


def _load_meta_state(ckpt: Path, args: ModelArgs) -> dict[str, Tensor]:
    shard_paths = sorted(p for p in ckpt.iterdir() if _META_SHARD.fullmatch(p.name))
    if not shard_paths:
        raise CheckpointError(f"no consolidated.NN.pth weight file in {ckpt}")
    shards = [_torch_load(p) for p in shard_paths]
    state: dict[str, Tensor] = {}
    for name in shards[0]:
        if name in _META_NON_WEIGHTS:
            continue
        missing = [p.name for p, shard in zip(shard_paths, shards) if name not in shard]
        if missing:
            raise CheckpointError(f"tensor {name} is in {shard_paths[0].name} but missing from {', '.join(missing)}")
        parts = [shard[name] for shard in shards]
        if parts[0].dim() == 1 or len(parts) == 1:
            state[name] = parts[0]
        else:
            state[name] = torch.cat(parts, dim=1 if name.endswith(_SPLIT_ON_INPUT) else 0)
    return state


# Matrices Meta's model parallelism splits along their input dimension (row-parallel layers and the
# embedding, whose "input" is the model dimension); all other matrices are split along the output.
_SPLIT_ON_INPUT = ("tok_embeddings.weight", "attention.wo.weight", "feed_forward.w2.weight")


def _torch_load(path: Path) -> dict[str, Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"{path} holds objects other than tensors; refusing to unpickle it ({error})") from None
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(f"cannot read {path}: {error}") from error
    if not isinstance(state, dict) or not all(isinstance(t, Tensor) for t in state.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors")
    return state


# --- Hugging Face format -----------------------------------------------------------------------


def _read_hf_config(ckpt: Path) -> ModelArgs:
    config = json.loads((ckpt / HF_CONFIG).read_text())
    try:
        dim, hidden = config["hidden_size"], config["intermediate_size"]
        rope_theta = config.get("rope_theta") or config.get("rope_parameters", {}).get("rope_theta", 10000.0)
        return ModelArgs(
            dim=dim,
            n_layers=config["num_hidden_layers"],
            n_heads=config["num_attention_heads"],
            n_kv_heads=config.get("num_key_value_heads"),
            vocab_size=config["vocab_size"],
            # Meta's formula reproduces any intermediate_size with multiple_of = intermediate_size (it rounds
            # up to it) and, for FFNs narrower than Meta's default 8/3 * dim, a multiplier that shrinks to it.
            multiple_of=hidden,
            ffn_dim_multiplier=hidden / int(8 * dim / 3) if hidden < int(8 * dim / 3) else None,
            norm_eps=config["rms_norm_eps"],
            max_seq_len=config.get("max_position_embeddings", 4096),
            rope_theta=rope_theta,
        )
    except KeyError as error:
        raise CheckpointError(f"{ckpt / HF_CONFIG} lacks {error}") from None


def _load_hf_tensors(ckpt: Path) -> dict[str, Tensor]:
    if (ckpt / HF_INDEX).is_file():
        files = sorted(set(json.loads((ckpt / HF_INDEX).read_text())["weight_map"].values()))
    else:
        files = [HF_WEIGHTS]
    tensors: dict[str, Tensor] = {}
    for name in files:
        if not (ckpt / name).is_file():
            raise CheckpointError(f"weight file {ckpt / name} is missing")
        tensors |= safetensors.torch.load_file(ckpt / name)
    return tensors


def _hf_names(args: ModelArgs) -> Iterator[tuple[str, str]]:
    """(Meta name, HF name) for every weight."""
    yield "tok_embeddings.weight", "model.embed_tokens.weight"
    for i in range(args.n_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        for meta, hf in [
            ("attention.wq", "self_attn.q_proj"), ("attention.wk", "self_attn.k_proj"),
            ("attention.wv", "self_attn.v_proj"), ("attention.wo", "self_attn.o_proj"),
            ("feed_forward.w1", "mlp.gate_proj"), ("feed_forward.w2", "mlp.down_proj"),
            ("feed_forward.w3", "mlp.up_proj"),
            ("attention_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm"),
        ]:  # fmt: skip
            yield f"{ours}{meta}.weight", f"{theirs}{hf}.weight"
    yield "norm.weight", "model.norm.weight"
    yield "output.weight", "lm_head.weight"


def _rotary_permutation(args: ModelArgs, meta_name: str) -> Callable[[Tensor, bool], Tensor] | None:
    """For wq / wk, a function reordering rows between Meta's interleaved pairs and HF's halves."""
    if meta_name.endswith("attention.wq.weight"):
        heads = args.n_heads
    elif meta_name.endswith("attention.wk.weight"):
        heads = args.n_kv_heads
    else:
        return None

    def permute(w: Tensor, to_hf: bool) -> Tensor:
        rows, cols = w.shape
        if rows % (2 * heads):
            raise CheckpointError(f"tensor {meta_name} has shape {tuple(w.shape)}, not {heads} heads of even size")
        # Meta's row order within a head is (pair, re/im); HF's is (re/im, pair).
        split = (heads, rows // heads // 2, 2, cols) if to_hf else (heads, 2, rows // heads // 2, cols)
        return w.reshape(split).transpose(1, 2).reshape(rows, cols)

    return permute


def _to_hf(state: dict[str, Tensor], args: ModelArgs) -> dict[str, Tensor]:
    out = {}
    for meta, hf in _hf_names(args):
        permute = _rotary_permutation(args, meta)
        out[hf] = permute(state[meta], True) if permute else state[meta]
    return out


def _from_hf(tensors: dict[str, Tensor], args: ModelArgs) -> dict[str, Tensor]:
    state = {}
    for meta, hf in _hf_names(args):
        if hf not in tensors:
            raise CheckpointError(f"tensor {hf} (our {meta}) is missing from the safetensors files")
        permute = _rotary_permutation(args, meta)
        state[meta] = permute(tensors[hf], False) if permute else tensors[hf]
    return state


# --- shared ------------------------------------------------------------------------------------


def _check_state(state: dict[str, Tensor], args: ModelArgs, ckpt: Path) -> None:
    """Every weight the architecture needs, with its shape, and nothing else; errors name the tensor."""
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in Transformer(args).state_dict().items()}
    if missing := sorted(set(expected) - set(state)):
        raise CheckpointError(f"{ckpt}: missing tensors {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if unexpected := sorted(set(state) - set(expected)):
        raise CheckpointError(f"{ckpt}: unexpected tensors {', '.join(unexpected[:5])}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise CheckpointError(
                f"{ckpt}: tensor {name} has shape {tuple(state[name].shape)}, the config expects {shape}"
            )


@contextmanager
def _atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; then fsync it and rename it over ``path``, so
    readers see the old file or the complete new one, never a torn one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes files private; a checkpoint is read by other processes
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
