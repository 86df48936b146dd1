"""Reward-model runs: the Django side of the twin reward models (the torch code sits beside it)."""
from django.conf import settings
from django.db import models
from django.db.models import Q

from webapp.jobs import ACTIVE_STATUSES, Job


class RewardKind(models.TextChoices):
    HELPFULNESS = "helpfulness", "Helpfulness"
    SAFETY = "safety", "Safety"


class RewardModelRun(Job):
    """One training run of a helpfulness or safety reward model, with its data and metrics."""

    Kind = RewardKind

    kind = models.CharField(max_length=16, choices=Kind.choices)
    base_checkpoint = models.ForeignKey("policy.Checkpoint", on_delete=models.PROTECT, related_name="reward_runs")
    batches = models.ManyToManyField("annotation.Batch", related_name="reward_runs")
    snapshots = models.ManyToManyField("annotation.Snapshot", related_name="reward_runs", blank=True)
    config = models.JSONField(default=dict)
    data_manifest = models.JSONField(default=dict, blank=True, help_text="Exactly which pairs went in")
    manifest_sha256 = models.CharField(max_length=64)
    tokenizer_sha256 = models.CharField(max_length=64, blank=True)
    metrics = models.JSONField(default=dict, blank=True)
    artifact_path = models.CharField(max_length=1000, blank=True)
    step = models.PositiveIntegerField(default=0)
    total_steps = models.PositiveIntegerField(default=0)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)

    class Meta(Job.Meta):
        ordering = ["-created_at"]
        constraints = Job.Meta.constraints + [
            models.CheckConstraint(condition=Q(kind__in=RewardKind.values), name="rewardmodelrun_kind_valid"),
            models.CheckConstraint(condition=Q(manifest_sha256__regex=r"^[0-9a-f]{64}$"), name="rewardmodelrun_manifest_hex"),
            models.UniqueConstraint(
                fields=["kind", "base_checkpoint", "manifest_sha256"], condition=Q(status__in=ACTIVE_STATUSES),
                name="rewardmodelrun_one_active_per_data",
            ),
            models.CheckConstraint(
                condition=~Q(status="succeeded") | ~Q(artifact_path=""), name="rewardmodelrun_success_has_artifact"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.kind} RM {self.pk}"
