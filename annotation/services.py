"""Every write of the annotation side: leasing, judging, writing prompts, freezing batches.

Services are keyword-only and atomic; bad input raises django.core.exceptions.ValidationError with
a message meant for the person who sent it, and nothing is written.
"""
import hashlib
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection, transaction
from django.db.models import Count, F, OuterRef, Q, Subquery, TextField, Value
from django.db.models.functions import Cast, Coalesce, StrIndex
from django.db.models.lookups import GreaterThan
from django.http import Http404
from django.utils import timezone

from webapp import prepared

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

def batch_label(year: int, week: int) -> str:
    return f"{year}-W{week:02d}"


def batch_open_for(*, when: datetime | None = None) -> Batch:
    """The weekly batch of `when`'s ISO week, created open if it does not exist yet."""
    year, week, _ = timezone.localtime(when or timezone.now()).isocalendar()
    batch, _ = Batch.objects.get_or_create(
        kind=Batch.Kind.WEEKLY, iso_year=year, iso_week=week, defaults={"label": batch_label(year, week)}
    )
    return batch


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
    """Freeze a batch: choose its held-out slice, hash its content, refuse every later change."""
    batch = Batch.objects.select_for_update().get(pk=batch.pk)
    if batch.is_frozen:
        raise ValidationError(f"Batch {batch.label} is already frozen.")
    comparison_ids = list(Comparison.objects.filter(batch=batch).values_list("id", flat=True))
    n_test = test_slice_size(len(comparison_ids), size=test_size)
    held_out = sorted(comparison_ids, key=lambda cid: _held_out_order(batch, cid))[:n_test]
    Comparison.objects.filter(batch=batch).update(is_test=False)
    Comparison.objects.filter(id__in=held_out).update(is_test=True)
    # Judgments that can no longer land: their leases end with the batch.
    Assignment.objects.filter(comparison__batch=batch, status=Assignment.Status.LEASED).update(
        status=Assignment.Status.CANCELLED
    )
    batch.content_hash = selectors.batch_content_hash(batch=batch)
    batch.test_size = n_test
    batch.status = Batch.Status.FROZEN
    batch.frozen_at = timezone.now()
    batch.save(update_fields=["content_hash", "test_size", "status", "frozen_at"])
    return batch


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
        .exclude(assignments__annotator=annotator)
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


@dataclass(frozen=True)
class _LockedAssignment:
    """An assignment row locked for a submission, with all a submission reads, from one statement."""
    id: int
    status: str
    comparison: Comparison  # id, batch_id and is_test loaded; batch cached when it has one
    open_batch: Batch | None  # this week's batch, which a comparison without one joins (None: not created yet)
    keyed_assignment_id: int | None  # the assignment whose judgment already carries the caller's key


def _lock_for_submission(*, assignment_id: int, annotator: AbstractBaseUser, idempotency_key: str) -> _LockedAssignment:
    """Lock the caller's assignment and its comparison, and read what judging it needs, in one statement.

    It runs on every submission, so it is written by hand: through the ORM the same reads were five
    statements (the assignment, the judgment already made, the comparison, its batch, this week's
    batch) and a millisecond of query compilation. A statement that waited for the locks sees the two
    locked rows as the concurrent transaction committed them (a replay finds the status "submitted"),
    but its joins and subquery still read the older snapshot: hence replays are recognised by the
    status, and a batch the comparison was given meanwhile is read again (see below). PostgreSQL
    plans it once per connection (webapp.prepared), as the writes that follow.
    """
    year, week, _ = timezone.localtime().isocalendar()
    lock = " FOR UPDATE OF a, c" if connection.features.has_select_for_update_of else ""
    with connection.cursor() as cursor:
        prepared.execute(
            cursor, "tandem_submission_lock",
            "SELECT a.status, c.id, c.batch_id, c.is_test, b.label, b.status, w.id, w.label, w.status, "
            "(SELECT j.assignment_id FROM annotation_judgment j WHERE j.annotator_id = %s "
            "AND j.idempotency_key = %s AND j.idempotency_key <> '') "
            "FROM annotation_assignment a JOIN annotation_comparison c ON c.id = a.comparison_id "
            "LEFT JOIN annotation_batch b ON b.id = c.batch_id "
            "LEFT JOIN annotation_batch w ON w.kind = %s AND w.iso_year = %s AND w.iso_week = %s "
            "WHERE a.id = %s AND a.annotator_id = %s" + lock,
            [annotator.pk, idempotency_key, Batch.Kind.WEEKLY, year, week, assignment_id, annotator.pk],
        )
        row = cursor.fetchone()
    if row is None:
        raise Http404("No such assignment.")
    status, comparison_id, batch_id, is_test, label, batch_status, open_id, open_label, open_status, keyed = row
    comparison = Comparison.from_db(connection.alias, ["id", "batch_id", "is_test"],
                                    [comparison_id, batch_id, bool(is_test)])  # SQLite returns 0 / 1
    if batch_id is not None:
        comparison.batch = (  # a batch set by the transaction this one waited for is not in the snapshot
            Batch.from_db(connection.alias, ["id", "label", "status"], [batch_id, label, batch_status])
            if label is not None else Batch.objects.get(pk=batch_id)
        )
    open_batch = (Batch.from_db(connection.alias, ["id", "label", "status"], [open_id, open_label, open_status])
                  if open_id is not None else None)
    return _LockedAssignment(id=assignment_id, status=status, comparison=comparison, open_batch=open_batch,
                             keyed_assignment_id=keyed)


