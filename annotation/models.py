"""The human side of the loop: prompts, responses, comparisons, assignments, judgments, batches.

Every invariant is a database constraint as well as a service check, so a bad row is refused even
when something bypasses the services. Rows of a frozen batch are guarded by triggers
(migration 0003) because "nothing in a frozen batch changes" spans several tables; so are the
rules of carrying work over a freeze (migration 0004): no lease stays on a frozen batch, a lease
moves only to its comparison's carry-over, an annotator is given a pair of responses once.
"""
from django.conf import settings
from django.db import models
from django.db.models import F, Q


class Batch(models.Model):
    """Judgments land in the open batch of their ISO week; freezing makes it immutable.

    A week's first batch is "2026-W49" (part 1). Frozen before the week is over, the week goes on in
    "2026-W49.2" (part 2), and so on: at most one batch of a week is open at a time, and a judgment of
    that week always lands in it (docs/annotation.md).
    """

    class Kind(models.TextChoices):
        WEEKLY = "weekly", "Weekly annotation"
        IMPORT = "import", "Imported data"

    class Status(models.TextChoices):
        OPEN = "open", "Open"
        FROZEN = "frozen", "Frozen"

    label = models.CharField(max_length=100, unique=True, help_text="e.g. 2026-W47")
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.WEEKLY)
    iso_year = models.PositiveSmallIntegerField(null=True, blank=True)
    iso_week = models.PositiveSmallIntegerField(null=True, blank=True)
    part = models.PositiveSmallIntegerField(
        default=1, help_text="The week's first batch is part 1; one opened after it froze mid-week is part 2, ..."
    )
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.OPEN)
    created_at = models.DateTimeField(auto_now_add=True)
    frozen_at = models.DateTimeField(null=True, blank=True)
    content_hash = models.CharField(max_length=64, blank=True, help_text="sha256 of the canonical serialization")
    test_size = models.PositiveIntegerField(default=0, help_text="Comparisons held out as the test slice")

    class Meta:
        ordering = ["-created_at"]
        verbose_name_plural = "batches"
        constraints = [
            models.CheckConstraint(condition=Q(status__in=["open", "frozen"]), name="batch_status_valid"),
            models.CheckConstraint(condition=Q(kind__in=["weekly", "import"]), name="batch_kind_valid"),
            models.CheckConstraint(
                condition=(Q(status="open", frozen_at__isnull=True, content_hash="", test_size=0))
                | (Q(status="frozen", frozen_at__isnull=False) & Q(content_hash__regex=r"^[0-9a-f]{64}$")),
                name="batch_frozen_has_hash_and_time",
            ),
            models.CheckConstraint(
                condition=~Q(kind="weekly")
                | Q(iso_year__gte=2000, iso_week__gte=1, iso_week__lte=53),
                name="batch_weekly_has_iso_week",
            ),
            models.CheckConstraint(condition=Q(part__gte=1), name="batch_part_positive"),
            models.UniqueConstraint(
                fields=["iso_year", "iso_week"], condition=Q(kind="weekly", status="open"),
                name="batch_one_open_per_iso_week",
            ),
            models.UniqueConstraint(
                fields=["iso_year", "iso_week", "part"], condition=Q(kind="weekly"), name="batch_week_part_unique"
            ),
        ]

    def __str__(self) -> str:
        return self.label

    @property
    def is_frozen(self) -> bool:
        return self.status == self.Status.FROZEN


class Guidelines(models.Model):
    """Annotation guidelines, admin-editable Markdown; the newest version is shown."""

    title = models.CharField(max_length=200, default="Annotation guidelines")
    body_markdown = models.TextField()
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-updated_at"]
        verbose_name_plural = "guidelines"

    def __str__(self) -> str:
        return self.title


class PromptSource(models.TextChoices):
    DEMO = "demo", "Demo content"
    ANNOTATOR = "annotator", "Written by an annotator"
    CONTINUATION = "continuation", "Next turn of a judged dialogue"
    API = "api", "Pushed over the API"
    HH_RLHF = "hh_rlhf", "Imported: Anthropic HH-RLHF"
    MT_BENCH = "mt_bench", "Imported: MT-bench"
    TRL = "trl", "Imported: TRL-style JSONL"
    GENERATED = "generated", "Generated prompt world"


