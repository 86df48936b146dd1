"""Import MT-bench questions and model answers as unjudged comparisons for the annotation queue."""
from pathlib import Path

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from annotation.importers import import_mt_bench


class Command(BaseCommand):
    help = ("Import FastChat MT-bench question.jsonl + model_answer/*.jsonl: comparisons between pairs of models "
            "(turn 1, and turn 2 with the first model's turn 1 as context). Importing again adds only what is new.")

    def add_arguments(self, parser):
        parser.add_argument("question_file")
        parser.add_argument("answers", nargs="+", help="model_answer/*.jsonl files, or the folder holding them")
        parser.add_argument("--models", help="Comma-separated model ids (default: every model with answers)")
        parser.add_argument("--pairs", help="Comma-separated model pairs a:b (default: all pairs of --models)")
        parser.add_argument("--overlap", type=int, default=None, help="Annotators per comparison")

    def handle(self, *args, question_file, answers, models, pairs, overlap, **options):
        files = []
        for item in map(Path, answers):
            files += sorted(item.glob("*.jsonl")) if item.is_dir() else [item]
        try:
            report = import_mt_bench(
                question_file, files, models=models.split(",") if models else None,
                pairs=[tuple(p.split(":", 1)) for p in pairs.split(",")] if pairs else None, overlap=overlap,
            )
        except (ValidationError, OSError) as error:
            raise CommandError("; ".join(getattr(error, "messages", [str(error)]))) from None
        self.stdout.write(report.summary())
        self.stdout.write(f"  new prompts {report.prompts}, new responses {report.responses}")
