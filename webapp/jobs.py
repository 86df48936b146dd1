"""Fields every long-running job shares, so the UI can show live progress the same way."""
from django.db import models
from django.db.models import Q
from django.utils import timezone


class JobStatus(models.TextChoices):
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


ACTIVE_STATUSES = (JobStatus.QUEUED, JobStatus.RUNNING)


class Job(models.Model):
    status = models.CharField(max_length=16, choices=JobStatus.choices, default=JobStatus.QUEUED)
    progress = models.FloatField(default=0.0, help_text="Fraction done, 0 to 1.")
    progress_message = models.CharField(max_length=300, blank=True)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        abstract = True
        constraints = [
            models.CheckConstraint(
                condition=Q(progress__gte=0) & Q(progress__lte=1),
                name="%(app_label)s_%(class)s_progress_in_unit_range",
            ),
            models.CheckConstraint(
                condition=Q(status__in=JobStatus.values), name="%(app_label)s_%(class)s_status_valid"
            ),
            models.CheckConstraint(
                condition=~Q(status=JobStatus.FAILED) | ~Q(error=""),
                name="%(app_label)s_%(class)s_failure_has_reason",
            ),
        ]

    @property
    def is_active(self) -> bool:
        return self.status in ACTIVE_STATUSES

    def set_running(self, *, message: str) -> list[str]:
        """Queued -> running (started now), or running again for a job whose worker died and which is
        resumed; with the message. Returns the fields set, for save(update_fields=...). The caller holds
        the row lock and has checked the job is active."""
        fields = ["status", *self.set_progress(message=message)]
        if self.status == JobStatus.QUEUED:
            self.started_at = timezone.now()
            fields.append("started_at")
        self.status = JobStatus.RUNNING
        return fields

    def set_progress(self, *, progress: float | None = None, message: str | None = None) -> list[str]:
        """Set the fraction done (clamped to 0..1) and the message (cut to fit); returns the fields set,
        for save(update_fields=...)."""
        fields = []
        if progress is not None:
            self.progress = min(1.0, max(0.0, progress))
            fields.append("progress")
        if message is not None:
            self.progress_message = message[: self._meta.get_field("progress_message").max_length]
            fields.append("progress_message")
        return fields