class Prompt(models.Model):
    """A user message to be answered, with the dialogue that precedes it.

    `context` holds the prior turns as [{"role": "user"|"assistant", "content": str}, ...],
    alternating and starting with a user turn; `text` is the latest user message.
    """

    Source = PromptSource

    text = models.TextField()
    context = models.JSONField(default=list, blank=True)
    system_prompt = models.TextField(blank=True)
    source = models.CharField(max_length=32, choices=Source.choices)
    language = models.CharField(max_length=16, default="en")
    tags = models.JSONField(default=list, blank=True)
    is_adversarial = models.BooleanField(default=False, help_text="Safety-related / red-team prompt")
    author = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="prompts"
    )
    continues = models.ForeignKey(
        "Judgment", null=True, blank=True, on_delete=models.SET_NULL, related_name="continuations",
        help_text="The judgment whose dialogue this prompt continues",
    )
    awaiting_responses = models.BooleanField(default=False, help_text="Waits for response generation")
    external_id = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["awaiting_responses", "created_at"])]
        constraints = [
            models.CheckConstraint(condition=~Q(text=""), name="prompt_text_not_empty"),
            models.CheckConstraint(condition=Q(source__in=PromptSource.values), name="prompt_source_valid"),
            models.CheckConstraint(
                condition=~Q(source="annotator") | Q(author__isnull=False), name="prompt_annotator_has_author"
            ),
        ]

    def __str__(self) -> str:
        return self.text[:80]


class Response(models.Model):
    """One model answer to a prompt (with its context), and how it was sampled."""

    prompt = models.ForeignKey(Prompt, on_delete=models.CASCADE, related_name="responses")
    checkpoint = models.ForeignKey("policy.Checkpoint", on_delete=models.PROTECT, related_name="responses")
    temperature = models.FloatField(null=True, blank=True)
    top_p = models.FloatField(null=True, blank=True)
    sampling = models.JSONField(default=dict, blank=True, help_text="Other sampling parameters (seed, top_k, ...)")
    text = models.TextField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.CheckConstraint(
                condition=Q(temperature__isnull=True) | Q(temperature__gte=0), name="response_temperature_nonnegative"
            ),
            models.CheckConstraint(
                condition=Q(top_p__isnull=True) | (Q(top_p__gt=0) & Q(top_p__lte=1)), name="response_top_p_range"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.checkpoint_id}@{self.temperature}: {self.text[:60]}"


class ComparisonOrigin(models.TextChoices):
    DEMO = "demo", "Demo content"
    SAMPLING = "sampling", "Sampling job"
    ANNOTATOR_PROMPT = "annotator_prompt", "Prompt written by an annotator"
    CONTINUATION = "continuation", "Multi-turn continuation"
    API = "api", "Pushed over the API"
    IMPORT = "import", "Imported"
    SIMULATION = "simulation", "Simulated-annotator world"


