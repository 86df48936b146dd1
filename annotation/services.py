"""Every write of the annotation side: leasing, judging, writing prompts, freezing batches.

Services are keyword-only and atomic; bad input raises django.core.exceptions.ValidationError with
a message meant for the person who sent it, and nothing is written.
"""
import hashlib
import json
import secrets
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection, transaction
from django.db.models import (
    BigIntegerField, Count, Exists, F, Max, OuterRef, Q, QuerySet, Subquery, TextField, Value,
)
from django.db.models.functions import Cast, Coalesce, StrIndex
from django.db.models.lookups import GreaterThan
from django.http import Http404
from django.utils import timezone

from .models import (
    Assignment,
    Batch,
    Comparison,
    Judgment,
    Prompt,
    Response,
    safety_bin_for,
)
from . import selectors

HARM_CATEGORIES = (
    "violence", "self_harm", "sexual", "hate", "harassment", "illegal_activity", "weapons",
    "privacy", "misinformation", "malware", "other",
)
MAX_NOTE_LENGTH = 5000
MAX_PROMPT_LENGTH = 20000
MAX_LEASE_ATTEMPTS = 20


@dataclass(frozen=True)
class SafetyLabels:
    a_safe: bool
    b_safe: bool


# --- batches ------------------------------------------------------------------------------------

def batch_label(year: int, week: int, part: int = 1) -> str:
    """"2026-W49" for a week's first batch; "2026-W49.2" for the one opened after it was frozen, ..."""
    return f"{year}-W{week:02d}" + (f".{part}" if part > 1 else "")


def _iso_week(when: datetime | None = None) -> tuple[int, int]:
    year, week, _ = timezone.localtime(when or timezone.now()).isocalendar()
    return year, week


def batch_open_for(*, when: datetime | None = None) -> Batch:
    """The open weekly batch of `when`'s ISO week, opened if the week has none (yet, or any more).

    A week's judgments land in its open batch. The first is part 1, "2026-W49"; once that is frozen,
    the week's next judgment opens part 2, "2026-W49.2", and so on. At most one batch of a week is
    open (a constraint), so this is the only place a weekly batch is opened.
    """
    return _week_open_batch(*_iso_week(when))[0]


def _week_open_batch(year: int, week: int) -> tuple[Batch, bool]:
    """batch_open_for, and whether this call opened the batch."""
    weekly = Batch.objects.filter(kind=Batch.Kind.WEEKLY, iso_year=year, iso_week=week)
    batch = weekly.filter(status=Batch.Status.OPEN).first()
    if batch is not None:
        return batch, False
    part = (weekly.aggregate(last=Max("part"))["last"] or 0) + 1
    try:
        with transaction.atomic():
            return Batch.objects.create(kind=Batch.Kind.WEEKLY, iso_year=year, iso_week=week, part=part,
                                        label=batch_label(year, week, part)), True
    except IntegrityError:  # a concurrent transaction opened it first
        return weekly.get(status=Batch.Status.OPEN), False


def test_slice_size(n_comparisons: int, *, size: int | None = None) -> int:
    """The paper held out 1,000 comparisons per batch; smaller batches keep a fraction (10%)."""
    if size is not None:
        if not 0 <= size <= n_comparisons:
            raise ValidationError(f"test size must be between 0 and {n_comparisons}, got {size}.")
        return size
    fraction = round(n_comparisons * settings.TANDEM_TEST_SLICE_FRACTION)
    return min(settings.TANDEM_TEST_SLICE_SIZE, max(fraction, 1 if n_comparisons >= 2 else 0))


def _held_out_order(batch: Batch, comparison_id: int) -> str:
    # A deterministic shuffle: the same batch always holds out the same comparisons.
    return hashlib.sha256(f"{batch.label}:{comparison_id}".encode()).hexdigest()


