"""Writes of the policy side: registering checkpoints (more services join as the loop grows).

This module runs in the web process, which never imports torch: the checks here read only
params.json / config.json and file names, and the content hash is plain hashlib over the files,
computed exactly as policy.checkpoints.sha256_of_checkpoint does (a test pins the two together).
"""
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from annotation.models import Comparison, Prompt, Response
from annotation.services import comparison_create
from webapp.jobs import ACTIVE_STATUSES, JobStatus

from .models import Checkpoint, GenerationJob

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
        tokenizer_path=str(tokenizer) if tokenizer else "",
        tokenizer_sha256=_sha256_file(tokenizer) if tokenizer else "",
    )


# --- sampling jobs: two arms answer prompts, the workers pair the answers up --------------------

logger = logging.getLogger(__name__)

# Llama 2 diversified pairs by sampling two checkpoints and/or temperatures; these are the arms used
# when nobody chose any (annotator-written prompts, continuations, the demo's prompts).
DEFAULT_TEMPERATURE_NEWEST = 0.7
DEFAULT_TEMPERATURE_OTHER = 1.0
DEFAULT_TEMPERATURE_SINGLE = 1.2  # one checkpoint only: the same weights, hotter
MAX_TEMPERATURE = 5.0
MAX_NEW_TOKENS = 4096


class Arm(NamedTuple):
    checkpoint: Checkpoint
    temperature: float


def _parse_arms(spec: str) -> list[tuple[str, float]]:
    """"demo-sft@0.7,demo-base@1.0" -> [("demo-sft", 0.7), ("demo-base", 1.0)]."""
    arms = []
    for item in spec.split(","):
        name, sep, temperature = item.strip().rpartition("@")
        try:
            value = float(temperature)
        except ValueError:
            value = float("nan")
        if not sep or not name or not math.isfinite(value) or value < 0:
            raise ImproperlyConfigured(f"TANDEM_DEFAULT_ARMS must look like 'name@0.7,name@1.0'; got {spec!r}")
        arms.append((name, value))
    if len(arms) != 2:
        raise ImproperlyConfigured(f"TANDEM_DEFAULT_ARMS names exactly two arms; got {spec!r}")
    return arms


def generation_arms_default() -> tuple[Arm, Arm] | None:
    """The two arms that answer prompts nobody chose arms for, or None while no checkpoint can.

    settings.TANDEM_DEFAULT_ARMS ("name@temp,name@temp", from the environment) names them; without it,
    the newest checkpoint with weights at 0.7 against the one before it at 1.0 (a single checkpoint:
    against itself at 1.2), leaving out checkpoints held back as regressions. Named checkpoints that do not
    exist (yet) mean None.
    """
    spec = getattr(settings, "TANDEM_DEFAULT_ARMS", None) or os.environ.get("TANDEM_DEFAULT_ARMS", "")
    with_weights = Checkpoint.objects.exclude(format=Checkpoint.Format.EXTERNAL)
    if spec.strip():
        named = _parse_arms(spec)
        found = {c.name: c for c in with_weights.filter(name__in=[name for name, _ in named])}
        if any(name not in found for name, _ in named):
            return None
        return Arm(found[named[0][0]], named[0][1]), Arm(found[named[1][0]], named[1][1])
    # A checkpoint its round found worse than its parent answers nothing by default (an admin may release it).
    newest = list(with_weights.filter(held_back=False).order_by("-created_at", "-id")[:2])
    if not newest:
        return None
    if len(newest) == 1:
        return Arm(newest[0], DEFAULT_TEMPERATURE_NEWEST), Arm(newest[0], DEFAULT_TEMPERATURE_SINGLE)
    return Arm(newest[0], DEFAULT_TEMPERATURE_NEWEST), Arm(newest[1], DEFAULT_TEMPERATURE_OTHER)


def _clean_arm(arm: tuple[Checkpoint, float], field: str) -> Arm:
    try:
        checkpoint, temperature = arm
        temperature = float(temperature)
    except (TypeError, ValueError):
        raise ValidationError({field: "An arm is a (checkpoint, temperature) pair."}) from None
    if not isinstance(checkpoint, Checkpoint) or checkpoint.pk is None:
        raise ValidationError({field: "An arm needs a registered checkpoint."})
    if not checkpoint.has_weights or not checkpoint.path:
        raise ValidationError({field: f"Checkpoint {checkpoint.name} has no weights to sample from."})
    if not math.isfinite(temperature) or not 0 <= temperature <= MAX_TEMPERATURE:
        raise ValidationError({field: f"Temperature must be between 0 and {MAX_TEMPERATURE}."})
    return Arm(checkpoint, temperature)


def _enqueue_generation(job_id: int) -> None:
    from workers.generation import generate_responses  # no torch at import time: the task loads it lazily

    generate_responses.delay(job_id)


