import threading
from contextlib import contextmanager
from datetime import timedelta

import pytest
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection, transaction
from django.http import Http404
from django.utils import timezone

from annotation import selectors, services
from annotation.models import Assignment, Batch, Comparison, Judgment
from annotation.services import SafetyLabels

SAFE = SafetyLabels(a_safe=True, b_safe=True)


def submit(assignment, user, **kw):
    fields = dict(chosen="A", strength=2, safety=SAFE)
    fields.update(kw)
    return services.judgment_submit(assignment=assignment, annotator=user, **fields)


@pytest.mark.django_db
class TestLeasing:
    def test_returns_current_lease_until_submitted(self, make_comparison, annotator):
        make_comparison(), make_comparison()
        first = services.assignment_lease_next(annotator=annotator)
        assert services.assignment_lease_next(annotator=annotator) == first
        submit(first, annotator)
        second = services.assignment_lease_next(annotator=annotator)
        assert second.comparison_id != first.comparison_id

    def test_overlap_one_means_one_annotator(self, make_comparison, annotator, other_annotator):
        make_comparison()
        assert services.assignment_lease_next(annotator=annotator) is not None
        assert services.assignment_lease_next(annotator=other_annotator) is None

    def test_overlap_two_gives_two_annotators(self, make_comparison, annotator, other_annotator, make_user):
        comparison = make_comparison(overlap=2)
        assert services.assignment_lease_next(annotator=annotator).comparison == comparison
        assert services.assignment_lease_next(annotator=other_annotator).comparison == comparison
        assert services.assignment_lease_next(annotator=make_user("third")) is None

    def test_expired_lease_returns_to_queue(self, make_comparison, annotator, other_annotator, settings):
        make_comparison()
        mine = services.assignment_lease_next(annotator=annotator)
        later = timezone.now() + timedelta(seconds=settings.TANDEM_LEASE_SECONDS + 1)
        theirs = services.assignment_lease_next(annotator=other_annotator, now=later)
        assert theirs.comparison_id == mine.comparison_id
        mine.refresh_from_db()
        assert mine.status == Assignment.Status.EXPIRED
        with pytest.raises(ValidationError, match="expired"):
            submit(mine, annotator)

    def test_skip_frees_the_slot_and_never_returns(self, make_comparison, annotator, other_annotator):
        comparison = make_comparison()
        services.assignment_skip(assignment=services.assignment_lease_next(annotator=annotator), annotator=annotator)
        assert services.assignment_lease_next(annotator=annotator) is None
        assert services.assignment_lease_next(annotator=other_annotator).comparison == comparison

    def test_display_order_is_randomized_and_recorded(self, make_comparison, make_user):
        orders = set()
        for i in range(24):
            make_comparison()
            orders.add(services.assignment_lease_next(annotator=make_user(f"u{i}")).displayed_order)
        assert orders == {"AB", "BA"}


@pytest.mark.django_db(transaction=True)
def test_concurrent_leases_never_share_a_comparison(make_comparison, make_user):
    """Two connections lease at the same moment: each gets its own comparison."""
    if connection.vendor != "postgresql":
        pytest.skip("row locks with SKIP LOCKED need PostgreSQL (SQLite serializes all writers)")
    comparisons = [make_comparison() for _ in range(6)]
    users = [make_user(f"c{i}") for i in range(6)]
    barrier = threading.Barrier(len(users))
    leased, errors = [], []

    def lease(user):
        from django.db import connections

        try:
            barrier.wait()
            a = services.assignment_lease_next(annotator=user)
            leased.append(a.comparison_id if a else None)
        except Exception as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=lease, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(leased) == sorted(c.id for c in comparisons)


