"""Sampling-job services: validation, the default arms, the prompt hooks, and duplicate-safe recording."""

import pytest
from django.core.exceptions import ImproperlyConfigured, ValidationError

from annotation import services as annotation_services
from annotation.models import Comparison, Prompt, Response
from policy import services
from policy.models import Checkpoint, GenerationJob
from tests.conftest import assert_imports_no_torch
from webapp.jobs import JobStatus


@pytest.fixture
def enqueued(monkeypatch) -> list[int]:
    """Job ids handed to the broker (the real .delay is replaced; the worker tests cover it)."""
    calls: list[int] = []
    monkeypatch.setattr(services, "_enqueue_generation", calls.append)
    return calls


@pytest.fixture(autouse=True)
def no_arms_from_the_environment(settings, monkeypatch):
    settings.TANDEM_DEFAULT_ARMS = ""
    monkeypatch.delenv("TANDEM_DEFAULT_ARMS", raising=False)


def weights(name: str) -> Checkpoint:
    return Checkpoint.objects.create(name=name, format=Checkpoint.Format.META, path=f"/models/{name}")


def prompt(text: str = "What is the capital of France?", **fields) -> Prompt:
    return annotation_services.prompt_create(text=text, source=fields.pop("source", Prompt.Source.DEMO), **fields)


@pytest.mark.django_db
def test_job_create_enqueues_after_commit(django_capture_on_commit_callbacks, enqueued, admin_user) -> None:
    a, b = weights("a"), weights("b")
    prompts = [prompt(), prompt("What sound does a cow make?")]
    with django_capture_on_commit_callbacks(execute=True):
        job = services.generation_job_create(prompts=prompts, arm_a=(a, 0.7), arm_b=(b, 1.0), max_new_tokens=32,
                                             seed=5, created_by=admin_user)
        assert enqueued == []  # not before the commit
    assert enqueued == [job.pk]
    job.refresh_from_db()
    assert (job.arm_a_checkpoint, job.arm_a_temperature, job.arm_b_checkpoint, job.arm_b_temperature) == (a, 0.7, b, 1.0)
    assert (job.status, job.max_new_tokens, job.seed, job.created_by) == (JobStatus.QUEUED, 32, 5, admin_user)
    assert set(job.prompts.all()) == set(prompts)


@pytest.mark.django_db
@pytest.mark.parametrize("bad", [
    {"arm_a": "external"}, {"arm_a": ("a", -0.1)}, {"arm_b": ("b", float("nan"))}, {"arm_b": ("a", 0.7)},
    {"prompts": []}, {"prompts": "unsaved"}, {"max_new_tokens": 0}, {"max_new_tokens": True}, {"seed": -1},
    {"arm_a": ("a",)},
])  # fmt: skip
def test_job_create_refuses_bad_input_and_writes_nothing(bad, enqueued) -> None:
    a, b = weights("a"), weights("b")
    external = Checkpoint.objects.create(name="answers-only", format=Checkpoint.Format.EXTERNAL)
    named = {"a": a, "b": b}
    kwargs = {"prompts": [prompt()], "arm_a": (a, 0.7), "arm_b": (b, 1.0), "max_new_tokens": 16, "seed": 0}
    for key, value in bad.items():
        if value == "external":
            value = (external, 0.7)
        elif value == "unsaved":
            value = [Prompt(text="x", source="demo")]
        elif isinstance(value, tuple):
            value = (named[value[0]], *value[1:])
        kwargs[key] = value
    with pytest.raises(ValidationError):
        services.generation_job_create(**kwargs)
    assert GenerationJob.objects.count() == 0


@pytest.mark.django_db
def test_default_arms(settings) -> None:
    assert services.generation_arms_default() is None
    Checkpoint.objects.create(name="api-model", format=Checkpoint.Format.EXTERNAL)
    assert services.generation_arms_default() is None  # answers only, nothing to sample from
    base = weights("demo-base")
    assert services.generation_arms_default() == ((base, 0.7), (base, 1.2))
    sft = weights("demo-sft")
    assert services.generation_arms_default() == ((sft, 0.7), (base, 1.0))
    settings.TANDEM_DEFAULT_ARMS = "demo-base@0.5, demo-sft@0.9"
    assert services.generation_arms_default() == ((base, 0.5), (sft, 0.9))
    settings.TANDEM_DEFAULT_ARMS = "demo-rlhf-1@0.7,demo-sft@0.7"
    assert services.generation_arms_default() is None  # not trained yet
    for spec in ("demo-sft", "demo-sft@hot,demo-base@1", "demo-sft@0.7", "a@1,b@2,c@3", "demo-sft@-1,demo-base@1"):
        settings.TANDEM_DEFAULT_ARMS = spec
        with pytest.raises(ImproperlyConfigured):
            services.generation_arms_default()


