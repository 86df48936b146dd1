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


def test_one_weekly_batch_per_iso_week(db):
    Batch.objects.create(label="2026-W02", iso_year=2026, iso_week=2)
    refused(lambda: Batch.objects.create(label="other", iso_year=2026, iso_week=2))


def test_negative_temperature_refused(make_comparison):
    response = make_comparison().response_a
    refused(lambda: Response.objects.filter(pk=response.pk).update(temperature=-0.1))
