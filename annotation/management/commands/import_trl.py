"""Import a TRL-style preference JSONL file into its own frozen import batch."""
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from annotation.importers import import_trl


class Command(BaseCommand):
    help = "Import TRL-style JSONL(.gz) {prompt, chosen, rejected} pairs into a new frozen batch."

    def add_arguments(self, parser):
        parser.add_argument("file")
        parser.add_argument("--checkpoint", default="imported",
                            help="External checkpoint name for the responses (unless lines name their own)")

    def handle(self, *args, file, checkpoint, **options):
        try:
            report = import_trl(file, checkpoint=checkpoint)
        except (ValidationError, OSError) as error:
            raise CommandError("; ".join(getattr(error, "messages", [str(error)]))) from None
        self.stdout.write(report.summary())
