"""Each invariant is refused by the database itself, not only by the services."""
import pytest
from django.db import IntegrityError, transaction
from django.utils import timezone

from annotation.models import Assignment, Batch, Comparison, Judgment, Response

pytestmark = pytest.mark.django_db


def refused(fn):
    with pytest.raises(IntegrityError), transaction.atomic():
        fn()


def _assignment(comparison, user):
    return Assignment.objects.create(comparison=comparison, annotator=user, displayed_order="AB",
                                     leased_at=timezone.now())


def _judgment(assignment, **overrides):
    fields = dict(comparison=assignment.comparison, assignment=assignment, annotator=assignment.annotator,
                  chosen="A", strength=2, a_safe=True, b_safe=True, safety_bin="both_safe")
    fields.update(overrides)
    return Judgment.objects.create(**fields)


def test_strength_out_of_range_refused(make_comparison, annotator):
    assignment = _assignment(make_comparison(), annotator)
    refused(lambda: _judgment(assignment, strength=4))


def test_chosen_must_be_a_or_b(make_comparison, annotator):
    assignment = _assignment(make_comparison(), annotator)
    refused(lambda: _judgment(assignment, chosen="C"))


def test_safety_bin_must_follow_the_labels(make_comparison, annotator):
    assignment = _assignment(make_comparison(), annotator)
    refused(lambda: _judgment(assignment, chosen="A", a_safe=False, b_safe=True, safety_bin="both_safe"))
    j = _judgment(assignment, chosen="A", a_safe=False, b_safe=True, safety_bin="chosen_unsafe_other_safe")
    assert j.pk


def test_human_judgment_needs_strength_and_safety(make_comparison, annotator):
    assignment = _assignment(make_comparison(), annotator)
    refused(lambda: _judgment(assignment, strength=None))
    refused(lambda: _judgment(assignment, a_safe=None, b_safe=None, safety_bin=""))


def test_responses_must_differ(make_comparison):
    comparison = make_comparison()
    refused(lambda: Comparison.objects.filter(pk=comparison.pk).update(response_b=comparison.response_a))


def test_one_assignment_per_comparison_and_annotator(make_comparison, annotator):
    comparison = make_comparison()
    _assignment(comparison, annotator)
    refused(lambda: _assignment(comparison, annotator))


def test_one_judgment_per_assignment(make_comparison, annotator):
    assignment = _assignment(make_comparison(), annotator)
    _judgment(assignment)
    refused(lambda: _judgment(assignment))


def test_judgment_must_match_its_assignments_comparison(make_comparison, annotator):
    assignment = _assignment(make_comparison(), annotator)
    other = make_comparison()
    refused(lambda: _judgment(assignment, comparison=other))


def test_submitted_assignment_needs_time(make_comparison, annotator):
    assignment = _assignment(make_comparison(), annotator)
    refused(lambda: Assignment.objects.filter(pk=assignment.pk).update(status="submitted"))


def test_frozen_batch_needs_hash(db):
    batch = Batch.objects.create(label="2026-W01", iso_year=2026, iso_week=1)
    refused(lambda: Batch.objects.filter(pk=batch.pk).update(status="frozen", frozen_at=timezone.now()))


def _frozen(batch):
    Batch.objects.filter(pk=batch.pk).update(status="frozen", frozen_at=timezone.now(), content_hash="0" * 64)
    batch.refresh_from_db()
    return batch


def test_one_open_weekly_batch_per_iso_week(db):
    first = Batch.objects.create(label="2026-W02", iso_year=2026, iso_week=2)
    refused(lambda: Batch.objects.create(label="other", iso_year=2026, iso_week=2, part=2))
    _frozen(first)
    second = Batch.objects.create(label="2026-W02.2", iso_year=2026, iso_week=2, part=2)  # the week goes on
    refused(lambda: Batch.objects.create(label="again", iso_year=2026, iso_week=2, part=3))
    refused(lambda: Batch.objects.filter(pk=first.pk).update(status="open", frozen_at=None, content_hash=""))
    _frozen(second)
    refused(lambda: Batch.objects.create(label="twice", iso_year=2026, iso_week=2, part=2))  # parts are numbered once
    refused(lambda: Batch.objects.create(label="zero", iso_year=2026, iso_week=3, part=0))


def _carry_over(comparison, **overrides):
    fields = dict(prompt=comparison.prompt, response_a=comparison.response_a, response_b=comparison.response_b,
                  origin=comparison.origin, carried_from=comparison)
    fields.update(overrides)
    return Comparison.objects.create(**fields)


def test_a_pair_has_one_original_and_carry_overs_repeat_it(make_comparison):
    comparison = make_comparison()
    other = make_comparison()
    refused(lambda: _carry_over(comparison, carried_from=None))  # a second original of the pair
    refused(lambda: _carry_over(comparison, response_b=other.response_b))  # not the pair it carries
    refused(lambda: _carry_over(comparison, prompt=other.prompt))
    carry = _carry_over(comparison)
    refused(lambda: _carry_over(comparison))  # one carry-over per comparison: they form a chain
    assert _carry_over(carry).carried_from == carry


def test_no_lease_on_a_frozen_batch(make_comparison, annotator, other_annotator):
    comparison = make_comparison(overlap=2)
    batch = Batch.objects.create(label="2026-W04", iso_year=2026, iso_week=4)
    Comparison.objects.filter(pk=comparison.pk).update(batch=batch)
    expired = _assignment(comparison, other_annotator)
    Assignment.objects.filter(pk=expired.pk).update(status="expired")
    leased = _assignment(comparison, annotator)
    refused(lambda: _frozen(batch))  # a batch freezes only once its leases moved on
    Assignment.objects.filter(pk=leased.pk).update(status="skipped")
    _frozen(batch)
    refused(lambda: Assignment.objects.filter(pk=expired.pk).update(status="leased"))
    Assignment.objects.filter(pk=leased.pk).delete()
    refused(lambda: _assignment(comparison, annotator))


def test_an_assignment_moves_only_while_leased_to_its_carry_over(make_comparison, annotator, other_annotator):
    comparison, unrelated = make_comparison(overlap=2), make_comparison()
    leased, submitted = _assignment(comparison, annotator), _assignment(comparison, other_annotator)
    _judgment(submitted)
    Assignment.objects.filter(pk=submitted.pk).update(status="submitted", submitted_at=timezone.now())
    carry = _carry_over(comparison)
    refused(lambda: Assignment.objects.filter(pk=leased.pk).update(comparison=unrelated))
    refused(lambda: Assignment.objects.filter(pk=submitted.pk).update(comparison=carry))
    Assignment.objects.filter(pk=leased.pk).update(comparison=carry)
    assert Assignment.objects.get(pk=leased.pk).comparison == carry


def test_an_annotator_is_given_a_pair_once(make_comparison, annotator, other_annotator):
    comparison = make_comparison(overlap=2)
    _assignment(comparison, annotator)
    carry = _carry_over(comparison)
    refused(lambda: _assignment(carry, annotator))
    assert _assignment(carry, other_annotator).pk


def test_negative_temperature_refused(make_comparison):
    response = make_comparison().response_a
    refused(lambda: Response.objects.filter(pk=response.pk).update(temperature=-0.1))