@transaction.atomic
def generation_job_create(
    *, prompts: Sequence[Prompt], arm_a: tuple[Checkpoint, float], arm_b: tuple[Checkpoint, float],
    max_new_tokens: int = 256, seed: int = 0, created_by: AbstractBaseUser | None = None,
) -> GenerationJob:
    """A job that answers each prompt with both arms and pairs the answers into a comparison.

    The workers pick it up once this transaction commits (queue "gpu").
    """
    arm_a, arm_b = _clean_arm(arm_a, "arm_a"), _clean_arm(arm_b, "arm_b")
    if arm_a.checkpoint.pk == arm_b.checkpoint.pk and arm_a.temperature == arm_b.temperature:
        raise ValidationError("The two arms must differ in checkpoint or temperature.")
    prompts = list(prompts)
    if not prompts:
        raise ValidationError({"prompts": "Give at least one prompt."})
    if any(not isinstance(p, Prompt) or p.pk is None for p in prompts):
        raise ValidationError({"prompts": "Prompts must be saved Prompt rows."})
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise ValidationError({"max_new_tokens": f"Must be a whole number between 1 and {MAX_NEW_TOKENS}."})
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValidationError({"seed": "Must be a non-negative whole number."})
    job = GenerationJob.objects.create(
        arm_a_checkpoint=arm_a.checkpoint, arm_a_temperature=arm_a.temperature, arm_b_checkpoint=arm_b.checkpoint,
        arm_b_temperature=arm_b.temperature, max_new_tokens=max_new_tokens, seed=seed, created_by=created_by,
        progress_message=f"Waiting for a worker: {len(prompts)} prompt(s).",
    )
    job.prompts.set(prompts)
    # robust: a broker that is down must not undo the prompt that was just written; the job stays
    # queued and prompts_answer_waiting() can ask again.
    transaction.on_commit(lambda: _enqueue_generation(job.pk), robust=True)
    return job


def _waiting_prompts():
    busy = GenerationJob.objects.filter(status__in=ACTIVE_STATUSES).values("prompts")
    return Prompt.objects.filter(awaiting_responses=True).exclude(pk__in=busy).order_by("created_at", "id")


def prompts_answer_waiting(*, created_by: AbstractBaseUser | None = None, seed: int = 0) -> GenerationJob | None:
    """One job with the default arms for every prompt that waits for answers and is in no active job
    (annotators' prompts, continuations whose context holds the turns before). None if nothing waits
    or no checkpoint can answer yet."""
    arms = generation_arms_default()
    prompts = list(_waiting_prompts())
    if arms is None or not prompts:
        return None
    return generation_job_create(prompts=prompts, arm_a=arms[0], arm_b=arms[1], seed=seed, created_by=created_by)


def prompt_answer_request(*, prompt: Prompt) -> GenerationJob | None:
    """Ask the default arms to answer one freshly written prompt (None while there are none).

    A misconfigured TANDEM_DEFAULT_ARMS is logged, not raised: the annotator's prompt is kept and
    waits, and prompts_answer_waiting() answers it once the setting is fixed.
    """
    try:
        arms = generation_arms_default()
    except ImproperlyConfigured:
        logger.exception("prompt %s waits: the default sampling arms are misconfigured", prompt.pk)
        return None
    if arms is None:
        return None
    return generation_job_create(prompts=[prompt], arm_a=arms[0], arm_b=arms[1], seed=prompt.pk,
                                 created_by=prompt.author)


# --- what the generation worker writes ---------------------------------------------------------------

_ORIGIN_BY_SOURCE = {
    Prompt.Source.ANNOTATOR: Comparison.Origin.ANNOTATOR_PROMPT,
    Prompt.Source.CONTINUATION: Comparison.Origin.CONTINUATION,
}


def _same_arms(job: GenerationJob):
    return Comparison.objects.filter(
        response_a__checkpoint_id=job.arm_a_checkpoint_id, response_a__temperature=job.arm_a_temperature,
        response_b__checkpoint_id=job.arm_b_checkpoint_id, response_b__temperature=job.arm_b_temperature,
    )  # fmt: skip


def generation_comparison_exists(*, job: GenerationJob, prompt: Prompt) -> bool:
    """Whether the prompt already has a comparison of exactly this job's two arms (any job's)."""
    return _same_arms(job).filter(prompt=prompt).exists()


def generation_prompts_done(*, job: GenerationJob, prompts: Sequence[Prompt]) -> set[int]:
    """Ids of the prompts that already have a comparison of this job's two arms (one query)."""
    return set(_same_arms(job).filter(prompt__in=prompts).values_list("prompt_id", flat=True))