@contextmanager
def lease_held_open(annotator, *, release_after: float | None = None):
    """In another thread and connection, lease the next comparison for `annotator` and keep that transaction
    (and the row lock it took) open until the block ends, or for release_after seconds once the block starts.
    Yields the leased comparison's id."""
    from django.db import connections

    inside, release, leased = threading.Event(), threading.Event(), []

    def hold():
        with transaction.atomic():
            leased.append(services.assignment_lease_next(annotator=annotator).comparison_id)
            inside.set()
            release.wait(10)
        connections.close_all()

    thread = threading.Thread(target=hold)
    thread.start()
    inside.wait(10)
    if release_after is not None:
        threading.Timer(release_after, release.set).start()
    try:
        yield leased[0]
    finally:
        release.set()
        thread.join()


@pytest.mark.django_db(transaction=True)
def test_locked_comparison_is_skipped_not_waited_for(make_comparison, make_user):
    """While one transaction holds the lease lock, another annotator gets the next comparison."""
    if connection.vendor != "postgresql":
        pytest.skip("SKIP LOCKED needs PostgreSQL")
    first, second = make_comparison(), make_comparison()
    with lease_held_open(make_user("alice")) as alice:  # released only after bob's lease below
        bob = services.assignment_lease_next(annotator=make_user("bob")).comparison_id
    assert (alice, bob) == (first.id, second.id)


@pytest.mark.django_db(transaction=True)
def test_last_free_slot_is_waited_for_not_missed(make_comparison, make_user):
    """Two annotators lease the last comparison (overlap 2) at once: the second waits for the first's
    row lock and gets the other slot, instead of hearing that nothing is left."""
    if connection.vendor != "postgresql":
        pytest.skip("row locks need PostgreSQL (SQLite serializes all writers)")
    shared = make_comparison(overlap=2)
    with lease_held_open(make_user("alice"), release_after=0.3) as alice:  # bob's call blocks until then
        bob = services.assignment_lease_next(annotator=make_user("bob"))
    assert alice == shared.id and bob is not None and bob.comparison_id == shared.id
    # A third annotator finds both slots taken, after waiting for nobody.
    assert services.assignment_lease_next(annotator=make_user("carol")) is None


