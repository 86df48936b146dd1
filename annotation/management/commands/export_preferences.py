"""Write the preference export (the rows of GET /api/v1/export/preferences) to a file or stdout."""
import sys

from django.core.management.base import BaseCommand, CommandError

from annotation import exports
from annotation.api.filters import JudgmentFilter


class Command(BaseCommand):
    help = "Export preference pairs as JSONL (TRL / datasets) or CSV; options as the API's query parameters."

    def add_arguments(self, parser):
        parser.add_argument("--output", "-o", help="File to write (default: stdout)")
        parser.add_argument("--format", choices=["conversational", "text"], default="conversational")
        parser.add_argument("--margin", choices=list(exports.MARGINS), default="none")
        parser.add_argument("--include-unsafe-chosen", action="store_true")
        parser.add_argument("--aggregate", choices=["none", "majority"], default="none")
        parser.add_argument("--export-format", choices=["jsonl", "csv"], default="jsonl")
        for name in JudgmentFilter.base_filters:
            parser.add_argument(f"--{name.replace('_', '-')}", dest=f"filter_{name}", help=f"Filter: {name}")

    def handle(self, *args, **options):
        data = {k.removeprefix("filter_"): v for k, v in options.items() if k.startswith("filter_") and v is not None}
        filterset = JudgmentFilter(data=data, queryset=exports.exportable_judgments(source=data.get("source")))
        if not filterset.is_valid():
            raise CommandError(dict(filterset.errors))
        export_options = exports.ExportOptions(
            conversational=options["format"] == "conversational", margin=options["margin"],
            include_unsafe_chosen=options["include_unsafe_chosen"], aggregate=options["aggregate"])
        rows = exports.export_rows(filterset.qs, options=export_options)
        fields = exports.AGGREGATE_FIELDS if export_options.aggregate == "majority" else exports.ROW_FIELDS
        chunks = exports.stream_csv(rows, fields=fields) if options["export_format"] == "csv" else exports.stream_jsonl(rows)
        out = open(options["output"], "wb") if options["output"] else sys.stdout.buffer
        try:
            for chunk in chunks:
                out.write(chunk)
        finally:
            if options["output"]:
                out.close()
            else:
                out.flush()