@transaction.atomic
def generation_pair_record(
    *, job: GenerationJob, prompt: Prompt, text_a: str, text_b: str, top_p: float, sampling: dict
) -> Comparison | None:
    """Store both arms' answers to one prompt and their comparison; None if it was already there.

    The prompt row is locked first, so a redelivered job running beside the first one waits here
    and then sees the comparison the first one made instead of making a second.
    """
    prompt = Prompt.objects.select_for_update().get(pk=prompt.pk)
    if generation_comparison_exists(job=job, prompt=prompt):
        return None
    responses = [
        Response.objects.create(prompt=prompt, checkpoint_id=checkpoint_id, temperature=temperature, top_p=top_p,
                                text=text, sampling={**sampling, "job": job.pk})
        for checkpoint_id, temperature, text in (
            (job.arm_a_checkpoint_id, job.arm_a_temperature, text_a),
            (job.arm_b_checkpoint_id, job.arm_b_temperature, text_b),
        )
    ]  # fmt: skip
    comparison = comparison_create(prompt=prompt, response_a=responses[0], response_b=responses[1],
                                   origin=_ORIGIN_BY_SOURCE.get(prompt.source, Comparison.Origin.SAMPLING))
    GenerationJob.objects.filter(pk=job.pk).update(comparisons_created=F("comparisons_created") + 1)
    return comparison


def generation_job_update(
    *, job: GenerationJob, status: str | None = None, progress: float | None = None, message: str | None = None,
    error: str | None = None,
) -> GenerationJob:
    """Record a job's status, progress (0..1) and message; start and finish times follow the status."""
    fields = []
    if status is not None:
        job.status = status
        fields.append("status")
        if status == JobStatus.RUNNING:
            job.started_at, job.finished_at, job.error = timezone.now(), None, ""
            fields += ["started_at", "finished_at", "error"]
        elif status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED):
            job.finished_at = timezone.now()
            fields.append("finished_at")
    fields += job.set_progress(progress=progress, message=message)
    if error is not None:
        job.error = error
        fields.append("error")
    if fields:
        job.save(update_fields=fields)
    return job


# --- the demo policy ---------------------------------------------------------------------------------

@transaction.atomic
def demo_checkpoints_register(*, built: Sequence[dict]) -> list[Checkpoint]:
    """Register the checkpoints policy.demo_policy.build_demo_policy wrote, parents first, by name.
    A name that is already registered keeps its row."""
    registered: dict[str, Checkpoint] = {}
    for item in built:
        existing = Checkpoint.objects.filter(name=item["name"]).first()
        parent = registered.get(item["parent"]) or (
            Checkpoint.objects.filter(name=item["parent"]).first() if item["parent"] else None)
        registered[item["name"]] = existing or checkpoint_register(
            name=item["name"], format=Checkpoint.Format.META, path=item["path"],
            tokenizer_path=item["tokenizer_path"], parent=parent,
        )  # fmt: skip
    return list(registered.values())


@transaction.atomic
def demo_prompts_answer(*, count: int = 30, seed: int = 0) -> GenerationJob | None:
    """Put `count` prompts of the demo world in the database (once) and ask the default arms to
    answer those that have no comparison of these arms yet. None if nothing is left to answer or no
    checkpoint can answer yet."""
    from annotation.services import prompt_create
    from policy.demo_world import default_world

    arms = generation_arms_default()
    if arms is None:
        return None
    prompts = []
    for wp in default_world().sample(count, seed=seed):
        external_id = f"demo-world:{wp.id}"[:200]
        prompt = Prompt.objects.filter(source=Prompt.Source.GENERATED, external_id=external_id).first()
        if prompt is None:
            prompt = prompt_create(
                text=wp.text, source=Prompt.Source.GENERATED, context=[dict(t) for t in wp.context],
                system_prompt=wp.system_prompt, is_adversarial=wp.is_adversarial,
                tags=["demo-world", wp.intent.kind, wp.split], awaiting_responses=True, external_id=external_id,
            )  # fmt: skip
        prompts.append(prompt)
    probe = GenerationJob(arm_a_checkpoint=arms[0].checkpoint, arm_a_temperature=arms[0].temperature,
                          arm_b_checkpoint=arms[1].checkpoint, arm_b_temperature=arms[1].temperature)
    done = generation_prompts_done(job=probe, prompts=prompts)
    busy = set(GenerationJob.objects.filter(status__in=ACTIVE_STATUSES, prompts__in=prompts).values_list("prompts", flat=True))
    todo = [p for p in prompts if p.pk not in done and p.pk not in busy]
    if not todo:
        return None
    return generation_job_create(prompts=todo, arm_a=arms[0], arm_b=arms[1], seed=seed)


@transaction.atomic
def checkpoint_release(*, checkpoint: Checkpoint) -> Checkpoint:
    """An admin's decision to use a checkpoint its round's evaluation held back as a regression: default
    generation arms may pick it again."""
    checkpoint = Checkpoint.objects.select_for_update().get(pk=checkpoint.pk)
    if not checkpoint.held_back:
        raise ValidationError({"held_back": f"Checkpoint {checkpoint.name} is not held back."})
    checkpoint.held_back = False
    checkpoint.save(update_fields=["held_back"])
    return checkpoint
