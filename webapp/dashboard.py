"""Reads behind the researchers' dashboard and jobs page: batches, throughput, agreement, jobs."""
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db.models import Avg, Count, Q
from django.utils import timezone

from annotation.models import Batch, Judgment
from policy.models import DemoPolicyBuild, GenerationJob, RLHFRound
from rewards.models import RewardModelRun

RECENT_JOBS = 50


def batches_overview(*, limit: int = 20):
    """The newest batches with their comparison and judgment counts (one query)."""
    return (
        Batch.objects.annotate(
            n_comparisons=Count("comparisons", distinct=True), n_judgments=Count("comparisons__judgments"),
        ).order_by("-created_at")[:limit]
    )


def throughput(*, now: datetime | None = None) -> dict:
    """Human judgments today and this ISO week, and the mean seconds spent on one this week."""
    now = timezone.localtime(now or timezone.now())
    start_of_day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    start_of_week = start_of_day - timedelta(days=now.weekday())
    return Judgment.objects.filter(source=Judgment.Source.HUMAN).aggregate(
        today=Count("id", filter=Q(created_at__gte=start_of_day)),
        week=Count("id", filter=Q(created_at__gte=start_of_week)),
        week_annotators=Count("annotator", filter=Q(created_at__gte=start_of_week), distinct=True),
        week_mean_seconds=Avg("seconds_spent", filter=Q(created_at__gte=start_of_week)),
    )


@dataclass
class Agreement:
    comparisons: int = 0  # comparisons with at least two human judgments
    pairs: int = 0  # pairs of judgments on the same comparison
    agreeing_pairs: int = 0  # of which chose the same response

    @property
    def rate(self) -> float | None:
        return self.agreeing_pairs / self.pairs if self.pairs else None


def _pairs(n: int) -> int:
    return n * (n - 1) // 2


def agreement_by_batch() -> tuple[Agreement, dict[str, Agreement]]:
    """Pairwise agreement on the chosen side, over comparisons judged by two or more people.

    A comparison with n judgments, n_a of them for A, has C(n, 2) pairs, of which
    C(n_a, 2) + C(n - n_a, 2) agree. Returns the overall figure and one per batch label.
    """
    per_comparison = (
        Judgment.objects.filter(source=Judgment.Source.HUMAN)
        .values("comparison", "comparison__batch__label")
        .annotate(n=Count("id"), n_a=Count("id", filter=Q(chosen=Judgment.Choice.A)))
        .filter(n__gte=2).order_by()
    )
    overall, by_batch = Agreement(), defaultdict(Agreement)
    for row in per_comparison.iterator():
        n, n_a = row["n"], row["n_a"]
        for agreement in (overall, by_batch[row["comparison__batch__label"] or "(none)"]):
            agreement.comparisons += 1
            agreement.pairs += _pairs(n)
            agreement.agreeing_pairs += _pairs(n_a) + _pairs(n - n_a)
    return overall, dict(by_batch)


@dataclass
class JobRow:
    key: str
    kind: str
    title: str
    status: str
    status_display: str
    progress: float
    message: str
    error: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    active: bool

    def as_json(self) -> dict:
        return {"key": self.key, "status": self.status, "status_display": self.status_display,
                "progress": self.progress, "message": self.message, "error": self.error, "active": self.active}


def _row(job, *, kind: str, prefix: str, title: str) -> JobRow:
    return JobRow(
        key=f"{prefix}-{job.pk}", kind=kind, title=title, status=job.status, status_display=job.get_status_display(),
        progress=job.progress, message=job.progress_message, error=job.error, created_at=job.created_at,
        started_at=job.started_at, finished_at=job.finished_at, active=job.is_active,
    )


def recent_jobs(*, limit: int = RECENT_JOBS) -> list[JobRow]:
    """The newest sampling jobs, reward-model runs, RLHF rounds and demo policy builds, newest first
    (four queries)."""
    rows = [
        _row(job, kind="Sampling", prefix="generation",
             title=f"#{job.pk}: {job.arm_a_checkpoint.name} @ {job.arm_a_temperature:g} vs "
                   f"{job.arm_b_checkpoint.name} @ {job.arm_b_temperature:g}")
        for job in GenerationJob.objects.select_related("arm_a_checkpoint", "arm_b_checkpoint")[:limit]
    ] + [
        _row(run, kind="Reward model", prefix="reward",
             title=f"#{run.pk}: {run.get_kind_display()} RM on {run.base_checkpoint.name}")
        for run in RewardModelRun.objects.select_related("base_checkpoint")[:limit]
    ] + [
        _row(rnd, kind="RLHF round", prefix="round",
             title=f"#{rnd.pk}: on {rnd.policy_in.name}" + (f" ({rnd.current_stage})" if rnd.current_stage else ""))
        for rnd in RLHFRound.objects.select_related("policy_in")[:limit]
    ] + [
        _row(build, kind="Demo policy", prefix="demo",
             title=f"#{build.pk}: {build.config.get('base_name')} + {build.config.get('sft_name')}"
                   + (f" ({build.get_phase_display()})" if build.phase and build.is_active else ""))
        for build in DemoPolicyBuild.objects.all()[:limit]
    ]
    return sorted(rows, key=lambda row: row.created_at, reverse=True)
