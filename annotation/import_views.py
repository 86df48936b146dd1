"""The staff page for importing preference data files (the same importers as the management commands)."""
import tempfile
from pathlib import Path

from django import forms
from django.contrib.admin.views.decorators import staff_member_required
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from . import importers


class MultipleFileInput(forms.ClearableFileInput):
    allow_multiple_selected = True


class MultipleFileField(forms.FileField):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("widget", MultipleFileInput())
        super().__init__(*args, **kwargs)

    def clean(self, data, initial=None):
        if isinstance(data, list | tuple):
            return [super(MultipleFileField, self).clean(d, initial) for d in data]
        return [super().clean(data, initial)] if data else []


class ImportForm(forms.Form):
    kind = forms.ChoiceField(choices=[("hh-rlhf", "Anthropic HH-RLHF (.jsonl / .jsonl.gz)"),
                                      ("trl", "TRL-style preferences (.jsonl / .jsonl.gz)"),
                                      ("mt-bench", "MT-bench questions + model answers")])
    file = forms.FileField(help_text="The pairs file, or MT-bench's question.jsonl")
    answers = MultipleFileField(required=False, help_text="MT-bench only: the model_answer/*.jsonl files")
    adversarial = forms.ChoiceField(choices=[("auto", "from the file name ('harmless')"), ("yes", "yes"), ("no", "no")],
                                    initial="auto", help_text="HH-RLHF only: are the prompts red-team prompts?")
    strict = forms.BooleanField(required=False, help_text="HH-RLHF only: refuse the file instead of skipping "
                                                          "pairs that cannot be imported faithfully")


@staff_member_required
def staff_import(request: HttpRequest) -> HttpResponse:
    form = ImportForm(request.POST or None, request.FILES or None)
    report, error = None, None
    if request.method == "POST" and form.is_valid():
        try:
            report = _run(form.cleaned_data)
        except ValidationError as exc:
            error = " ".join(exc.messages)
    status = 400 if request.method == "POST" and (error or not form.is_valid()) else 200
    return render(request, "annotation/staff_import.html", {"form": form, "report": report, "error": error},
                  status=status)


def _run(data: dict) -> importers.ImportReport:
    upload = data["file"]
    if data["kind"] == "hh-rlhf":
        adversarial = {"auto": None, "yes": True, "no": False}[data["adversarial"]]
        return importers.import_hh_rlhf(upload, name=upload.name, adversarial=adversarial, strict=data["strict"])
    if data["kind"] == "trl":
        return importers.import_trl(upload, name=upload.name)
    if not data["answers"]:
        raise ValidationError("MT-bench needs the model answer files too.")
    with tempfile.TemporaryDirectory() as folder:  # the importer reads files by path, named as uploaded
        paths = []
        for i, f in enumerate([upload, *data["answers"]]):
            path = Path(folder) / f"{i:03d}-{Path(f.name).name}"
            with path.open("wb") as out:
                for chunk in f.chunks():
                    out.write(chunk)
            paths.append(path)
        return importers.import_mt_bench(paths[0], paths[1:])
