"""Materialize frozen batches as a reproducible jsonl.gz snapshot (see annotation/snapshots.py)."""
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from annotation.models import Batch
from annotation.snapshots import snapshot_create


class Command(BaseCommand):
    help = "Snapshot frozen batches (by label) into TANDEM_SNAPSHOT_DIR; prints the content sha256."

    def add_arguments(self, parser):
        parser.add_argument("labels", nargs="*", help="Batch labels")
        parser.add_argument("--all-frozen", action="store_true", help="Every frozen batch")

    def handle(self, *args, labels, all_frozen, **options):
        if all_frozen == bool(labels):
            raise CommandError("Name batch labels, or --all-frozen (not both).")
        batches = list(Batch.objects.filter(status=Batch.Status.FROZEN) if all_frozen
                       else Batch.objects.filter(label__in=labels))
        if missing := sorted(set(labels) - {b.label for b in batches}):
            raise CommandError(f"No batch labelled {', '.join(missing)}.")
        try:
            snapshot = snapshot_create(batches=batches)
        except ValidationError as error:
            raise CommandError("; ".join(error.messages)) from None
        self.stdout.write(f"{snapshot.sha256}  {snapshot.row_count} rows  {snapshot.path}")
