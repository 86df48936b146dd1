"""Reads of the annotation side that are more than one line."""
import hashlib
import json
from datetime import datetime

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import QuerySet
from django.utils import timezone

from .models import Assignment, Batch, Guidelines, Judgment, Prompt


def canonical_json(value) -> bytes:
    """One byte string per value: sorted keys, no whitespace, UTF-8."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def batch_canonical_rows(*, batch: Batch):
    """The batch's content in a canonical order and shape: what its hash covers."""
    judgments = (
        Judgment.objects.filter(comparison__batch=batch)
        .select_related("comparison__prompt", "comparison__response_a", "comparison__response_b")
        .order_by("id")
    )
    for j in judgments.iterator(chunk_size=2000):
        c = j.comparison
        yield {
            "judgment": j.id, "comparison": c.id, "is_test": c.is_test, "source": j.source,
            "annotator": j.annotator_id, "chosen": j.chosen, "strength": j.strength,
            "a_safe": j.a_safe, "b_safe": j.b_safe, "safety_bin": j.safety_bin,
            "harm_categories": j.harm_categories, "note": j.note,
            "prompt": {"text": c.prompt.text, "context": c.prompt.context, "system": c.prompt.system_prompt,
                       "adversarial": c.prompt.is_adversarial},
            "response_a": {"text": c.response_a.text, "checkpoint": c.response_a.checkpoint_id,
                           "temperature": c.response_a.temperature},
            "response_b": {"text": c.response_b.text, "checkpoint": c.response_b.checkpoint_id,
                           "temperature": c.response_b.temperature},
        }


def batch_content_hash(*, batch: Batch) -> str:
    digest = hashlib.sha256()
    digest.update(canonical_json({"batch": batch.label, "kind": batch.kind}))
    for row in batch_canonical_rows(batch=batch):
        digest.update(b"\n")
        digest.update(canonical_json(row))
    return digest.hexdigest()


def assignment_for_annotator(*, annotator: AbstractBaseUser, assignment_id: int) -> Assignment:
    """An annotator's own assignment with everything the page shows; 404 for anyone else's."""
    from django.shortcuts import get_object_or_404

    return get_object_or_404(
        Assignment.objects.select_related(
            "comparison__prompt", "comparison__response_a", "comparison__response_b", "comparison__batch"
        ),
        pk=assignment_id, annotator=annotator,
    )


def annotator_progress(*, annotator: AbstractBaseUser, now: datetime | None = None) -> dict:
    """Judgments done today and in the open batch of this week."""
    now = timezone.localtime(now or timezone.now())
    start_of_day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    year, week, _ = now.isocalendar()
    mine = Judgment.objects.filter(annotator=annotator)
    return {
        "today": mine.filter(created_at__gte=start_of_day).count(),
        "batch": mine.filter(comparison__batch__iso_year=year, comparison__batch__iso_week=week,
                             comparison__batch__kind=Batch.Kind.WEEKLY).count(),
    }


def prompts_awaiting_responses(*, author: AbstractBaseUser | None = None) -> QuerySet[Prompt]:
    prompts = Prompt.objects.filter(awaiting_responses=True).order_by("created_at")
    return prompts.filter(author=author) if author is not None else prompts


def guidelines_current() -> Guidelines | None:
    return Guidelines.objects.order_by("-updated_at").first()