@transaction.atomic
def batch_freeze(*, batch: Batch, test_size: int | None = None) -> Batch:
    """Freeze a batch: choose its held-out slice, hash its content, refuse every later change.

    Freezing loses no work (docs/annotation.md):

    - Judgments in flight finish first. The batch row is locked FOR UPDATE before anything is read,
      and a submission locks the batch it lands in FOR SHARE before it locks or writes anything else
      (judgment_submit_once): one that got there first commits and is hashed with the batch; one
      that comes later waits for the freeze, then lands in the week's open batch ("2026-W49.2").
    - What the batch still owes is carried over. A comparison with fewer judgments than its overlap,
      or with a lease open on it, gets a carry-over: a comparison of the same prompt and responses,
      `carried_from` it, owing the rest. Open leases move to it, so an annotator with the comparison
      on screen submits as usual and the judgment lands with the carry-over, in an open batch. The
      queue hands out carry-overs, never a comparison of a frozen batch (a trigger refuses that lease).

    The held-out slice: carry-overs of pairs held out before, then comparisons drawn up to the slice
    size; a carry-over of a pair trained on is never held out. The frozen batch never changes again
    (triggers), so its hash stays its content's hash.
    A label names one batch: "2026-W49" is the week's first part, frozen or not; the week's open
    part is batch_open_for's, and the Monday beat freezes whichever part of last week is open.
    """
    batch = Batch.objects.select_for_update().get(pk=batch.pk)
    if batch.is_frozen:
        raise ValidationError(_already_frozen(batch))
    # The comparisons are locked too: a lease being taken on one of them right now either commits first
    # (and is carried over below) or waits, then finds the comparison frozen and takes another.
    comparisons = list(Comparison.objects.select_for_update(of=("self",)).filter(batch=batch)
                       .select_related("carried_from").order_by("id"))
    judged = dict(Judgment.objects.filter(comparison__batch=batch).order_by().values_list("comparison")
                  .annotate(n=Count("id")))
    leased = Counter(Assignment.objects.filter(comparison__batch=batch, status=Assignment.Status.LEASED)
                     .values_list("comparison_id", flat=True))
    Comparison.objects.bulk_create([
        Comparison(prompt_id=c.prompt_id, response_a_id=c.response_a_id, response_b_id=c.response_b_id,
                   origin=c.origin, overlap=max(c.overlap - judged.get(c.id, 0), leased[c.id]), carried_from=c)
        for c in comparisons if judged.get(c.id, 0) < c.overlap or leased[c.id]
    ])
    Assignment.objects.filter(comparison__batch=batch, status=Assignment.Status.LEASED).update(
        comparison=Subquery(Comparison.objects.filter(carried_from=OuterRef("comparison")).values("id"))
    )
    # A carry-over repeats the pair of an earlier batch: it takes that pair's side of the split, so no pair
    # is held out in one batch and trained on in another. The others are drawn as usual.
    carried = [c for c in comparisons if c.carried_from_id is not None]
    held_out = [c.id for c in carried if c.carried_from.is_test]
    drawn = sorted((c.id for c in comparisons if c.carried_from_id is None), key=lambda cid: _held_out_order(batch, cid))
    held_out += drawn[:max(test_slice_size(len(comparisons), size=test_size) - len(held_out), 0)]
    n_test = len(held_out)
    Comparison.objects.filter(batch=batch).update(is_test=False)
    Comparison.objects.filter(id__in=held_out).update(is_test=True)
    batch.content_hash = selectors.batch_content_hash(batch=batch)
    batch.test_size = n_test
    batch.status = Batch.Status.FROZEN
    batch.frozen_at = timezone.now()
    batch.save(update_fields=["content_hash", "test_size", "status", "frozen_at"])
    return batch


def _already_frozen(batch: Batch) -> str:
    message = f"Batch {batch.label} is already frozen."
    if batch.kind == Batch.Kind.WEEKLY:
        week_open = Batch.objects.filter(kind=Batch.Kind.WEEKLY, iso_year=batch.iso_year, iso_week=batch.iso_week,
                                         status=Batch.Status.OPEN).first()
        if week_open is not None:
            message += f" Its week goes on in {week_open.label}."
    return message


