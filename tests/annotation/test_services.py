import threading
import time
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
        """The same key replays on its own assignment, and is refused on another one (it would otherwise
        return the first assignment's judgment for the second, which would stay unjudged)."""
        make_comparison(), make_comparison()
        a = services.assignment_lease_next(annotator=annotator)
        first = submit(a, annotator, idempotency_key="k1")
        assert submit(a, annotator, idempotency_key="k1") == first
        b = services.assignment_lease_next(annotator=annotator)
        assert b.comparison_id != a.comparison_id
        with pytest.raises(ValidationError, match="already used for another assignment"):
            submit(b, annotator, idempotency_key="k1")
        b.refresh_from_db()
        assert b.status == Assignment.Status.LEASED and Judgment.objects.count() == 1
        assert submit(b, annotator, idempotency_key="k2").assignment_id == b.pk

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

    def test_submitting_into_frozen_batch_is_refused_by_the_database(self, make_comparison, annotator):
        """The services never try it (see TestFreezeLosesNoWork); the triggers refuse it all the same."""
        comparison = make_comparison(overlap=2)
        first = services.assignment_lease_next(annotator=annotator)
        submit(first, annotator)
        batch = services.batch_freeze(batch=Batch.objects.get())
        with pytest.raises(IntegrityError, match="frozen"), transaction.atomic():
            Judgment.objects.create(comparison=comparison, source=Judgment.Source.IMPORTED, chosen="A")
        assert comparison.judgments.count() == 1
        assert selectors.batch_content_hash(batch=batch) == batch.content_hash

    def test_freezing_twice_is_refused(self, make_comparison, annotator):
        batch = services.batch_freeze(batch=self._judged(make_comparison, [annotator], 2))
        with pytest.raises(ValidationError, match="already frozen"):
            services.batch_freeze(batch=batch)


def this_week(part: int = 1) -> str:
    year, week, _ = timezone.localtime().isocalendar()
    return services.batch_label(year, week, part)


def assert_hash_holds(batch: Batch) -> None:
    batch.refresh_from_db()
    assert batch.is_frozen and selectors.batch_content_hash(batch=batch) == batch.content_hash


