"""Writes of the policy side: registering checkpoints (more services join as the loop grows).

This module runs in the web process, which never imports torch: the checks here read only
params.json / config.json and file names, and the content hash is plain hashlib over the files,
computed exactly as policy.checkpoints.sha256_of_checkpoint does (a test pins the two together).
"""
import hashlib
import json
import re
from pathlib import Path

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction

from .models import Checkpoint

META_PARAMS = "params.json"
HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
_META_SHARD = re.compile(r"consolidated\.\d+\.pth")
# The keys of policy.model.ModelArgs (Meta's params.json keys plus max_seq_len and rope_theta).
MODEL_ARGS_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
                   "norm_eps", "max_seq_len", "rope_theta")
MAX_NAME_LENGTH = 200


def _clean_name(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ValidationError({"name": "A checkpoint needs a name."})
    name = name.strip()
    if len(name) > MAX_NAME_LENGTH or any(ord(c) < 32 for c in name):
        raise ValidationError({"name": f"At most {MAX_NAME_LENGTH} printable characters."})
    return name


@transaction.atomic
def checkpoint_get_or_create_external(*, name: str) -> Checkpoint:
    """The checkpoint called `name`, created as an external one (answers only, no weights) if new."""
    checkpoint, _ = Checkpoint.objects.get_or_create(name=_clean_name(name),
                                                     defaults={"format": Checkpoint.Format.EXTERNAL})
    return checkpoint


def resolve_in_model_roots(path: str, *, field: str = "path") -> Path:
    """The real path, refused unless inside settings.TANDEM_MODEL_ROOTS (symlinks and '..' resolved
    first). A relative path is taken relative to the first root. Same rule as
    policy.checkpoints.resolve_checkpoint_path, without importing torch."""
    roots = [Path(r).expanduser().resolve() for r in settings.TANDEM_MODEL_ROOTS]
    if not roots:
        raise ValidationError({field: "No model roots are configured (TANDEM_MODEL_ROOTS)."})
    if not isinstance(path, str) or not path.strip() or "\x00" in path:
        raise ValidationError({field: "Give the directory of the checkpoint."})
    candidate = Path(path.strip()).expanduser()
    resolved = (candidate if candidate.is_absolute() else roots[0] / candidate).resolve()
    if not any(resolved.is_relative_to(root) for root in roots):
        raise ValidationError({field: f"{path} is outside the model roots ({', '.join(map(str, roots))})."})
    return resolved


def checkpoint_files(ckpt: Path, fmt: str) -> list[str]:
    """The files a checkpoint of format `fmt` must have, checked to exist; ValidationError if not."""
    if not ckpt.is_dir():
        raise ValidationError({"path": f"{ckpt} is not a directory."})
    if fmt == Checkpoint.Format.META:
        shards = sorted(p.name for p in ckpt.iterdir() if _META_SHARD.fullmatch(p.name) and p.is_file())
        if not (ckpt / META_PARAMS).is_file() or not shards:
            raise ValidationError({"path": f"A Meta checkpoint needs {META_PARAMS} and consolidated.NN.pth in {ckpt}."})
        return [META_PARAMS, *shards]
    if fmt == Checkpoint.Format.HF:
        if not (ckpt / HF_CONFIG).is_file():
            raise ValidationError({"path": f"A Hugging Face checkpoint needs {HF_CONFIG} in {ckpt}."})
        if (ckpt / HF_INDEX).is_file():
            try:
                weights = sorted(set(json.loads((ckpt / HF_INDEX).read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise ValidationError({"path": f"{ckpt / HF_INDEX} is not a safetensors index."}) from None
            missing = [w for w in weights if "/" in w or not (ckpt / w).is_file()]
            if missing or not weights:
                raise ValidationError({"path": f"Weight files named in {HF_INDEX} are missing: {', '.join(missing)}."})
            return [HF_CONFIG, HF_INDEX, *weights]
        if not (ckpt / HF_WEIGHTS).is_file():
            raise ValidationError({"path": f"A Hugging Face checkpoint needs {HF_WEIGHTS} (or {HF_INDEX}) in {ckpt}."})
        return [HF_CONFIG, HF_WEIGHTS]
    raise ValidationError({"format": "Register 'meta' or 'hf' checkpoints (external ones come with their answers)."})


def checkpoint_files_sha256(ckpt: Path) -> str:
    """sha256 over params/config and weight files, by name and bytes, in name order -- byte for byte
    the rule of policy.checkpoints.sha256_of_checkpoint (the hash that module writes and checks)."""
    names = sorted(
        p.name for p in ckpt.iterdir()
        if p.is_file() and (p.name in (META_PARAMS, HF_CONFIG, HF_INDEX) or _META_SHARD.fullmatch(p.name)
                            or p.suffix == ".safetensors")
    )
    digest = hashlib.sha256()
    for name in names:
        path = ckpt / name
        digest.update(f"{name}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValidationError({"path": f"Cannot read {path}: {error}"}) from None
    if not isinstance(value, dict):
        raise ValidationError({"path": f"{path} must hold a JSON object."})
    return value


def checkpoint_params(ckpt: Path, fmt: str) -> dict:
    """ModelArgs-shaped params: params.json as it is (Meta), or translated from config.json (HF)."""
    if fmt == Checkpoint.Format.META:
        params = _read_json(ckpt / META_PARAMS)
        if unknown := sorted(set(params) - set(MODEL_ARGS_KEYS)):
            raise ValidationError({"path": f"{ckpt / META_PARAMS}: unknown keys {unknown}."})
        return params
    config = _read_json(ckpt / HF_CONFIG)
    try:
        dim, hidden = int(config["hidden_size"]), int(config["intermediate_size"])
        return {  # the same translation as policy.checkpoints._read_hf_config
            "dim": dim, "n_layers": int(config["num_hidden_layers"]), "n_heads": int(config["num_attention_heads"]),
            "n_kv_heads": config.get("num_key_value_heads"), "vocab_size": int(config["vocab_size"]),
            "multiple_of": hidden,
            "ffn_dim_multiplier": hidden / int(8 * dim / 3) if hidden < int(8 * dim / 3) else None,
            "norm_eps": config["rms_norm_eps"], "max_seq_len": config.get("max_position_embeddings", 4096),
            "rope_theta": config.get("rope_theta") or config.get("rope_parameters", {}).get("rope_theta", 10000.0),
        }
    except (KeyError, TypeError, ValueError) as error:
        raise ValidationError({"path": f"{ckpt / HF_CONFIG} lacks or mangles {error}."}) from None


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@transaction.atomic
def checkpoint_register(
    *, name: str, format: str, path: str, tokenizer_path: str = "", parent: Checkpoint | None = None
) -> Checkpoint:
    """Register a checkpoint on disk: path inside the model roots, the format's files present,
    params read from params.json / config.json, content hashed. The tokenizer is the given file, or
    tokenizer.model beside the weights (or one level up, as Meta's downloads lay it out)."""
    name = _clean_name(name)
    if format not in (Checkpoint.Format.META, Checkpoint.Format.HF):
        raise ValidationError({"format": "Register 'meta' or 'hf' checkpoints."})
    if Checkpoint.objects.filter(name=name).exists():
        raise ValidationError({"name": f"A checkpoint named {name!r} already exists."})
    ckpt = resolve_in_model_roots(path)
    checkpoint_files(ckpt, format)
    params = checkpoint_params(ckpt, format)
    if tokenizer_path:
        tokenizer = resolve_in_model_roots(tokenizer_path, field="tokenizer_path")
        if not tokenizer.is_file():
            raise ValidationError({"tokenizer_path": f"{tokenizer} is not a file."})
    else:
        tokenizer = next((p for p in (ckpt / "tokenizer.model", ckpt.parent / "tokenizer.model") if p.is_file()), None)
    return Checkpoint.objects.create(
        name=name, format=format, path=str(ckpt), params=params, parent=parent, sha256=checkpoint_files_sha256(ckpt),
        tokenizer_path=str(tokenizer) if tokenizer else "", tokenizer_sha256=_sha256_file(tokenizer) if tokenizer else "",
    )