def batch_freeze_previous_week(*, now: datetime | None = None) -> Batch | None:
    """What the Monday beat runs: freeze last ISO week's batch if it is still open."""
    year, week, _ = timezone.localtime((now or timezone.now()) - timedelta(days=7)).isocalendar()
    batch = Batch.objects.filter(kind=Batch.Kind.WEEKLY, iso_year=year, iso_week=week, status=Batch.Status.OPEN).first()
    return batch_freeze(batch=batch) if batch else None


# --- prompts and comparisons -------------------------------------------------------------------

def _clean_text(text: str, *, field: str, max_length: int = MAX_PROMPT_LENGTH) -> str:
    if not isinstance(text, str) or not text.strip():
        raise ValidationError({field: "This field may not be blank."})
    if len(text) > max_length:
        raise ValidationError({field: f"At most {max_length} characters (got {len(text)})."})
    if "\x00" in text:
        raise ValidationError({field: "NUL characters are not allowed."})
    return text.strip()


def validate_context(context: Sequence[dict]) -> list[dict]:
    """Prior turns: user/assistant alternating, starting with user, ending with assistant."""
    if not isinstance(context, list | tuple):
        raise ValidationError({"context": "Must be a list of {role, content} turns."})
    turns = []
    for i, turn in enumerate(context):
        if not isinstance(turn, dict) or set(turn) != {"role", "content"}:
            raise ValidationError({"context": f"Turn {i} must have exactly 'role' and 'content'."})
        expected = "user" if i % 2 == 0 else "assistant"
        if turn["role"] != expected:
            raise ValidationError({"context": f"Turn {i} must be '{expected}', got {turn['role']!r}."})
        turns.append({"role": expected, "content": _clean_text(turn["content"], field="context")})
    if len(turns) % 2:
        raise ValidationError({"context": "The prior turns must end with an assistant turn."})
    return turns


@transaction.atomic
def prompt_create(
    *, text: str, source: str, context: Sequence[dict] = (), author: AbstractBaseUser | None = None,
    is_adversarial: bool = False, tags: Sequence[str] = (), language: str = "en", system_prompt: str = "",
    awaiting_responses: bool = False, external_id: str = "", continues: Judgment | None = None,
) -> Prompt:
    return Prompt.objects.create(
        text=_clean_text(text, field="text"), context=validate_context(list(context)), source=source,
        author=author, is_adversarial=is_adversarial, tags=[str(t)[:50] for t in tags][:20], language=language,
        system_prompt=system_prompt, awaiting_responses=awaiting_responses, external_id=external_id,
        continues=continues,
    )


def _request_answers(prompt: Prompt) -> Prompt:
    """Ask the default sampling arms to answer the prompt once it commits (if any checkpoint can)."""
    from policy.services import prompt_answer_request

    prompt_answer_request(prompt=prompt)
    return prompt


@transaction.atomic
def prompt_write(*, author: AbstractBaseUser, text: str, is_adversarial: bool = False) -> Prompt:
    """An annotator writes a fresh prompt; the workers answer it with the default arms."""
    return _request_answers(prompt_create(
        text=text, source=Prompt.Source.ANNOTATOR, author=author, is_adversarial=is_adversarial,
        tags=["safety"] if is_adversarial else [], awaiting_responses=True,
    ))


@transaction.atomic
def prompt_continue(*, judgment: Judgment, author: AbstractBaseUser, text: str) -> Prompt:
    """The annotator's next user message: the dialogue so far, with the chosen response, becomes
    the context of a new prompt that waits for responses."""
    if judgment.annotator_id != author.pk:
        raise Http404("No such judgment.")
    comparison = judgment.comparison
    prompt = comparison.prompt
    chosen = comparison.response_a if judgment.chosen == Judgment.Choice.A else comparison.response_b
    context = [*prompt.context, {"role": "user", "content": prompt.text}, {"role": "assistant", "content": chosen.text}]
    return _request_answers(prompt_create(
        text=text, source=Prompt.Source.CONTINUATION, context=context, author=author,
        is_adversarial=prompt.is_adversarial, tags=prompt.tags, language=prompt.language,
        system_prompt=prompt.system_prompt, awaiting_responses=True, continues=judgment,
    ))