@pytest.mark.django_db
class TestFreezeLosesNoWork:
    """Freezing the batch of the current week mid-week, with work open on it (docs/annotation.md)."""

    def test_the_week_goes_on_in_its_next_batch(self, make_comparison, annotator):
        make_comparison()
        submit(services.assignment_lease_next(annotator=annotator), annotator)
        first = services.batch_freeze(batch=services.batch_open_for())
        assert first.label == this_week() and first.part == 1
        make_comparison()
        j = submit(services.assignment_lease_next(annotator=annotator), annotator)  # today: "Batch ... is frozen"
        second = j.comparison.batch
        assert (second.label, second.part, second.status) == (this_week(2), 2, Batch.Status.OPEN)
        assert services.batch_open_for() == second
        assert_hash_holds(first)
        assert services.batch_freeze(batch=second).is_frozen
        make_comparison()
        assert submit(services.assignment_lease_next(annotator=annotator), annotator).comparison.batch.label == this_week(3)

    def test_a_lease_open_across_the_freeze_is_saved_in_an_open_batch(self, make_comparison, annotator,
                                                                       other_annotator):
        comparison = make_comparison(overlap=2, text="Kept?")
        submit(services.assignment_lease_next(annotator=annotator), annotator)
        late = services.assignment_lease_next(annotator=other_annotator)  # on screen while the batch freezes
        frozen = services.batch_freeze(batch=Batch.objects.get())
        late.refresh_from_db()
        carry = late.comparison
        assert late.status == Assignment.Status.LEASED  # today: cancelled, and the work is lost
        assert carry.carried_from == comparison and carry.batch is None and carry.overlap == 1
        assert (carry.prompt_id, carry.response_a_id, carry.response_b_id) == (
            comparison.prompt_id, comparison.response_a_id, comparison.response_b_id)
        assert services.assignment_lease_next(annotator=other_annotator) == late  # the same lease, the same page
        j = submit(late, other_annotator, chosen="B")
        assert j.comparison == carry and j.assignment == late and j.comparison.batch.label == this_week(2)
        assert comparison.judgments.count() == 1
        assert_hash_holds(frozen)

    def test_the_remaining_overlap_is_carried_over_and_offered_to_others_only(self, make_comparison, make_user,
                                                                              annotator):
        comparison = make_comparison(overlap=3)
        submit(services.assignment_lease_next(annotator=annotator), annotator)
        done = make_comparison()
        submit(services.assignment_lease_next(annotator=annotator), annotator)
        services.batch_freeze(batch=Batch.objects.get())
        carry = Comparison.objects.get(carried_from__isnull=False)
        assert carry.carried_from == comparison and carry.overlap == 2  # `done` owes nothing: not carried
        assert not Comparison.objects.filter(carried_from=done).exists()
        assert services.assignment_lease_next(annotator=annotator) is None  # it judged this pair already
        for name in ("second", "third"):
            user = make_user(name)
            lease = services.assignment_lease_next(annotator=user)
            assert lease.comparison == carry
            assert submit(lease, user).comparison.batch.label == this_week(2)
        assert services.assignment_lease_next(annotator=make_user("fourth")) is None
        assert Judgment.objects.filter(comparison__in=[comparison, carry]).count() == 3

    def test_a_carry_over_is_carried_over_again(self, make_comparison, annotator, other_annotator, make_user):
        original = make_comparison(overlap=3)
        submit(services.assignment_lease_next(annotator=annotator), annotator)
        services.batch_freeze(batch=Batch.objects.get())
        lease = services.assignment_lease_next(annotator=other_annotator)
        submit(lease, other_annotator)
        second = services.batch_freeze(batch=services.batch_open_for())
        first_carry = Comparison.objects.get(pk=lease.comparison_id)
        carry = Comparison.objects.get(carried_from=first_carry)
        assert first_carry.carried_from == original and first_carry.batch == second
        assert carry.overlap == 1
        assert services.assignment_lease_next(annotator=other_annotator) is None
        assert services.assignment_lease_next(annotator=make_user("third")).comparison == carry

    def test_a_carry_over_takes_its_pairs_side_of_the_split(self, make_comparison, annotator, make_user):
        """No pair is held out in one batch and trained on in another."""
        make_comparison(overlap=2), make_comparison(overlap=2)
        for _ in range(2):
            submit(services.assignment_lease_next(annotator=annotator), annotator)
        first = services.batch_freeze(batch=Batch.objects.get(), test_size=1)
        held = Comparison.objects.get(batch=first, is_test=True)
        other = make_user("other")
        for _ in range(2):
            submit(services.assignment_lease_next(annotator=other), other)
        second = services.batch_freeze(batch=services.batch_open_for(), test_size=0)
        assert list(second.comparisons.filter(is_test=True).values_list("carried_from", flat=True)) == [held.id]
        assert second.test_size == 1 and second.comparisons.count() == 2

    def test_the_queue_never_hands_out_a_frozen_comparison(self, make_comparison, annotator, other_annotator,
                                                           make_user):
        make_comparison(overlap=3)
        submit(services.assignment_lease_next(annotator=annotator), annotator)
        frozen = services.batch_freeze(batch=Batch.objects.get())
        lease = services.assignment_lease_next(annotator=other_annotator)
        assert lease.comparison.batch is None and lease.comparison.carried_from.batch == frozen
        with pytest.raises(IntegrityError, match="frozen batch"), transaction.atomic():
            Assignment.objects.create(comparison=lease.comparison.carried_from, annotator=make_user("third"),
                                      displayed_order="AB", leased_at=timezone.now())

    def test_freezing_a_label_twice_names_the_weeks_open_batch(self, make_comparison, annotator):
        make_comparison(), make_comparison()
        submit(services.assignment_lease_next(annotator=annotator), annotator)
        first = services.batch_freeze(batch=Batch.objects.get())
        submit(services.assignment_lease_next(annotator=annotator), annotator)
        with pytest.raises(ValidationError, match=rf"{first.label} is already frozen\. Its week goes on in "
                                                  rf"{this_week(2)}\."):
            services.batch_freeze(batch=first)

    def test_the_monday_beat_freezes_whichever_part_of_last_week_is_open(self, make_comparison, annotator):
        last_week = timezone.now() - timedelta(days=7)
        first = services.batch_open_for(when=last_week)
        Comparison.objects.filter(pk=make_comparison().pk).update(batch=first)
        services.batch_freeze(batch=first)
        second = services.batch_open_for(when=last_week)
        assert second.part == 2 and second.label == first.label + ".2"
        assert services.batch_freeze_previous_week() == second
        second.refresh_from_db()
        assert second.is_frozen and services.batch_freeze_previous_week() is None


