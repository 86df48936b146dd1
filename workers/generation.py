"""Response generation: both arms of a GenerationJob answer each of its prompts, on the "gpu" queue.

The task is resumable and safe to run twice: a prompt that already has a comparison of the job's two
arms is skipped, and each pair is recorded under a lock on its prompt (policy.services), so a
redelivered message, a restarted worker or two workers on one job never create a second comparison,
and a crash midway leaves the prompts done so far done. Torch is imported inside the task only: the
web process imports this module to enqueue, and never loads torch.
"""
from __future__ import annotations

import logging
import re
from collections import OrderedDict
from typing import Any

from celery import shared_task
from django.conf import settings

from annotation.models import Prompt
from policy import services
from policy.models import Checkpoint, GenerationJob
from webapp.jobs import JobStatus

logger = logging.getLogger(__name__)

BATCH_SIZE = 16  # prompts sampled together per arm; progress is reported after each batch
TOP_P = 0.9  # nucleus sampling, Meta's chat default; the arms differ by checkpoint and temperature
_MODEL_CACHE_SIZE = 2  # the two arms of a job stay loaded for the next job
_models: OrderedDict[tuple, tuple[Any, Any]] = OrderedDict()


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_policy(checkpoint: Checkpoint) -> tuple[Any, Any]:
    """(model, tokenizer) of a checkpoint, kept in a small per-process cache keyed by its content.

    On CPU the weights are cast to float32 (bf16 matmuls are slow there); on CUDA they keep their
    stored dtype and policy.generate runs under bf16 autocast.
    """
    import torch

    from policy.checkpoints import load_checkpoint, resolve_checkpoint_path
    from policy.tokenizer import Tokenizer

    key = (checkpoint.pk, checkpoint.path, checkpoint.sha256, checkpoint.tokenizer_path)
    if key in _models:
        _models.move_to_end(key)
        return _models[key]
    roots = settings.TANDEM_MODEL_ROOTS
    path = resolve_checkpoint_path(checkpoint.path, roots)
    tokenizer_path = resolve_checkpoint_path(checkpoint.tokenizer_path, roots) if checkpoint.tokenizer_path else (
        path / "tokenizer.model")
    device = _device()
    model = load_checkpoint(path, device=device, dtype=torch.float32 if device == "cpu" else None).eval()
    _models[key] = (model, Tokenizer(tokenizer_path))
    while len(_models) > _MODEL_CACHE_SIZE:
        _models.popitem(last=False)
    return _models[key]


def prompt_dialog(prompt: Prompt) -> list[dict[str, str]]:
    """System prompt, the turns before, then the user's message: the dialog the arms answer."""
    system = [{"role": "system", "content": prompt.system_prompt}] if prompt.system_prompt else []
    return [*system, *prompt.context, {"role": "user", "content": prompt.text}]


def _encode(prompt: Prompt, arms: list[tuple[Any, Any]]) -> tuple[list[list[int]] | None, str]:
    """The prompt's ids for each arm, or None and the reason it cannot be answered."""
    ids = []
    for model, tokenizer in arms:
        try:
            tokens = tokenizer.encode_dialog(prompt_dialog(prompt))
        except ValueError as error:
            return None, f"prompt {prompt.pk}: {error}"
        if len(tokens) >= model.args.max_seq_len:
            return None, (f"prompt {prompt.pk}: {len(tokens)} tokens, longer than the {model.args.max_seq_len}-token "
                          "context it must fit in with its answer")
        ids.append(tokens)
    return ids, ""


# Byte-fallback pieces can decode to any byte; NUL cannot be stored in PostgreSQL text, and other
# control characters (but tab and newline) mean nothing to an annotator.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _decode(tokenizer: Any, tokens: list[int]) -> str:
    """Generated ids to text, without the EOS that ended them and without control characters."""
    if tokens and tokens[-1] == tokenizer.eos_id:
        tokens = tokens[:-1]
    return _CONTROL.sub("", tokenizer.decode(tokens)).strip()


@shared_task(name="workers.generation.generate_responses", queue="gpu", acks_late=True)
def generate_responses(job_id: int) -> int:
    """Answer the job's prompts with both arms and pair the answers up; returns comparisons created."""
    job = GenerationJob.objects.select_related("arm_a_checkpoint", "arm_b_checkpoint").filter(pk=job_id).first()
    if job is None or job.status in (JobStatus.SUCCEEDED, JobStatus.CANCELLED):
        return 0  # deleted, or a redelivered message of finished work
    services.generation_job_update(job=job, status=JobStatus.RUNNING, message="Loading the checkpoints.")
    try:
        return _run(job)
    except Exception as error:  # the job row says why; the worker lives on for the next job
        logger.exception("generation job %s failed", job_id)
        services.generation_job_update(job=job, status=JobStatus.FAILED, error=f"{type(error).__name__}: {error}",
                                       message="Failed.")
        return 0


def _run(job: GenerationJob) -> int:
    from policy.generate import generate

    prompts = list(job.prompts.order_by("id"))
    done = services.generation_prompts_done(job=job, prompts=prompts)
    todo = [p for p in prompts if p.pk not in done]
    arms = [load_policy(job.arm_a_checkpoint), load_policy(job.arm_b_checkpoint)]
    temperatures = [job.arm_a_temperature, job.arm_b_temperature]
    skipped, ready = [], []
    for prompt in todo:
        ids, reason = _encode(prompt, arms)
        if ids is None:
            skipped.append(reason)
        else:
            ready.append((prompt, ids))
    created = 0
    device = _device()
    for start in range(0, len(ready), BATCH_SIZE):
        job.refresh_from_db(fields=["status"])
        if job.status == JobStatus.CANCELLED:
            return created
        batch = ready[start : start + BATCH_SIZE]
        seed = (job.seed + start) % 2**63  # one seed per batch, recorded on each response
        texts = []
        for arm, ((model, tokenizer), temperature) in enumerate(zip(arms, temperatures)):
            out = generate(model, [ids[arm] for _, ids in batch], job.max_new_tokens, temperature=temperature,
                           top_p=TOP_P, eos_id=tokenizer.eos_id, seed=seed)
            texts.append([_decode(tokenizer, tokens) for tokens in out.tokens])
        for i, (prompt, _) in enumerate(batch):
            sampling = {"seed": seed, "max_new_tokens": job.max_new_tokens, "top_k": 0, "device": device}
            comparison = services.generation_pair_record(job=job, prompt=prompt, text_a=texts[0][i],
                                                         text_b=texts[1][i], top_p=TOP_P, sampling=sampling)
            created += comparison is not None
        answered = len(done) + start + len(batch)
        services.generation_job_update(job=job, progress=answered / len(prompts),
                                       message=f"{answered} of {len(prompts)} prompts answered.")
    summary = f"{len(prompts) - len(skipped)} of {len(prompts)} prompts answered ({created} new comparisons)."
    if skipped:
        summary += f" Skipped {len(skipped)}: " + "; ".join(skipped)
    if skipped and len(skipped) == len(prompts):
        services.generation_job_update(job=job, status=JobStatus.FAILED, error="\n".join(skipped),
                                       message="No prompt could be answered.")
    else:
        services.generation_job_update(job=job, status=JobStatus.SUCCEEDED, progress=1.0, message=summary)
    return created