@transaction.atomic
def comparison_create(
    *, prompt: Prompt, response_a: Response, response_b: Response, origin: str, overlap: int | None = None
) -> Comparison:
    if response_a.prompt_id != prompt.pk or response_b.prompt_id != prompt.pk:
        raise ValidationError("Both responses must answer the comparison's prompt.")
    if response_a.pk == response_b.pk:
        raise ValidationError("A comparison needs two different responses.")
    overlap = settings.TANDEM_DEFAULT_OVERLAP if overlap is None else overlap
    if not 1 <= overlap <= 50:
        raise ValidationError({"overlap": "Must be between 1 and 50."})
    comparison = Comparison.objects.create(
        prompt=prompt, response_a=response_a, response_b=response_b, origin=origin, overlap=overlap
    )
    if prompt.awaiting_responses:
        prompt.awaiting_responses = False
        prompt.save(update_fields=["awaiting_responses"])
    return comparison


# --- leasing ----------------------------------------------------------------------------------

def _lease_cutoff(now: datetime) -> datetime:
    return now - timedelta(seconds=settings.TANDEM_LEASE_SECONDS)


def _taken_slots(cutoff: datetime) -> Q:
    return Q(status=Assignment.Status.SUBMITTED) | Q(status=Assignment.Status.LEASED, leased_at__gte=cutoff)


def _pair_given_to(annotator: AbstractBaseUser) -> Exists:
    """Whether the annotator was already given the outer comparison's pair of responses, in it or in
    the comparison it carries over (or its carry-over): a person judges a pair once (a trigger too)."""
    return Exists(Assignment.objects.filter(annotator=annotator, comparison__response_a=OuterRef("response_a"),
                                            comparison__response_b=OuterRef("response_b")))


class _ComparisonFull(Exception):
    """Raised inside a lease attempt's savepoint to roll it back (and release the row lock)."""


