"""Batch tasks: freezing runs on the default queue (no GPU needed)."""
from celery import shared_task

from annotation import services
from annotation.models import Batch


@shared_task(name="workers.batches.freeze_batch", acks_late=True)
def freeze_batch(batch_id: int, test_size: int | None = None) -> str:
    batch = Batch.objects.get(pk=batch_id)
    if batch.is_frozen:  # a redelivered message: the work is already done
        return batch.content_hash
    return services.batch_freeze(batch=batch, test_size=test_size).content_hash


@shared_task(name="workers.batches.freeze_previous_week", acks_late=True)
def freeze_previous_week() -> str | None:
    batch = services.batch_freeze_previous_week()
    return batch.label if batch else None