class Comparison(models.Model):
    """A prompt with two responses to choose between. It enters a batch with its first judgment.

    When its batch is frozen before it has all the judgments its overlap asks for (or while someone
    holds a lease on it), the freeze makes a carry-over: a new comparison of the same prompt and
    responses, `carried_from` this one, owing the remaining judgments; open leases move to it. The
    carry-over enters a batch as any comparison does, with its first judgment.
    """

    Origin = ComparisonOrigin

    prompt = models.ForeignKey(Prompt, on_delete=models.CASCADE, related_name="comparisons")
    response_a = models.ForeignKey(Response, on_delete=models.PROTECT, related_name="+")
    response_b = models.ForeignKey(Response, on_delete=models.PROTECT, related_name="+")
    batch = models.ForeignKey(
        Batch, null=True, blank=True, on_delete=models.PROTECT, related_name="comparisons",
        help_text="Set by the first judgment: the open batch of that ISO week",
    )
    origin = models.CharField(max_length=32, choices=Origin.choices)
    overlap = models.PositiveSmallIntegerField(default=1, help_text="How many annotators judge it")
    is_test = models.BooleanField(default=False, help_text="In its batch's held-out test slice")
    carried_from = models.OneToOneField(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="carried_to",
        help_text="The comparison of a frozen batch whose remaining judgments this one collects",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        indexes = [models.Index(fields=["batch", "is_test"])]
        constraints = [
            models.CheckConstraint(condition=~Q(response_a=F("response_b")), name="comparison_responses_differ"),
            models.CheckConstraint(condition=Q(overlap__gte=1, overlap__lte=50), name="comparison_overlap_range"),
            models.CheckConstraint(condition=~Q(is_test=True) | Q(batch__isnull=False), name="comparison_test_in_batch"),
            models.CheckConstraint(condition=Q(origin__in=ComparisonOrigin.values), name="comparison_origin_valid"),
            # One original per pair; its carry-overs (same pair, same prompt: a trigger, migration 0004) follow it.
            models.UniqueConstraint(fields=["response_a", "response_b"], condition=Q(carried_from__isnull=True),
                                    name="comparison_pair_unique"),
        ]

    def __str__(self) -> str:
        return f"Comparison {self.pk}"


class AssignmentStatus(models.TextChoices):
    LEASED = "leased", "Leased"
    SUBMITTED = "submitted", "Submitted"
    SKIPPED = "skipped", "Skipped"
    EXPIRED = "expired", "Expired"
    CANCELLED = "cancelled", "Cancelled"


class Assignment(models.Model):
    """One annotator's lease on one comparison, with the order the two responses were shown in."""

    class Order(models.TextChoices):
        AB = "AB", "A left, B right"
        BA = "BA", "B left, A right"

    Status = AssignmentStatus

    comparison = models.ForeignKey(Comparison, on_delete=models.CASCADE, related_name="assignments")
    annotator = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="assignments")
    displayed_order = models.CharField(max_length=2, choices=Order.choices)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.LEASED)
    leased_at = models.DateTimeField()
    submitted_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-leased_at"]
        indexes = [models.Index(fields=["annotator", "status"]), models.Index(fields=["status", "leased_at"])]
        constraints = [
            models.UniqueConstraint(fields=["comparison", "annotator"], name="assignment_one_per_annotator"),
            models.CheckConstraint(condition=Q(displayed_order__in=["AB", "BA"]), name="assignment_order_valid"),
            models.CheckConstraint(condition=Q(status__in=AssignmentStatus.values), name="assignment_status_valid"),
            models.CheckConstraint(
                condition=(Q(status="submitted") & Q(submitted_at__isnull=False))
                | (~Q(status="submitted") & Q(submitted_at__isnull=True)),
                name="assignment_submitted_has_time",
            ),
        ]

    def __str__(self) -> str:
        return f"Assignment {self.pk} ({self.status})"


class SafetyBin(models.TextChoices):
    """The paper's safety bins, from the chosen side and the two safe/unsafe labels."""

    CHOSEN_SAFE_OTHER_UNSAFE = "chosen_safe_other_unsafe", "Chosen safe, other unsafe"
    BOTH_SAFE = "both_safe", "Both safe"
    BOTH_UNSAFE = "both_unsafe", "Both unsafe"
    # Excluded from reward-model training by the paper's rule.
    CHOSEN_UNSAFE_OTHER_SAFE = "chosen_unsafe_other_safe", "Chosen unsafe, other safe"


def safety_bin_for(chosen: str, a_safe: bool, b_safe: bool) -> str:
    chosen_safe, other_safe = (a_safe, b_safe) if chosen == "A" else (b_safe, a_safe)
    if chosen_safe and other_safe:
        return SafetyBin.BOTH_SAFE
    if not chosen_safe and not other_safe:
        return SafetyBin.BOTH_UNSAFE
    return SafetyBin.CHOSEN_SAFE_OTHER_UNSAFE if chosen_safe else SafetyBin.CHOSEN_UNSAFE_OTHER_SAFE


def _safety_bin_consistent() -> Q:
    """The stored bin must be the one the labels imply (or blank when labels are unknown)."""
    unknown = Q(a_safe__isnull=True, b_safe__isnull=True, safety_bin="")
    known = Q(pk__isnull=True)  # an always-false seed for the OR below
    for chosen in ("A", "B"):
        for a_safe in (True, False):
            for b_safe in (True, False):
                known |= Q(chosen=chosen, a_safe=a_safe, b_safe=b_safe,
                           safety_bin=safety_bin_for(chosen, a_safe, b_safe))
    return unknown | known


