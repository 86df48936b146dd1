"""Database fixtures for reward-model runs: a tiny base checkpoint inside the model roots and frozen
batches of judged comparisons whose preferred response carries the marker word (tests.rewards.synthetic),
so a tiny reward model learns them in a few steps."""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.auth.models import Group, User

from annotation import services as annotation_services
from annotation.models import Batch, Comparison, Prompt, Response
from annotation.services import SafetyLabels
from policy import services as policy_services
from policy.models import Checkpoint
from tests.rewards import synthetic

# Small enough for a few seconds on one CPU thread, large enough to cross two checkpoints.
# The safety twin's share of a small batch depends on which comparisons the freeze holds out (a hash of
# their ids), so the minimum number of training pairs is lowered to keep every database's ids trainable.
TINY_CONFIG = {"micro_batch_size": 4, "max_seq_len": 64, "checkpoint_every": 2, "lr": 3e-3, "min_warmup_steps": 1,
               "eval_batch_size": 16, "mix": {"min_train_pairs": 4}}


def model_root() -> Path:
    return Path(settings.TANDEM_MODEL_ROOTS[0])


def write_tiny_base(folder: Path) -> Path:
    """A random tiny Llama in Meta's format with the synthetic tokenizer beside it, inside the model roots."""
    from policy.tokenizer import Tokenizer

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    tokenizer = synthetic.train_tokenizer(folder.parent / f".{folder.name}-tokenizer.model")
    synthetic.save_tiny_policy(folder, tokenizer, Tokenizer(tokenizer).n_words)
    return folder


def tiny_base_dir() -> Path:
    return model_root() / f"rm-tests-{os.getpid()}"


def register_base(folder: Path, name: str = "rm-base") -> Checkpoint:
    return policy_services.checkpoint_register(name=name, format=Checkpoint.Format.META, path=str(folder))


def judged_batch(n: int, *, seed: int = 0, adversarial_every: int = 3, test_size: int | None = None,
                 username: str = "rm-annotator", freeze: bool = True, weeks_ago: int = 0) -> Batch:
    """n comparisons judged by one annotator in this week's batch, then frozen (unless freeze=False).

    The response with the marker word is chosen; every adversarial_every-th prompt is adversarial;
    strengths are random; both responses are labelled safe. weeks_ago picks an earlier week's batch.
    """
    from datetime import timedelta

    from django.utils import timezone

    batch = annotation_services.batch_open_for(when=timezone.now() - timedelta(weeks=weeks_ago))
    rng = random.Random(seed)
    annotator = User.objects.filter(username=username).first()
    if annotator is None:
        annotator = User.objects.create_user(username=username, password="pw-for-tests-1")
        annotator.groups.add(Group.objects.get_or_create(name="annotator")[0])
    a_ckpt = policy_services.checkpoint_get_or_create_external(name="rm-arm-a")
    b_ckpt = policy_services.checkpoint_get_or_create_external(name="rm-arm-b")
    for k in range(n):
        words = [rng.choice(synthetic.WORDS) for _ in range(rng.randint(3, 8))]
        good = " ".join(words[:2] + [synthetic.MARKER] + words[2:])
        bad = " ".join(rng.choice(synthetic.WORDS) for _ in range(rng.randint(3, 8)))
        prompt = annotation_services.prompt_create(
            text=f"Tell me about {rng.choice(synthetic.TOPICS)}, please. ({seed}-{k})", source=Prompt.Source.DEMO,
            is_adversarial=k % adversarial_every == 0)
        good_is_a = rng.random() < 0.5
        ra = Response.objects.create(prompt=prompt, checkpoint=a_ckpt, text=good if good_is_a else bad)
        rb = Response.objects.create(prompt=prompt, checkpoint=b_ckpt, text=bad if good_is_a else good)
        comparison = annotation_services.comparison_create(prompt=prompt, response_a=ra, response_b=rb,
                                                           origin=Comparison.Origin.DEMO)
        Comparison.objects.filter(pk=comparison.pk).update(batch=batch)  # the week it is judged in
        assignment = annotation_services.assignment_lease_next(annotator=annotator)
        annotation_services.judgment_submit(assignment=assignment, annotator=annotator,
                                            chosen="A" if good_is_a else "B", strength=rng.randint(0, 3),
                                            safety=SafetyLabels(a_safe=True, b_safe=True))
    if freeze:
        batch = annotation_services.batch_freeze(batch=batch, test_size=test_size)
    return batch


@pytest.fixture(scope="session")
def rm_base_folder() -> Path:
    """The tiny base checkpoint's folder inside the model roots, written once per session."""
    folder = write_tiny_base(tiny_base_dir())
    yield folder
    shutil.rmtree(folder, ignore_errors=True)
    Path(folder.parent / f".{folder.name}-tokenizer.model").unlink(missing_ok=True)


@pytest.fixture
def rm_base(db, rm_base_folder) -> Checkpoint:
    return register_base(rm_base_folder)


@pytest.fixture
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