@transaction.atomic
def assignment_lease_next(*, annotator: AbstractBaseUser, now: datetime | None = None,
                          tags: Sequence[str] = ()) -> Assignment | None:
    """The annotator's current lease, or a new one on the oldest comparison with a free slot (and, given
    tags, whose prompt carries every one of them; they choose among new leases, not the current one).

    Candidate rows are locked with SKIP LOCKED so concurrent annotators take different comparisons
    without waiting; only when every candidate left is locked does it wait for one. After the lock
    the free slots are counted again (a fresh statement sees leases committed meanwhile), so a
    comparison never gets more annotators than its overlap.
    """
    now = now or timezone.now()
    cutoff = _lease_cutoff(now)
    current = (
        Assignment.objects.filter(annotator=annotator, status=Assignment.Status.LEASED, leased_at__gte=cutoff)
        .order_by("leased_at").first()
    )
    if current:
        return current
    Assignment.objects.filter(annotator=annotator, status=Assignment.Status.LEASED, leased_at__lt=cutoff).update(
        status=Assignment.Status.EXPIRED
    )
    taken = (
        Assignment.objects.filter(comparison=OuterRef("pk")).filter(_taken_slots(cutoff))
        .values("comparison").annotate(n=Count("id")).values("n")
    )
    candidates = (
        Comparison.objects.filter(Q(batch__isnull=True) | Q(batch__status=Batch.Status.OPEN))
        .exclude(_pair_given_to(annotator))
        .annotate(taken=Coalesce(Subquery(taken), 0))
        .filter(taken__lt=F("overlap"))
        .order_by("id")
    )
    if tags and connection.features.supports_json_field_contains:  # PostgreSQL: jsonb @>
        candidates = candidates.filter(prompt__tags__contains=list(tags))
    elif tags:  # SQLite has no JSON containment: find each tag, quoted as json.dumps stored it, in the list's text
        for tag in tags:
            found_at = StrIndex(Cast("prompt__tags", TextField()), Value(json.dumps(tag)))
            candidates = candidates.filter(GreaterThan(found_at, 0))
    tried: list[int] = []
    for _ in range(MAX_LEASE_ATTEMPTS):
        remaining = candidates.exclude(id__in=tried)
        try:
            # A savepoint per attempt: rolling it back releases the row lock of a comparison found full, so
            # this transaction holds no comparison lock while it waits below, and two waiters cannot deadlock.
            with transaction.atomic():
                # Lock one row at a time: locking several would hide them all from concurrent annotators.
                comparison = remaining.select_for_update(skip_locked=True, of=("self",)).first()
                if comparison is None:
                    # Every comparison left with a free slot is locked by someone leasing or judging it right
                    # now. Those locks last milliseconds: wait for the oldest rather than answer "nothing to
                    # do" while a slot may still be free (two annotators on the last comparison of overlap 2).
                    comparison = remaining.select_for_update(of=("self",)).first()
                    if comparison is None:
                        return None
                tried.append(comparison.id)
                if Assignment.objects.filter(comparison=comparison).filter(_taken_slots(cutoff)).count() >= comparison.overlap:
                    raise _ComparisonFull
                # The slot of an expired lease is handed on; its holder can no longer submit.
                Assignment.objects.filter(
                    comparison=comparison, status=Assignment.Status.LEASED, leased_at__lt=cutoff
                ).update(status=Assignment.Status.EXPIRED)
                return Assignment.objects.create(
                    comparison=comparison, annotator=annotator, leased_at=now,
                    displayed_order=secrets.choice(Assignment.Order.values),
                )
        except _ComparisonFull:
            continue
        except IntegrityError:  # the same annotator leased it from another tab meanwhile
            continue
    return None


@transaction.atomic
def assignment_skip(*, assignment: Assignment, annotator: AbstractBaseUser) -> Assignment:
    assignment = _own_assignment_for_update(assignment_id=assignment.pk, annotator=annotator)
    if assignment.status != Assignment.Status.LEASED:
        raise ValidationError(f"This comparison is already {assignment.get_status_display().lower()}.")
    assignment.status = Assignment.Status.SKIPPED
    assignment.save(update_fields=["status"])
    return assignment


def _own_assignment_for_update(*, assignment_id: int, annotator: AbstractBaseUser) -> Assignment:
    try:
        return (
            Assignment.objects.select_for_update(of=("self",)).select_related("comparison")
            .get(pk=assignment_id, annotator=annotator)
        )
    except Assignment.DoesNotExist:
        raise Http404("No such assignment.") from None


# --- judging ----------------------------------------------------------------------------------

def _validate_judgment(
    *, chosen: str, strength: int, safety: SafetyLabels, harm_categories: Sequence[str], note: str,
    seconds_spent: float | None,
) -> None:
    errors = {}
    if chosen not in Judgment.Choice.values:
        errors["chosen"] = "Choose response A or B."
    if isinstance(strength, bool) or not isinstance(strength, int) or strength not in Judgment.Strength.values:
        errors["strength"] = "Strength must be 0 (negligibly), 1 (slightly), 2 (better) or 3 (significantly)."
    if not isinstance(safety.a_safe, bool) or not isinstance(safety.b_safe, bool):
        errors["safety"] = "Label each response safe or unsafe."
    unknown = [c for c in harm_categories if c not in HARM_CATEGORIES]
    if unknown:
        errors["harm_categories"] = f"Unknown harm categories: {', '.join(map(str, unknown))}."
    if len(note) > MAX_NOTE_LENGTH:
        errors["note"] = f"At most {MAX_NOTE_LENGTH} characters."
    if seconds_spent is not None and not 0 <= seconds_spent <= 86400:
        errors["seconds_spent"] = "Must be between 0 and 86400 seconds."
    if errors:
        raise ValidationError(errors)


