"""Freeze a batch by label: choose its held-out test slice, hash it, make it immutable."""
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from annotation import services
from annotation.models import Batch


class Command(BaseCommand):
    help = "Freeze a batch (e.g. 2026-W47): choose its test slice, compute its content hash, refuse later changes."

    def add_arguments(self, parser):
        parser.add_argument("label", help="The batch label, e.g. 2026-W47")
        parser.add_argument("--test-size", type=int, default=None,
                            help="Comparisons to hold out (default: settings' 10%%, at most 1,000)")

    def handle(self, *args, label: str, test_size: int | None, **options):
        try:
            batch = Batch.objects.get(label=label)
        except Batch.DoesNotExist:
            known = ", ".join(Batch.objects.order_by("-created_at").values_list("label", flat=True)[:10]) or "none"
            raise CommandError(f"No batch labelled {label!r} (newest: {known}).") from None
        try:
            batch = services.batch_freeze(batch=batch, test_size=test_size)
        except ValidationError as error:
            raise CommandError(" ".join(error.messages)) from None
        n = batch.comparisons.count()
        self.stdout.write(self.style.SUCCESS(
            f"Froze {batch.label}: {n} comparison{'s' if n != 1 else ''}, {batch.test_size} held out as the test slice, "
            f"content hash {batch.content_hash}."
        ))
