"""Import an Anthropic HH-RLHF file into its own frozen import batch (see annotation/importers.py)."""
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from annotation.importers import import_hh_rlhf


class Command(BaseCommand):
    help = "Import HH-RLHF JSONL(.gz) pairs as imported judgments in a new frozen batch (same file twice: refused)."

    def add_arguments(self, parser):
        parser.add_argument("file")
        group = parser.add_mutually_exclusive_group()
        group.add_argument("--adversarial", action="store_true", default=None,
                           help="The prompts are red-team prompts (default: when the file name says 'harmless')")
        group.add_argument("--not-adversarial", dest="adversarial", action="store_false")
        parser.add_argument("--strict", action="store_true",
                            help="Refuse the file if any pair cannot be imported faithfully (default: skip and report)")

    def handle(self, *args, file, adversarial, strict, **options):
        try:
            report = import_hh_rlhf(file, adversarial=adversarial, strict=strict)
        except (ValidationError, OSError) as error:
            raise CommandError("; ".join(getattr(error, "messages", [str(error)]))) from None
        self.stdout.write(report.summary())