@transaction.atomic
def judgment_submit(
    *, assignment: Assignment, annotator: AbstractBaseUser, chosen: str, strength: int, safety: SafetyLabels,
    harm_categories: Sequence[str] = (), note: str = "", seconds_spent: float | None = None,
    idempotency_key: str = "", source: str = Judgment.Source.HUMAN,
) -> Judgment:
    """Record one judgment on a leased assignment. A replay returns the judgment already made."""
    locked = _lock_for_submission(assignment_id=assignment.pk, annotator=annotator, idempotency_key=idempotency_key)
    if locked.status == Assignment.Status.SUBMITTED or locked.keyed_assignment_id is not None:
        existing = Judgment.objects.filter(
            Q(assignment_id=locked.id) | (Q(annotator=annotator, idempotency_key=idempotency_key)
                                          & ~Q(idempotency_key=""))
        ).first()
        if existing:
            return existing
    return _judgment_record(locked, annotator=annotator, chosen=chosen, strength=strength, safety=safety,
                            harm_categories=harm_categories, note=note, seconds_spent=seconds_spent,
                            idempotency_key=idempotency_key, source=source)


def _judgment_record(
    locked: _LockedAssignment, *, annotator: AbstractBaseUser, chosen: str, strength: int, safety: SafetyLabels,
    harm_categories: Sequence[str] = (), note: str = "", seconds_spent: float | None = None,
    idempotency_key: str = "", source: str = Judgment.Source.HUMAN,
) -> Judgment:
    """The writes of a submission, inside the caller's transaction, on an assignment it has locked:
    the comparison joins this week's batch if it has none, the judgment, the assignment's status."""
    harm_categories = list(dict.fromkeys(harm_categories))
    _validate_judgment(chosen=chosen, strength=strength, safety=safety, harm_categories=harm_categories,
                       note=note, seconds_spent=seconds_spent)
    if locked.status != Assignment.Status.LEASED:
        raise ValidationError(
            f"This comparison can no longer be judged: its lease is {Assignment.Status(locked.status).label.lower()}."
        )
    comparison = locked.comparison
    if comparison.batch_id is None:
        batch = locked.open_batch or batch_open_for()  # created by the week's first judgment
        if batch.is_frozen:
            raise ValidationError(f"Batch {batch.label} is frozen; judgments can no longer be added.")
        with connection.cursor() as cursor:  # by hand, as the lock: an ORM update costs ~0.3 ms to compile
            prepared.execute(cursor, "tandem_comparison_join_batch",
                             "UPDATE annotation_comparison SET batch_id = %s WHERE id = %s", [batch.pk, comparison.pk])
        comparison.batch = batch
    elif comparison.batch.is_frozen:
        raise ValidationError(f"Batch {comparison.batch.label} is frozen; judgments can no longer be added.")
    judgment = Judgment(
        comparison=comparison, assignment_id=locked.id, annotator=annotator, source=source, chosen=chosen,
        strength=strength, a_safe=safety.a_safe, b_safe=safety.b_safe,
        safety_bin=safety_bin_for(chosen, safety.a_safe, safety.b_safe), harm_categories=harm_categories,
        note=note.strip(), seconds_spent=seconds_spent, idempotency_key=idempotency_key,
    )
    _judgment_insert(judgment)
    submitted_at = Assignment._meta.get_field("submitted_at").get_db_prep_value(timezone.now(), connection)
    with connection.cursor() as cursor:
        prepared.execute(cursor, "tandem_assignment_submitted",
                         "UPDATE annotation_assignment SET status = %s, submitted_at = %s WHERE id = %s",
                         [Assignment.Status.SUBMITTED.value, submitted_at, locked.id])
    return judgment


def _judgment_insert(judgment: Judgment) -> None:
    """judgment.save() for a new row, as one hand-written INSERT ... RETURNING (prepared on PostgreSQL):
    the ORM compiled the same statement again on every submission. Values go through each field's
    pre_save (created_at) and get_db_prep_save, as the ORM's insert does."""
    fields = _JUDGMENT_INSERT_FIELDS
    values = [field.get_db_prep_save(field.pre_save(judgment, True), connection) for field in fields]
    with connection.cursor() as cursor:
        prepared.execute(cursor, "tandem_judgment_insert", _JUDGMENT_INSERT_SQL, values)
        judgment.pk = cursor.fetchone()[0]
    judgment._state.adding = False
    judgment._state.db = connection.alias


_JUDGMENT_INSERT_FIELDS = [f for f in Judgment._meta.concrete_fields if not f.primary_key]
_JUDGMENT_INSERT_SQL = (
    f"INSERT INTO {Judgment._meta.db_table} ({', '.join(f.column for f in _JUDGMENT_INSERT_FIELDS)}) "
    f"VALUES ({', '.join(['%s'] * len(_JUDGMENT_INSERT_FIELDS))}) RETURNING {Judgment._meta.pk.column}"
)


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
def judgment_submit_once(
    *, assignment_id: int, annotator: AbstractBaseUser, idempotency_key: str, **fields
) -> tuple[Judgment, bool]:
    """judgment_submit that also says whether this call made the judgment (True) or replayed it.

    The assignment row is locked first, so two concurrent replays of one submission serialize and
    the second sees the first's judgment. A key already used on another assignment is an error.
    """
    locked = _lock_for_submission(assignment_id=assignment_id, annotator=annotator, idempotency_key=idempotency_key)
    if locked.keyed_assignment_id is not None and locked.keyed_assignment_id != assignment_id:
        raise ValidationError({"idempotency_key": "This Idempotency-Key was already used for another assignment."})
    if locked.status == Assignment.Status.SUBMITTED:  # only a submission sets it, with the judgment
        return Judgment.objects.select_related("comparison__batch").get(assignment_id=assignment_id), False
    judgment = _judgment_record(locked, annotator=annotator, idempotency_key=idempotency_key, **fields)
    return judgment, True


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