@contextmanager
def held_open(work, *, release_after: float):
    """Run `work()` in another thread and connection inside a transaction, and commit it release_after
    seconds after it is done (the block below runs meanwhile, against its uncommitted writes and locks).
    Yields a list that holds work's result once it ran."""
    from django.db import connections

    done, results, errors = threading.Event(), [], []

    def hold():
        try:
            with transaction.atomic():
                results.append(work())
                done.set()
                time.sleep(release_after)
        except Exception as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)
            done.set()
        finally:
            connections.close_all()

    thread = threading.Thread(target=hold)
    thread.start()
    assert done.wait(10)
    try:
        yield results
    finally:
        thread.join()
        assert not errors, errors


@pytest.mark.django_db(transaction=True)
def test_a_freeze_waits_for_the_judgment_in_flight(make_comparison, annotator, other_annotator):
    """A comparison's first judgment is written but not committed when the batch is frozen: the freeze waits
    for it and hashes it (today it hashes without it, the judgment commits into the frozen batch after, and
    the stored hash no longer matches the content)."""
    if connection.vendor != "postgresql":
        pytest.skip("row locks need PostgreSQL (SQLite serializes all writers)")
    make_comparison()
    submit(services.assignment_lease_next(annotator=annotator), annotator)  # the week's batch exists
    batch = Batch.objects.get()
    make_comparison()
    lease = services.assignment_lease_next(annotator=other_annotator)
    with held_open(lambda: submit(lease, other_annotator), release_after=0.5) as judged:
        started = time.monotonic()
        frozen = services.batch_freeze(batch=batch)
        waited = time.monotonic() - started
    assert_hash_holds(frozen)
    judgment = Judgment.objects.get(pk=judged[0].pk)
    assert judgment.comparison.batch == frozen and frozen.comparisons.count() == 2 and waited > 0.3


@pytest.mark.django_db(transaction=True)
def test_a_judgment_waits_for_the_freeze_in_flight(make_comparison, annotator, other_annotator):
    """A freeze is running (not committed) when a comparison's first judgment comes: the judgment waits for
    it and lands in the week's next batch (today it reads the batch as open, commits into it after the
    freeze, and the stored hash no longer matches the content)."""
    if connection.vendor != "postgresql":
        pytest.skip("row locks need PostgreSQL (SQLite serializes all writers)")
    make_comparison()
    submit(services.assignment_lease_next(annotator=annotator), annotator)
    batch = Batch.objects.get()
    make_comparison()
    lease = services.assignment_lease_next(annotator=other_annotator)
    with held_open(lambda: services.batch_freeze(batch=batch), release_after=0.5):
        started = time.monotonic()
        judgment = submit(lease, other_annotator)
        waited = time.monotonic() - started
    assert_hash_holds(batch)
    assert batch.comparisons.count() == 1 and waited > 0.3
    assert judgment.comparison.batch.label == this_week(2)


@pytest.mark.django_db(transaction=True)
def test_a_lease_carried_over_while_its_judgment_is_on_the_way(make_comparison, annotator, other_annotator):
    """The freeze holds the batch when the judgment of a lease on it arrives: the judgment waits, and lands
    with the carry-over its lease was moved to, in the week's next batch."""
    if connection.vendor != "postgresql":
        pytest.skip("row locks need PostgreSQL (SQLite serializes all writers)")
    comparison = make_comparison(overlap=2)
    submit(services.assignment_lease_next(annotator=annotator), annotator)
    lease = services.assignment_lease_next(annotator=other_annotator)
    batch = Batch.objects.get()
    with held_open(lambda: services.batch_freeze(batch=batch), release_after=0.5):
        judgment = submit(lease, other_annotator)
    assert judgment.comparison.carried_from == comparison and judgment.comparison.batch.label == this_week(2)
    assert_hash_holds(batch)


@pytest.mark.django_db
def test_the_queue_skips_pairs_the_annotator_was_given(make_comparison, annotator):
    """More carry-overs of pairs this annotator judged than a lease tries: the queue passes over them
    and hands out the fresh comparison behind them (it would otherwise try each, be refused each time
    by the database, and answer that nothing is left)."""
    for _ in range(services.MAX_LEASE_ATTEMPTS + 1):
        make_comparison(overlap=2)
        submit(services.assignment_lease_next(annotator=annotator), annotator)
    services.batch_freeze(batch=Batch.objects.get())
    assert Comparison.objects.filter(carried_from__isnull=False).count() == services.MAX_LEASE_ATTEMPTS + 1
    fresh = make_comparison()
    assert services.assignment_lease_next(annotator=annotator).comparison == fresh