def _locked_for_share(batches: QuerySet[Batch]) -> Batch | None:
    """The batch `batches` selects, its row locked FOR SHARE until the transaction ends (PostgreSQL;
    SQLite locks the whole database for a writer anyway).

    The ORM's select_for_update takes exclusive locks only, which would make each submission into a
    batch wait for the one before it. Shared locks let them run side by side, and still make
    batch_freeze's FOR UPDATE wait for every one in flight, and each later one wait for the freeze.
    A locking read returns the row as last committed, also when it had to wait for it.
    """
    sql, params = batches.order_by().query.sql_with_params()
    if connection.vendor == "postgresql":
        sql += " FOR SHARE"
    return next(iter(Batch.objects.raw(sql, params)), None)


def _expected_batch_locked(*, assignment_id: int, annotator: AbstractBaseUser, year: int, week: int) -> Batch | None:
    """Lock the batch a judgment of this assignment is expected to land in: its comparison's batch, else
    the week's open batch (None: the week has none open yet). It runs before the assignment and its
    comparison are locked, so submissions and batch_freeze take their locks in the same order (batch,
    then comparison and assignment) and never wait for each other in a circle."""
    own = Assignment.objects.filter(pk=assignment_id, annotator=annotator).values("comparison__batch")
    week_open = Batch.objects.filter(kind=Batch.Kind.WEEKLY, iso_year=year, iso_week=week,
                                     status=Batch.Status.OPEN).values("pk")
    return _locked_for_share(Batch.objects.filter(
        pk=Coalesce(Subquery(own), Subquery(week_open), output_field=BigIntegerField())))


def _assignment_locked(*, assignment_id: int, annotator: AbstractBaseUser, idempotency_key: str) -> Assignment:
    """The caller's assignment with its comparison, both locked FOR UPDATE, and `keyed_to`: the assignment
    whose judgment already carries the caller's Idempotency-Key (None: not used yet)."""
    keyed_to = (Subquery(Judgment.objects.filter(annotator=annotator, idempotency_key=idempotency_key)
                         .order_by().values("assignment_id")[:1])
                if idempotency_key else Value(None, output_field=BigIntegerField()))
    locked = (Assignment.objects.select_for_update(of=("self", "comparison")).select_related("comparison")
              .annotate(keyed_to=keyed_to).filter(pk=assignment_id, annotator=annotator))
    # Twice: a lease that a freeze carried over while this read waited for its lock no longer joins the
    # comparison the read found, and drops out of it; a second read finds it on its carry-over.
    for _ in range(2):
        if found := list(locked.all()):
            return found[0]
    raise Http404("No such assignment.")


def _lands_in(batch: Batch | None, comparison: Comparison, *, year: int, week: int) -> bool:
    if batch is None or batch.is_frozen:
        return False
    if comparison.batch_id is not None:
        return comparison.batch_id == batch.pk
    return batch.kind == Batch.Kind.WEEKLY and (batch.iso_year, batch.iso_week) == (year, week)


def _landing_batch_locked(comparison: Comparison, *, year: int, week: int) -> Batch:
    """Where a judgment of the (locked) comparison lands, locked FOR SHARE, when the expected batch was
    not it: the week has no open batch yet (its first judgment, or the first after a freeze), a freeze
    carried the lease over, or another annotator's first judgment gave the comparison its batch."""
    for _ in range(3):
        if comparison.batch_id is not None:
            batch = _locked_for_share(Batch.objects.filter(pk=comparison.batch_id))
            if batch.is_frozen:  # unreachable: batch_freeze carries every lease over, a trigger refuses the rest
                raise ValidationError(f"Batch {batch.label} is frozen; judgments can no longer be added.")
            return batch
        batch, opened = _week_open_batch(year, week)
        if opened:  # no one else sees it before this transaction commits: nothing to lock it against
            return batch
        batch = _locked_for_share(Batch.objects.filter(pk=batch.pk))
        if not batch.is_frozen:
            return batch
        # frozen between batch_open_for's read and the lock: the next call opens the week's next batch
    raise ValidationError("The week's batch changed while this judgment was saved; nothing was saved. Submit again.")


