"""Freezing a batch through the broker and a real worker process."""
import pytest

from annotation import services
from annotation.models import Batch
from tests.conftest import wait_for
from workers.batches import freeze_batch


@pytest.mark.worker
@pytest.mark.django_db(transaction=True)
def test_freeze_goes_through_a_real_worker(celery_worker_process, make_comparison, annotator):
    for _ in range(3):
        make_comparison()
        a = services.assignment_lease_next(annotator=annotator)
        services.judgment_submit(assignment=a, annotator=annotator, chosen="B", strength=1,
                                 safety=services.SafetyLabels(a_safe=True, b_safe=True))
    batch = Batch.objects.get()
    freeze_batch.delay(batch.id)
    frozen = wait_for(lambda: Batch.objects.filter(pk=batch.pk, status="frozen").first(), what="the worker to freeze")
    assert frozen.content_hash and frozen.test_size == 1
    assert celery_worker_process.poll() is None
