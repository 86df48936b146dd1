"""Response generation: the task in-process (resume after a crash, too-long prompts, cancellation) and
through the broker and a real worker process (an annotator's prompt answered; a redelivered job)."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from django.conf import settings as django_settings

from annotation import services as annotation_services
from annotation.models import Comparison, Prompt, Response
from policy import services
from policy.models import GenerationJob
from tests.conftest import wait_for
from webapp.jobs import JobStatus
from workers import generation
from workers.generation import generate_responses

# The worker process reads its model roots from the environment when it starts, and pytest imports
# every test module before the first test (and so before the session's worker) runs: adding the
# root of this module's checkpoints here lets the worker load them. The first root stays first.
MODEL_ROOT = Path(tempfile.gettempdir()) / f"tandem-test-models{os.environ.get('TANDEM_TEST_DB_SUFFIX', '')}-{os.getpid()}"
os.environ["TANDEM_MODEL_ROOTS"] = ",".join(dict.fromkeys([*map(str, django_settings.TANDEM_MODEL_ROOTS), str(MODEL_ROOT)]))

TINY = dict(vocab_size=400, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, multiple_of=16, max_seq_len=64,
            base_steps=2, base_dialogs=32, knowledge_repeats=1, sft_steps=2, sft_dialogs=32, batch_size=8,
            warmup_steps=1, eval_prompts=0, device="cpu")  # fmt: skip


@pytest.fixture(scope="session")
def tiny_checkpoints() -> list[dict]:
    """demo-base and demo-sft at a tiny size, built once for the session."""
    from policy.demo_policy import DemoBuildConfig, build_demo_policy

    shutil.rmtree(MODEL_ROOT, ignore_errors=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield build_demo_policy(MODEL_ROOT / "demo", DemoBuildConfig(**TINY))
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(MODEL_ROOT, ignore_errors=True)


@pytest.fixture
def arms(tiny_checkpoints, settings):
    settings.TANDEM_MODEL_ROOTS = [*settings.TANDEM_MODEL_ROOTS, MODEL_ROOT]
    settings.TANDEM_DEFAULT_ARMS = ""
    base, sft = services.demo_checkpoints_register(built=tiny_checkpoints)
    return services.generation_arms_default()


@pytest.fixture
def in_process(monkeypatch):
    """Run the task in this process: nothing goes to the broker, one thread for the tiny model."""
    monkeypatch.setattr(services, "_enqueue_generation", lambda job_id: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def demo_prompt(text: str, **fields) -> Prompt:
    return annotation_services.prompt_create(text=text, source=Prompt.Source.GENERATED, awaiting_responses=True,
                                             **fields)


@pytest.mark.django_db
def test_task_answers_every_prompt_with_both_arms(arms, in_process) -> None:
    (sft, sft_t), (base, base_t) = arms
    prompts = [demo_prompt("What is the capital of France?"),
               demo_prompt("And what about Spain?", system_prompt="Answer briefly.",
                           context=[{"role": "user", "content": "What is the capital of France?"},
                                    {"role": "assistant", "content": "Paris."}])]
    job = services.generation_job_create(prompts=prompts, arm_a=arms[0], arm_b=arms[1], max_new_tokens=12, seed=4)
    assert generate_responses(job.pk) == 2
    job.refresh_from_db()
    assert (job.status, job.progress, job.comparisons_created) == (JobStatus.SUCCEEDED, 1.0, 2)
    assert job.started_at <= job.finished_at and "2 of 2 prompts answered" in job.progress_message
    for p in prompts:
        comparison = Comparison.objects.get(prompt=p)
        assert comparison.origin == Comparison.Origin.SAMPLING
        a, b = comparison.response_a, comparison.response_b
        assert (a.checkpoint, a.temperature, b.checkpoint, b.temperature) == (sft, sft_t, base, base_t)
        assert a.top_p == generation.TOP_P
        assert a.sampling == {"seed": 4, "max_new_tokens": 12, "top_k": 0, "device": "cpu", "job": job.pk}
        p.refresh_from_db()
        assert not p.awaiting_responses
    # The dialog the arms answered carries the system prompt and the turns before.
    assert generation.prompt_dialog(prompts[1]) == [
        {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And what about Spain?"}]
    # The same prompts, arms and seed give the same answers: a job can be reproduced.
    copies = [demo_prompt(p.text, context=p.context, system_prompt=p.system_prompt) for p in prompts]
    again = services.generation_job_create(prompts=copies, arm_a=arms[0], arm_b=arms[1], max_new_tokens=12, seed=4)
    generate_responses(again.pk)
    for p, copy in zip(prompts, copies):
        first, second = Comparison.objects.get(prompt=p), Comparison.objects.get(prompt=copy)
        assert (first.response_a.text, first.response_b.text) == (second.response_a.text, second.response_b.text)


@pytest.mark.django_db
def test_a_crash_midway_resumes_without_duplicates(arms, in_process, monkeypatch) -> None:
    prompts = [demo_prompt(f"What is {n} plus 1?") for n in range(1, 4)]
    job = services.generation_job_create(prompts=prompts, arm_a=arms[0], arm_b=arms[1], max_new_tokens=6)
    monkeypatch.setattr(generation, "BATCH_SIZE", 1)
    record, calls = services.generation_pair_record, []

    def crash_on_second(**kwargs):
        calls.append(kwargs["prompt"].pk)
        if len(calls) == 2:
            raise RuntimeError("worker killed")
        return record(**kwargs)

    monkeypatch.setattr(services, "generation_pair_record", crash_on_second)
    generate_responses(job.pk)
    job.refresh_from_db()
    assert job.status == JobStatus.FAILED and "worker killed" in job.error
    assert Comparison.objects.count() == 1 and Response.objects.count() == 2
    calls.clear()
    monkeypatch.setattr(services, "generation_pair_record", lambda **kwargs: calls.append(1) or record(**kwargs))
    assert generate_responses(job.pk) == 2
    assert len(calls) == 2  # the restarted task samples only the two prompts left
    job.refresh_from_db()
    assert (job.status, job.error, job.comparisons_created) == (JobStatus.SUCCEEDED, "", 3)
    assert Comparison.objects.count() == 3 and Response.objects.count() == 6
    assert {c.prompt_id for c in Comparison.objects.all()} == {p.pk for p in prompts}
    # A redelivered message of the finished job, and the same prompts asked again by a new job of the
    # same arms, add nothing.
    assert generate_responses(job.pk) == 0
    GenerationJob.objects.filter(pk=job.pk).update(status=JobStatus.QUEUED)
    assert generate_responses(job.pk) == 0
    repeat = services.generation_job_create(prompts=prompts, arm_a=arms[0], arm_b=arms[1], max_new_tokens=6)
    assert generate_responses(repeat.pk) == 0 and Comparison.objects.count() == 3


@pytest.mark.django_db
def test_a_prompt_too_long_for_the_context_is_skipped_with_its_reason(arms, in_process) -> None:
    # Meta's params.json carries no context length: a loaded checkpoint has Llama 2's 4096 tokens.
    fits, too_long = demo_prompt("What is 2 plus 2?"), demo_prompt("What is the capital of France? " * 600)
    job = services.generation_job_create(prompts=[fits, too_long], arm_a=arms[0], arm_b=arms[1], max_new_tokens=6)
    assert generate_responses(job.pk) == 1
    job.refresh_from_db()
    assert job.status == JobStatus.SUCCEEDED and job.comparisons_created == 1
    assert f"Skipped 1: prompt {too_long.pk}:" in job.progress_message and "4096-token context" in job.progress_message
    assert not Comparison.objects.filter(prompt=too_long).exists()
    alone = services.generation_job_create(prompts=[too_long], arm_a=arms[0], arm_b=arms[1], max_new_tokens=6)
    assert generate_responses(alone.pk) == 0
    alone.refresh_from_db()
    assert alone.status == JobStatus.FAILED and f"prompt {too_long.pk}:" in alone.error


@pytest.mark.django_db
def test_cancelled_and_deleted_jobs_do_nothing(arms, in_process) -> None:
    job = services.generation_job_create(prompts=[demo_prompt("What is 2 plus 2?")], arm_a=arms[0], arm_b=arms[1])
    services.generation_job_update(job=job, status=JobStatus.CANCELLED)
    assert generate_responses(job.pk) == 0 and Comparison.objects.count() == 0
    assert generate_responses(10**9) == 0


@pytest.mark.worker
@pytest.mark.django_db(transaction=True)
def test_an_annotators_prompt_is_answered_by_the_worker(celery_worker_process, arms, annotator) -> None:
    (sft, sft_t), (base, base_t) = arms
    written = annotation_services.prompt_write(author=annotator, text="What sound does a cow make?")
    job = GenerationJob.objects.get(prompts=written)
    comparison = wait_for(lambda: Comparison.objects.filter(prompt=written).first(), timeout=120,
                          what="the worker to answer the prompt")
    assert comparison.origin == Comparison.Origin.ANNOTATOR_PROMPT
    assert (comparison.response_a.checkpoint, comparison.response_a.temperature) == (sft, sft_t)
    assert (comparison.response_b.checkpoint, comparison.response_b.temperature) == (base, base_t)
    job = wait_for(lambda: GenerationJob.objects.filter(pk=job.pk, status=JobStatus.SUCCEEDED).first(),
                   what="the job to finish")
    assert job.progress == 1.0 and job.comparisons_created == 1
    written.refresh_from_db()
    assert not written.awaiting_responses

    # The broker delivers the same job again (as after a worker lost before acknowledging it).
    GenerationJob.objects.filter(pk=job.pk).update(status=JobStatus.QUEUED)
    generate_responses.delay(job.pk)
    wait_for(lambda: GenerationJob.objects.filter(pk=job.pk, status=JobStatus.SUCCEEDED).exists(),
             what="the redelivered job to finish")
    assert Comparison.objects.filter(prompt=written).count() == 1
    assert Response.objects.filter(prompt=written).count() == 2
    assert celery_worker_process.poll() is None