class JudgmentSource(models.TextChoices):
    HUMAN = "human", "Human annotator"
    SIMULATED = "simulated", "Simulated annotator"
    IMPORTED = "imported", "Imported"


class Judgment(models.Model):
    """Which response is better, by how much, and whether each is safe.

    `chosen` names the comparison's response_a / response_b, not the screen side it was shown on.
    `strength`: 3 significantly better, 2 better, 1 slightly better, 0 negligibly better / unsure;
    unknown (NULL) only for imported data that never had one.
    """

    class Choice(models.TextChoices):
        A = "A", "Response A"
        B = "B", "Response B"

    class Strength(models.IntegerChoices):
        NEGLIGIBLY = 0, "Negligibly better / unsure"
        SLIGHTLY = 1, "Slightly better"
        BETTER = 2, "Better"
        SIGNIFICANTLY = 3, "Significantly better"

    Source = JudgmentSource

    comparison = models.ForeignKey(Comparison, on_delete=models.PROTECT, related_name="judgments")
    assignment = models.OneToOneField(
        Assignment, null=True, blank=True, on_delete=models.PROTECT, related_name="judgment"
    )
    annotator = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="judgments"
    )
    source = models.CharField(max_length=16, choices=Source.choices, default=Source.HUMAN)
    chosen = models.CharField(max_length=1, choices=Choice.choices)
    strength = models.PositiveSmallIntegerField(choices=Strength.choices, null=True, blank=True)
    a_safe = models.BooleanField(null=True, blank=True)
    b_safe = models.BooleanField(null=True, blank=True)
    safety_bin = models.CharField(max_length=32, choices=SafetyBin.choices, blank=True)
    harm_categories = models.JSONField(default=list, blank=True)
    note = models.TextField(blank=True)
    seconds_spent = models.FloatField(null=True, blank=True)
    idempotency_key = models.CharField(max_length=100, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        indexes = [models.Index(fields=["source", "created_at"])]
        constraints = [
            models.CheckConstraint(condition=Q(chosen__in=["A", "B"]), name="judgment_chosen_valid"),
            models.CheckConstraint(
                condition=Q(strength__isnull=True) | Q(strength__gte=0, strength__lte=3), name="judgment_strength_range"
            ),
            models.CheckConstraint(condition=Q(source__in=JudgmentSource.values), name="judgment_source_valid"),
            models.CheckConstraint(
                condition=Q(source="imported")
                | Q(assignment__isnull=False, annotator__isnull=False, strength__isnull=False,
                    a_safe__isnull=False, b_safe__isnull=False),
                name="judgment_annotated_is_complete",
            ),
            models.CheckConstraint(condition=_safety_bin_consistent(), name="judgment_safety_bin_consistent"),
            models.CheckConstraint(
                condition=Q(seconds_spent__isnull=True) | Q(seconds_spent__gte=0), name="judgment_seconds_nonnegative"
            ),
            models.UniqueConstraint(
                fields=["annotator", "idempotency_key"], condition=~Q(idempotency_key=""),
                name="judgment_idempotency_key_unique",
            ),
        ]

    def __str__(self) -> str:
        return f"Judgment {self.pk}: {self.chosen} by {self.strength}"


class Snapshot(models.Model):
    """A frozen batch (or several) materialized as a jsonl.gz file with a manifest.

    Reward models and rounds record the snapshot hashes they trained on, so every artifact can be
    traced to the exact rows that made it.
    """

    sha256 = models.CharField(max_length=64, unique=True)
    batches = models.ManyToManyField(Batch, related_name="snapshots")
    path = models.CharField(max_length=1000)
    row_count = models.PositiveIntegerField()
    schema_version = models.PositiveSmallIntegerField()
    manifest = models.JSONField(default=dict)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(condition=Q(sha256__regex=r"^[0-9a-f]{64}$"), name="snapshot_sha256_hex"),
        ]

    def __str__(self) -> str:
        return f"Snapshot {self.sha256[:12]} ({self.row_count} rows)"
