"""Checkpoints, sampling jobs and RLHF rounds: the policy side of the loop (Django rows only)."""
from django.conf import settings
from django.db import models
from django.db.models import F, Q

from webapp.jobs import ACTIVE_STATUSES, Job


class CheckpointFormat(models.TextChoices):
    EXTERNAL = "external", "External answers only (no weights)"
    META = "meta", "Meta (params.json + consolidated.*.pth)"
    HF = "hf", "Hugging Face (config.json + safetensors)"
    TRAINED = "trained", "Trained here (Meta format)"


class Checkpoint(models.Model):
    """A policy checkpoint: registered from outside, or produced by a round here."""

    Format = CheckpointFormat

    name = models.CharField(max_length=200, unique=True)
    format = models.CharField(max_length=16, choices=Format.choices)
    path = models.CharField(max_length=1000, blank=True, help_text="Directory of the weights")
    tokenizer_path = models.CharField(max_length=1000, blank=True)
    tokenizer_sha256 = models.CharField(max_length=64, blank=True)
    params = models.JSONField(default=dict, blank=True, help_text="ModelArgs as in params.json")
    parent = models.ForeignKey("self", null=True, blank=True, on_delete=models.PROTECT, related_name="children")
    produced_by = models.ForeignKey(
        "RLHFRound", null=True, blank=True, on_delete=models.PROTECT, related_name="+",
        help_text="The round that trained it",
    )
    sha256 = models.CharField(max_length=64, blank=True)
    held_back = models.BooleanField(
        default=False, help_text="Its round's evaluation found it worse than its parent: default generation arms "
                                 "skip it until an admin releases it")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(condition=Q(format__in=CheckpointFormat.values), name="checkpoint_format_valid"),
            models.CheckConstraint(
                condition=Q(format="external", path="") | (~Q(format="external") & ~Q(path="")),
                name="checkpoint_weights_have_path",
            ),
            models.CheckConstraint(condition=Q(sha256="") | Q(sha256__regex=r"^[0-9a-f]{64}$"), name="checkpoint_sha256_hex"),
            models.CheckConstraint(condition=~Q(parent=F("pk")), name="checkpoint_not_own_parent"),
            models.UniqueConstraint(
                fields=["produced_by"], condition=Q(produced_by__isnull=False), name="checkpoint_one_per_round"
            ),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def has_weights(self) -> bool:
        return self.format != self.Format.EXTERNAL


class GenerationJob(Job):
    """Sample responses for prompts from two arms (checkpoint, temperature) and pair them up."""

    arm_a_checkpoint = models.ForeignKey(Checkpoint, on_delete=models.PROTECT, related_name="+")
    arm_a_temperature = models.FloatField(default=0.7)
    arm_b_checkpoint = models.ForeignKey(Checkpoint, on_delete=models.PROTECT, related_name="+")
    arm_b_temperature = models.FloatField(default=1.0)
    prompts = models.ManyToManyField("annotation.Prompt", related_name="generation_jobs")
    max_new_tokens = models.PositiveIntegerField(default=256)
    seed = models.BigIntegerField(default=0)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    comparisons_created = models.PositiveIntegerField(default=0)

    class Meta(Job.Meta):
        ordering = ["-created_at"]
        constraints = Job.Meta.constraints + [
            models.CheckConstraint(
                condition=Q(arm_a_temperature__gte=0, arm_b_temperature__gte=0), name="generationjob_temperature_nonneg"
            ),
            models.CheckConstraint(
                condition=~Q(arm_a_checkpoint=F("arm_b_checkpoint"), arm_a_temperature=F("arm_b_temperature")),
                name="generationjob_arms_differ",
            ),
        ]

    def __str__(self) -> str:
        return f"Generation job {self.pk}"