@transaction.atomic
def judgment_submit_once(
    *, assignment_id: int, annotator: AbstractBaseUser, chosen: str, strength: int, safety: SafetyLabels,
    harm_categories: Sequence[str] = (), note: str = "", seconds_spent: float | None = None,
    idempotency_key: str = "", source: str = Judgment.Source.HUMAN,
) -> tuple[Judgment, bool]:
    """Record one judgment on a leased assignment, and say whether this call made it (True) or replayed
    it (False: the assignment was already judged, and its judgment comes back). An Idempotency-Key the
    annotator already used on another assignment is refused.

    The judgment lands in its comparison's batch or, for the comparison's first judgment, in the open
    batch of this ISO week (batch_open_for), and never in a frozen one: the batch is locked FOR SHARE
    before the assignment and its comparison are locked FOR UPDATE, so a batch_freeze (FOR UPDATE on
    the batch first) either waits for this judgment and hashes it with the batch, or has committed
    already, having carried this lease over to a comparison that lands in the week's open batch.

    Statements: the batch's lock; the assignment's and comparison's lock (with the key's earlier use);
    on a comparison's first judgment its batch; the judgment; the assignment's status. A replay reads
    its judgment instead. (test_submission_statements_are_pinned counts them.)
    """
    now = timezone.now()
    year, week = _iso_week(now)
    batch = _expected_batch_locked(assignment_id=assignment_id, annotator=annotator, year=year, week=week)
    assignment = _assignment_locked(assignment_id=assignment_id, annotator=annotator, idempotency_key=idempotency_key)
    if assignment.keyed_to not in (None, assignment.pk):
        raise ValidationError({"idempotency_key": "This Idempotency-Key was already used for another assignment."})
    if assignment.status == Assignment.Status.SUBMITTED:  # only a submission sets it, with the judgment
        return Judgment.objects.select_related("comparison__batch").get(assignment=assignment), False
    harm_categories = list(dict.fromkeys(harm_categories))
    _validate_judgment(chosen=chosen, strength=strength, safety=safety, harm_categories=harm_categories,
                       note=note, seconds_spent=seconds_spent)
    if assignment.status != Assignment.Status.LEASED:
        raise ValidationError(
            f"This comparison can no longer be judged: its lease is {assignment.get_status_display().lower()}."
        )
    comparison = assignment.comparison
    if not _lands_in(batch, comparison, year=year, week=week):
        batch = _landing_batch_locked(comparison, year=year, week=week)
    first_judgment = comparison.batch_id is None
    comparison.batch = batch
    if first_judgment:  # the comparison joins the batch
        comparison.save(update_fields=["batch"])
    judgment = Judgment.objects.create(
        comparison=comparison, assignment=assignment, annotator=annotator, source=source, chosen=chosen,
        strength=strength, a_safe=safety.a_safe, b_safe=safety.b_safe,
        safety_bin=safety_bin_for(chosen, safety.a_safe, safety.b_safe), harm_categories=harm_categories,
        note=note.strip(), seconds_spent=seconds_spent, idempotency_key=idempotency_key,
    )
    assignment.status = Assignment.Status.SUBMITTED
    assignment.submitted_at = now
    assignment.save(update_fields=["status", "submitted_at"])
    return judgment, True