@pytest.mark.django_db
class TestJudging:
    def test_submit_records_labels_and_lands_in_open_batch(self, make_comparison, annotator):
        make_comparison()
        a = services.assignment_lease_next(annotator=annotator)
        j = submit(a, annotator, chosen="B", strength=3, safety=SafetyLabels(a_safe=False, b_safe=True),
                   harm_categories=["violence"], note="  careful  ", seconds_spent=12.5)
        a.refresh_from_db()
        year, week, _ = timezone.now().isocalendar()
        assert (j.chosen, j.strength, j.safety_bin, j.note) == ("B", 3, "chosen_safe_other_unsafe", "careful")
        assert a.status == "submitted" and a.submitted_at is not None
        assert j.comparison.batch.label == f"{year}-W{week:02d}"

    def test_replayed_submission_makes_one_judgment(self, make_comparison, annotator):
        make_comparison()
        a = services.assignment_lease_next(annotator=annotator)
        first = submit(a, annotator)
        again = submit(a, annotator, chosen="B")
        assert first == again and Judgment.objects.count() == 1 and again.chosen == "A"

    def test_idempotency_key_across_assignments(self, make_comparison, annotator):
        make_comparison(), make_comparison()
        a = services.assignment_lease_next(annotator=annotator)
        first = submit(a, annotator, idempotency_key="k1")
        assert submit(a, annotator, idempotency_key="k1") == first

    @pytest.mark.parametrize("bad", [dict(strength=4), dict(strength=-1), dict(strength="2"), dict(chosen="C"),
                                     dict(safety=SafetyLabels(a_safe=None, b_safe=True)),
                                     dict(harm_categories=["nope"]), dict(seconds_spent=-3)])
    def test_bad_input_is_refused_and_changes_nothing(self, make_comparison, annotator, bad):
        make_comparison()
        a = services.assignment_lease_next(annotator=annotator)
        with pytest.raises(ValidationError):
            submit(a, annotator, **bad)
        a.refresh_from_db()
        assert a.status == "leased" and not Judgment.objects.exists() and not Batch.objects.exists()

    def test_another_annotators_assignment_is_404(self, make_comparison, annotator, other_annotator):
        make_comparison()
        a = services.assignment_lease_next(annotator=annotator)
        with pytest.raises(Http404):
            submit(a, other_annotator)
        with pytest.raises(Http404):
            selectors.assignment_for_annotator(annotator=other_annotator, assignment_id=a.pk)

    def test_continuation_carries_the_dialogue(self, make_comparison, annotator):
        make_comparison(text="Hi?", a="Hello!", b="Go away.")
        a = services.assignment_lease_next(annotator=annotator)
        j = submit(a, annotator, chosen="A")
        p = services.prompt_continue(judgment=j, author=annotator, text="Tell me more")
        assert p.context == [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"}]
        assert p.awaiting_responses and p.source == "continuation"

    def test_bad_context_is_refused(self, annotator):
        with pytest.raises(ValidationError):
            services.prompt_create(text="x", source="demo", context=[{"role": "assistant", "content": "hi"}])


@pytest.mark.django_db
class TestFreeze:
    def _judged(self, make_comparison, users, n):
        for i in range(n):
            make_comparison()
            a = services.assignment_lease_next(annotator=users[i % len(users)])
            submit(a, users[i % len(users)])
        return Batch.objects.get()

    def test_freeze_hashes_and_holds_out_a_slice(self, make_comparison, annotator):
        batch = self._judged(make_comparison, [annotator], 20)
        frozen = services.batch_freeze(batch=batch)
        assert frozen.status == "frozen" and len(frozen.content_hash) == 64
        assert Comparison.objects.filter(batch=batch, is_test=True).count() == 2 == frozen.test_size
        assert selectors.batch_content_hash(batch=frozen) == frozen.content_hash

    def test_test_slice_size_rule(self, settings):
        assert services.test_slice_size(50_000) == 1000
        assert services.test_slice_size(200) == 20
        assert services.test_slice_size(0) == 0

    def test_frozen_batch_refuses_changes_at_the_database(self, make_comparison, annotator):
        batch = services.batch_freeze(batch=self._judged(make_comparison, [annotator], 3))
        judgment = Judgment.objects.first()
        for change in (
            lambda: Judgment.objects.filter(pk=judgment.pk).update(strength=0),
            lambda: Judgment.objects.filter(pk=judgment.pk).delete(),
            lambda: Comparison.objects.filter(batch=batch).update(is_test=False),
            lambda: judgment.comparison.response_a.__class__.objects.filter(pk=judgment.comparison.response_a_id).update(text="edited"),
            lambda: judgment.comparison.prompt.__class__.objects.filter(pk=judgment.comparison.prompt_id).update(text="edited"),
            lambda: Batch.objects.filter(pk=batch.pk).update(status="open", frozen_at=None, content_hash="", test_size=0),
        ):
            with pytest.raises(IntegrityError, match="frozen"), transaction.atomic():
                change()
        assert selectors.batch_content_hash(batch=batch) == batch.content_hash

    def test_submitting_into_frozen_batch_is_refused(self, make_comparison, annotator, other_annotator):
        comparison = make_comparison(overlap=2)
        submit(services.assignment_lease_next(annotator=annotator), annotator)
        late = services.assignment_lease_next(annotator=other_annotator)
        services.batch_freeze(batch=Batch.objects.get())
        with pytest.raises(ValidationError):
            submit(late, other_annotator)
        assert comparison.judgments.count() == 1

    def test_freezing_twice_is_refused(self, make_comparison, annotator):
        batch = services.batch_freeze(batch=self._judged(make_comparison, [annotator], 2))
        with pytest.raises(ValidationError, match="already frozen"):
            services.batch_freeze(batch=batch)