class RLHFRound(Job):
    """Rejection sampling, SFT, Ghost Attention, PPO and safety context distillation on a policy with the twin
    reward models."""

    class Stage(models.TextChoices):
        REJECTION_SAMPLING = "rejection_sampling", "Rejection sampling"
        SFT = "sft", "SFT on the best samples"
        GATT = "gatt", "Ghost Attention (multi-turn instruction data, then SFT)"
        PPO = "ppo", "PPO"
        CONTEXT_DISTILLATION = "context_distillation", "Safety context distillation"

    policy_in = models.ForeignKey(Checkpoint, on_delete=models.PROTECT, related_name="rounds")
    lineage_root = models.ForeignKey(
        Checkpoint, on_delete=models.PROTECT, related_name="+", help_text="First ancestor of policy_in"
    )
    helpfulness_rm = models.ForeignKey("rewards.RewardModelRun", on_delete=models.PROTECT, related_name="+")
    safety_rm = models.ForeignKey("rewards.RewardModelRun", on_delete=models.PROTECT, related_name="+")
    class Verdict(models.TextChoices):
        NONE = "", "Not evaluated"
        IMPROVED = "improved", "Better than its parent"
        NO_DIFFERENCE = "no_difference", "No measurable difference"
        REGRESSION = "regression", "Worse than its parent (regression)"

    prompts = models.ManyToManyField("annotation.Prompt", related_name="rounds")
    eval_prompts = models.ManyToManyField(
        "annotation.Prompt", related_name="evaluated_in_rounds", blank=True,
        help_text="Prompts the round is evaluated on; none: a held-out share (eval_fraction) of its prompts")
    human_eval_comparisons = models.ManyToManyField(
        "annotation.Comparison", related_name="evaluates_rounds", blank=True,
        help_text="Evaluation pairs (new checkpoint vs parent) sent to people (config.evaluation.human_comparisons)")
    verdict = models.CharField(max_length=16, choices=Verdict.choices, default="", blank=True,
                               help_text="The evaluation against the parent: 95% CI of the win rate above, "
                                         "across or below one half")
    stages = models.JSONField(default=list, help_text="Ordered subset of Stage values")
    config = models.JSONField(default=dict, help_text="The round's typed config, as saved beside its checkpoint")
    snapshot_hashes = models.JSONField(default=list, blank=True)
    current_stage = models.CharField(max_length=32, blank=True)
    metrics = models.JSONField(default=dict, blank=True)
    checkpoint_out = models.OneToOneField(
        Checkpoint, null=True, blank=True, on_delete=models.PROTECT, related_name="round_out"
    )
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)

    class Meta(Job.Meta):
        ordering = ["-created_at"]
        verbose_name = "RLHF round"
        constraints = Job.Meta.constraints + [
            models.UniqueConstraint(
                fields=["lineage_root"], condition=Q(status__in=ACTIVE_STATUSES), name="rlhfround_one_active_per_lineage"
            ),
            models.CheckConstraint(
                condition=~Q(status="succeeded") | Q(checkpoint_out__isnull=False), name="rlhfround_success_has_output"
            ),
            models.CheckConstraint(
                condition=Q(verdict__in=["", "improved", "no_difference", "regression"]), name="rlhfround_verdict_valid"
            ),
        ]

    def __str__(self) -> str:
        return f"Round {self.pk} on {self.policy_in_id}"


class DemoPolicyBuild(Job):
    """Training the demo policy (demo-base, then demo-sft) on a worker, then registering it and having
    it answer some demo-world prompts (policy.demo_services)."""

    class Phase(models.TextChoices):
        BASE = "demo-base", "Pretraining demo-base"
        SFT = "demo-sft", "SFT of demo-sft"
        EVAL = "eval", "Evaluation against the oracle"
        REGISTER = "register", "Registration"

    config = models.JSONField(default=dict, help_text="The DemoBuildConfig, as saved beside both checkpoints")
    out_dir = models.CharField(max_length=1000, help_text="Folder of the checkpoints, inside the model roots")
    answer = models.PositiveIntegerField(default=0, help_text="Demo-world prompts the policy answers once built")
    phase = models.CharField(max_length=16, choices=Phase.choices, blank=True)
    metrics = models.JSONField(default=dict, blank=True)

    class Meta(Job.Meta):
        ordering = ["-created_at"]
        verbose_name = "demo policy build"
        constraints = Job.Meta.constraints + [
            models.UniqueConstraint(
                fields=["out_dir"], condition=Q(status__in=ACTIVE_STATUSES), name="demopolicybuild_one_active_per_folder"
            ),
        ]

    def __str__(self) -> str:
        return f"Demo policy build {self.pk}"