def judgment_submit(
    *, assignment: Assignment, annotator: AbstractBaseUser, chosen: str, strength: int, safety: SafetyLabels,
    harm_categories: Sequence[str] = (), note: str = "", seconds_spent: float | None = None,
    idempotency_key: str = "", source: str = Judgment.Source.HUMAN,
) -> Judgment:
    """Record one judgment on a leased assignment (judgment_submit_once, which is atomic); a replay
    returns the judgment already made."""
    judgment, _ = judgment_submit_once(
        assignment_id=assignment.pk, annotator=annotator, chosen=chosen, strength=strength, safety=safety,
        harm_categories=harm_categories, note=note, seconds_spent=seconds_spent, idempotency_key=idempotency_key,
        source=source,
    )
    return judgment


# --- API: pushed comparisons and idempotent submission (annotation/api.py) ----------------------

MAX_RESPONSE_LENGTH = 50000


@dataclass(frozen=True)
class ResponseInput:
    """One response pushed from an external system; `checkpoint` is a name (created if new)."""
    text: str
    checkpoint: str
    temperature: float | None = None
    top_p: float | None = None
    sampling: dict | None = None


def _clean_response(response: ResponseInput, *, field: str) -> ResponseInput:
    errors = {}
    try:
        text = _clean_text(response.text, field=field, max_length=MAX_RESPONSE_LENGTH)
    except ValidationError as error:
        errors.update(error.message_dict)
        text = ""
    if response.temperature is not None and not 0 <= response.temperature <= 10:
        errors[f"{field}.temperature"] = "Must be between 0 and 10."
    if response.top_p is not None and not 0 < response.top_p <= 1:
        errors[f"{field}.top_p"] = "Must be in (0, 1]."
    sampling = response.sampling
    if sampling is not None and (not isinstance(sampling, dict) or len(str(sampling)) > 2000):
        errors[f"{field}.sampling"] = "Must be an object of at most 2000 characters."
    if errors:
        raise ValidationError(errors)
    return ResponseInput(text=text, checkpoint=response.checkpoint, temperature=response.temperature,
                         top_p=response.top_p, sampling=response.sampling or {})


@transaction.atomic
def comparison_push(
    *, text: str, response_a: ResponseInput, response_b: ResponseInput, context: Sequence[dict] = (),
    system_prompt: str = "", is_adversarial: bool = False, tags: Sequence[str] = (), language: str = "en",
    external_id: str = "", overlap: int | None = None,
) -> Comparison:
    """A comparison from an external system: prompt + context + two responses from named checkpoints
    (external checkpoints are created on first use). All or nothing; it joins the annotation queue."""
    from policy.services import checkpoint_get_or_create_external

    response_a = _clean_response(response_a, field="response_a")
    response_b = _clean_response(response_b, field="response_b")
    if response_a.text == response_b.text:
        raise ValidationError("The two responses are identical: there is nothing to compare.")
    if len(system_prompt) > MAX_PROMPT_LENGTH or "\x00" in system_prompt:
        raise ValidationError({"system_prompt": f"At most {MAX_PROMPT_LENGTH} characters, no NUL."})
    prompt = prompt_create(text=text, source=Prompt.Source.API, context=context, is_adversarial=is_adversarial,
                           tags=tags, language=language, system_prompt=system_prompt.strip(),
                           external_id=external_id[:200])
    responses = [
        Response.objects.create(prompt=prompt, checkpoint=checkpoint_get_or_create_external(name=r.checkpoint),
                                temperature=r.temperature, top_p=r.top_p, sampling=r.sampling, text=r.text)
        for r in (response_a, response_b)
    ]
    return comparison_create(prompt=prompt, response_a=responses[0], response_b=responses[1],
                             origin=Comparison.Origin.API, overlap=overlap)


@transaction.atomic
def comparison_push_many(*, items: Sequence[dict]) -> list[int]:
    """Several comparison_push calls in one transaction: every comparison is created, or none (the
    first invalid one raises, naming its index)."""
    ids = []
    for index, item in enumerate(items):
        try:
            ids.append(comparison_push(**item).pk)
        except ValidationError as error:
            raise ValidationError({f"comparisons[{index}]": error.messages}) from None
    return ids