@pytest.mark.django_db
def test_annotator_prompt_waits_without_checkpoints_and_is_queued_with_them(
    django_capture_on_commit_callbacks, enqueued, annotator, settings
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        lonely = annotation_services.prompt_write(author=annotator, text="Is anyone there?")
    assert lonely.awaiting_responses and GenerationJob.objects.count() == 0 and enqueued == []
    base, sft = weights("demo-base"), weights("demo-sft")
    with django_capture_on_commit_callbacks(execute=True):
        written = annotation_services.prompt_write(author=annotator, text="What is 2 plus 2?")
    job = GenerationJob.objects.get()
    assert enqueued == [job.pk] and list(job.prompts.all()) == [written]
    assert (job.arm_a_checkpoint, job.arm_b_checkpoint, job.created_by) == (sft, base, annotator)
    # A broken setting keeps the prompt (waiting) instead of failing the annotator's request.
    settings.TANDEM_DEFAULT_ARMS = "demo-sft"
    kept = annotation_services.prompt_write(author=annotator, text="Still there?")
    assert kept.awaiting_responses and GenerationJob.objects.count() == 1


@pytest.mark.django_db
def test_continuation_is_queued_with_its_context(django_capture_on_commit_callbacks, enqueued, annotator,
                                                 make_comparison) -> None:
    comparison = make_comparison(text="What sound does a cow make?", a="A cow says moo.", b="Woof.")
    assignment = annotation_services.assignment_lease_next(annotator=annotator)
    judgment = annotation_services.judgment_submit(
        assignment=assignment, annotator=annotator, chosen="A", strength=2,
        safety=annotation_services.SafetyLabels(a_safe=True, b_safe=True))
    weights("demo-base")
    with django_capture_on_commit_callbacks(execute=True):
        follow = annotation_services.prompt_continue(judgment=judgment, author=annotator,
                                                     text="And how many legs does it have?")
    job = GenerationJob.objects.get()
    assert enqueued == [job.pk] and list(job.prompts.all()) == [follow]
    assert follow.context == [{"role": "user", "content": comparison.prompt.text},
                              {"role": "assistant", "content": "A cow says moo."}]


@pytest.mark.django_db
def test_prompts_answer_waiting_skips_prompts_already_in_active_jobs(enqueued, annotator) -> None:
    waiting = [prompt(awaiting_responses=True), prompt("What is 3 plus 4?", awaiting_responses=True)]
    prompt("Not waiting.")
    assert services.prompts_answer_waiting() is None  # no checkpoint yet
    weights("demo-base")
    job = services.prompts_answer_waiting()
    assert set(job.prompts.all()) == set(waiting)
    assert services.prompts_answer_waiting() is None  # all of them are in an active job
    services.generation_job_update(job=job, status=JobStatus.FAILED, error="worker lost")
    assert set(services.prompts_answer_waiting().prompts.all()) == set(waiting)


@pytest.mark.django_db
def test_pair_record_is_duplicate_safe_and_names_the_origin(enqueued, annotator) -> None:
    a, b = weights("a"), weights("b")
    mine = annotation_services.prompt_write(author=annotator, text="What is 2 plus 2?")
    demo = prompt(awaiting_responses=True)
    job = services.generation_job_create(prompts=[mine, demo], arm_a=(a, 0.7), arm_b=(a, 1.2))
    record = dict(top_p=0.9, sampling={"seed": 3, "max_new_tokens": 8})
    first = services.generation_pair_record(job=job, prompt=mine, text_a="4.", text_b="Five.", **record)
    assert services.generation_pair_record(job=job, prompt=mine, text_a="4!", text_b="5!", **record) is None
    other = services.generation_pair_record(job=job, prompt=demo, text_a="Paris.", text_b="Rome.", **record)
    assert (first.origin, other.origin) == (Comparison.Origin.ANNOTATOR_PROMPT, Comparison.Origin.SAMPLING)
    assert Response.objects.count() == 4 and Comparison.objects.count() == 2
    ra = first.response_a
    assert (ra.checkpoint, ra.temperature, ra.top_p, ra.text) == (a, 0.7, 0.9, "4.")
    assert ra.sampling == {"seed": 3, "max_new_tokens": 8, "job": job.pk}
    assert (first.response_b.checkpoint, first.response_b.temperature) == (a, 1.2)
    mine.refresh_from_db()
    job.refresh_from_db()
    assert not mine.awaiting_responses and job.comparisons_created == 2
    assert services.generation_prompts_done(job=job, prompts=[mine, demo]) == {mine.pk, demo.pk}
    # Another job with other arms still has work to do on the same prompt.
    other_arms = services.generation_job_create(prompts=[mine], arm_a=(a, 0.7), arm_b=(b, 1.0))
    assert services.generation_prompts_done(job=other_arms, prompts=[mine]) == set()


def test_enqueueing_never_imports_torch() -> None:
    """The web process imports the task module to enqueue, the world to make demo prompts, the command
    module to list commands: none of it may pull in torch."""
    assert_imports_no_torch("import webapp.celery, workers.generation, policy.services, policy.demo_world, "
                            "annotation.services, policy.management.commands.policy_demo_build; "
                            "policy.demo_world.default_world().sample(5, seed=0)")
