"""Reward-model runs in the admin: launch (the add page is a launch form), watch, cancel, relaunch, and
read a finished run's evaluation as tables: per test set, per strength (the layout of the Llama 2
paper's Table 8), per safety bin, calibration, reward distributions, and the accuracy of the previous
model on the newest batch before it was trained on (distribution shift).

Every value in the tables goes through format_html / format_html_join, so text from the data (batch
labels, checkpoint names, error messages) is escaped.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.http import HttpResponseRedirect
from django.shortcuts import render
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from annotation.models import Batch
from policy.models import Checkpoint
from rewards.evaluate import STRENGTH_BUCKETS, accuracy_warnings

from . import services
from .models import RewardKind, RewardModelRun

KIND_CHOICES = [(services.PAIR, "Both twins (helpfulness + safety)"), *RewardKind.choices]
STRENGTH_LABELS = {
    "significantly_better": "Significantly Better", "better": "Better", "slightly_better": "Slightly Better",
    "negligibly_better_or_unsure": "Negligibly Better / Unsure", "unknown": "Unknown (imported)",
}
SAFETY_BIN_LABELS = {
    "chosen_safe_other_unsafe": "Chosen safe, other unsafe", "both_safe": "Both safe", "both_unsafe": "Both unsafe",
    "chosen_unsafe_other_safe": "Chosen unsafe, other safe", "unknown": "Unknown (imported)",
}
# The paper's helpfulness RM on Meta Helpful, Table 8, for reading our numbers against.
PAPER_TABLE8 = {"significantly_better": 0.807, "better": 0.675, "slightly_better": 0.609,
                "negligibly_better_or_unsure": 0.547, "avg": 0.632}


class LaunchForm(forms.Form):
    kind = forms.ChoiceField(choices=KIND_CHOICES, initial=services.PAIR)
    base_checkpoint = forms.ModelChoiceField(
        queryset=Checkpoint.objects.exclude(format=Checkpoint.Format.EXTERNAL).order_by("-created_at"),
        help_text="The reward models start from this policy checkpoint (the paper: the chat model).")
    batches = forms.ModelMultipleChoiceField(
        queryset=Batch.objects.filter(status=Batch.Status.FROZEN).order_by("-frozen_at"),
        help_text="Frozen batches; their held-out slices are the test sets.")
    config = forms.CharField(
        required=False, widget=forms.Textarea(attrs={"rows": 4, "cols": 80}),
        help_text='Optional JSON object of RewardTrainConfig fields, e.g. {"lr": 1e-5, "micro_batch_size": 8}.')

    def clean_config(self) -> dict:
        text = self.cleaned_data["config"].strip()
        if not text:
            return {}
        try:
            value = json.loads(text)
        except ValueError as error:
            raise ValidationError(f"Not JSON: {error}") from None
        if not isinstance(value, dict):
            raise ValidationError("Must be a JSON object.")
        return value


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], caption: str = "") -> SafeString:
    head = format_html_join("", "<th>{}</th>", ((h,) for h in headers))
    body = format_html_join("", "<tr>{}</tr>", (
        (format_html_join("", "<td>{}</td>", ((cell,) for cell in row)),) for row in rows))
    return format_html('<table class="reward-eval"><caption>{}</caption><thead><tr>{}</tr></thead>'
                       "<tbody>{}</tbody></table>", caption, head, body)


def _cell(group: Mapping[str, Any] | None) -> str:
    if not group or not group.get("n"):
        return "–"
    return f"{_pct(group.get('accuracy'))} (n={group['n']})"


def _eval_sets(run: RewardModelRun) -> dict[str, dict]:
    return (run.metrics or {}).get("eval") or {}


def per_test_set_table(sets: Mapping[str, Mapping]) -> SafeString:
    rows = [(name, m.get("n"), _pct(m.get("accuracy")), _num(m.get("loss")),
             _pct((m.get("length_baseline") or {}).get("accuracy")), _num((m.get("calibration") or {}).get("ece")))
            for name, m in sets.items()]
    return _table(["Test set", "Pairs", "Accuracy", "Loss (no margin)", "Length-only baseline", "ECE"], rows,
                  "Accuracy per test set (per batch, per source, per kind)")


def strength_table(sets: Mapping[str, Mapping]) -> SafeString:
    """The paper's Table 8 layout: a row per test set, a column per strength bucket, then the average."""
    buckets = [b for b in STRENGTH_BUCKETS.values()
               if b != "unknown" or any((m.get("by_strength") or {}).get("unknown", {}).get("n") for m in sets.values())]
    rows = [(name, *[_cell((m.get("by_strength") or {}).get(b)) for b in buckets], _pct(m.get("accuracy")))
            for name, m in sets.items()]
    rows.append(("Llama 2 helpfulness RM, Meta Helpful (paper, Table 8)",
                 *[_pct(PAPER_TABLE8.get(b)) for b in buckets], _pct(PAPER_TABLE8["avg"])))
    return _table(["Test set", *[STRENGTH_LABELS[b] for b in buckets], "Avg"], rows,
                  "Accuracy per preference strength (Table 8 layout)")


def safety_bin_table(sets: Mapping[str, Mapping]) -> SafeString:
    bins = list(dict.fromkeys(b for m in sets.values() for b in (m.get("by_safety_bin") or {})))
    rows = [(name, *[_cell((m.get("by_safety_bin") or {}).get(b)) for b in bins]) for name, m in sets.items()]
    return _table(["Test set", *[SAFETY_BIN_LABELS.get(b, b) for b in bins]], rows, "Accuracy per safety bin")


def calibration_table(metrics: Mapping) -> SafeString:
    bins = (metrics.get("calibration") or {}).get("bins") or []
    rows = [(f"{b['confidence_lo']:.1f}–{b['confidence_hi']:.1f}",
             f"{b['gap_lo']:.2f}–" + ("∞" if b["gap_hi"] is None else f"{b['gap_hi']:.2f}"),
             b["n"], _pct(b["accuracy"]), _pct(b["mean_confidence"])) for b in bins]
    return _table(["Confidence σ(|r_c − r_r|)", "Reward gap", "Pairs", "Accuracy", "Mean confidence"], rows,
                  f"Calibration on all test pairs (ECE {_num((metrics.get('calibration') or {}).get('ece'))})")


def distribution_table(metrics: Mapping) -> SafeString:
    dists = metrics.get("rewards") or {}
    rows = [(name, *[_num(d.get(k)) for k in ("n", "mean", "std", "min", "p05", "p50", "p95", "max")])
            for name, d in ((n, dists.get(n) or {}) for n in ("chosen", "rejected", "gap"))]
    return _table(["Rewards", "n", "mean", "std", "min", "p05", "median", "p95", "max"], rows,
                  "Reward distributions on all test pairs")


def pre_training_table(run: RewardModelRun) -> SafeString:
    pre = (run.metrics or {}).get("pre_training_newest_batch") or {}
    if not pre:
        return format_html("{}", "–")
    batch = pre.get("batch", "")
    after = _eval_sets(run).get(f"batch:{batch}") or {}
    if "metrics" not in pre:
        return format_html("{}: {}", batch, pre.get("note", "not measured"))
    before = pre["metrics"]
    rows = [(f"Run #{pre.get('run')} (before training on {batch}), all pairs of the batch", before.get("n"),
             _pct(before.get("accuracy")),
             *[_cell((before.get("by_strength") or {}).get(b)) for b in list(STRENGTH_BUCKETS.values())[:4]]),
            (f"This run (after), held-out pairs of {batch}", after.get("n"), _pct(after.get("accuracy")),
             *[_cell((after.get("by_strength") or {}).get(b)) for b in list(STRENGTH_BUCKETS.values())[:4]])]
    return _table(["Model", "Pairs", "Accuracy", *[STRENGTH_LABELS[b] for b in list(STRENGTH_BUCKETS.values())[:4]]],
                  rows, f"Newest batch {batch}: accuracy before training on it (distribution shift)")


def training_table(run: RewardModelRun) -> SafeString:
    m = run.metrics or {}
    train = m.get("train") or {}
    rows = [("Optimizer steps", m.get("steps")), ("Pairs trained", m.get("pairs_trained")),
            ("Pairs dropped (partial last step)", m.get("pairs_dropped")), ("Final loss", _num(m.get("final_loss"))),
            ("Effective batch (pairs)", train.get("effective_batch")), ("Warm-up steps", train.get("warmup_steps")),
            ("Throughput (pairs/s)", _num(train.get("pairs_per_s"), 1)), ("Seconds", _num(train.get("seconds"), 1)),
            ("Padding fraction", _pct(train.get("pad_fraction"))),
            ("Truncated sequences", train.get("truncated_sequences")),
            ("Resumed from step", m.get("resumed_from_step")), ("Processes", train.get("world_size")),
            ("Weights sha256", m.get("weights_sha256")), ("Data order sha256", m.get("plan_sha256"))]
    return _table(["", ""], [(k, _num(v)) for k, v in rows], "Training")


def data_table(run: RewardModelRun) -> SafeString:
    counts = (run.data_manifest or {}).get("counts") or {}
    rows = [(k.replace("_", " "), v) for k, v in counts.items()]
    rows += [("snapshot", s.sha256) for s in run.snapshots.all()]
    rows.append(("manifest sha256", run.manifest_sha256))
    return _table(["", ""], rows, "Data (from frozen batches, through their snapshots)")


@admin.register(RewardModelRun)
class RewardModelRunAdmin(admin.ModelAdmin):
    list_display = ["id", "kind", "base_checkpoint", "status", "progress_bar", "held_out_accuracy", "created_at",
                    "finished_at"]
    list_filter = ["kind", "status"]
    list_select_related = ["base_checkpoint"]
    search_fields = ["base_checkpoint__name", "manifest_sha256"]
    actions = ["cancel_runs", "relaunch_runs"]
    fieldsets = [
        (None, {"fields": ["kind", "base_checkpoint", "batch_labels", "status", "progress_bar", "progress_message",
                           "error", "created_by", "created_at", "started_at", "finished_at", "artifact_path"]}),
        ("Evaluation", {"fields": ["warnings", "by_test_set", "by_strength", "by_safety_bin", "pre_training",
                                   "calibration", "distributions"]}),
        ("Training and data", {"fields": ["training", "data", "config_json"]}),
    ]
    readonly_fields = [f for _, opts in fieldsets for f in opts["fields"]]

    @admin.display(description="warnings")
    def warnings(self, run):
        if run.status != "succeeded":
            return "–"
        found = accuracy_warnings(_eval_sets(run))
        if not found:
            return "None: above chance with 95% confidence and above the length-only baseline."
        return format_html_join("", '<p style="color:#ba2121"><strong>Warning:</strong> {}</p>', ((w,) for w in found))

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("base_checkpoint", "created_by")

    def has_change_permission(self, request, obj=None):
        return False  # runs are written by the services and the workers; the change page is read-only

    def has_delete_permission(self, request, obj=None):
        return False

    # --- launching: the add page is the launch form ---

    def add_view(self, request, form_url="", extra_context=None):
        initial = {}
        if ids := request.GET.get("batches"):
            initial["batches"] = [i for i in ids.split(",") if i.isdigit()]
        form = LaunchForm(request.POST or None, initial=initial)
        if request.method == "POST" and form.is_valid():
            data = form.cleaned_data
            kinds = list(RewardKind.values) if data["kind"] == services.PAIR else [data["kind"]]
            try:
                runs = services.reward_runs_launch(kinds=kinds, base_checkpoint=data["base_checkpoint"],
                                                   batches=list(data["batches"]), config=data["config"],
                                                   created_by=request.user)
            except ValidationError as error:
                _add_errors(form, error)
            else:
                self.message_user(request, "Launched " + ", ".join(f"{r.kind} run #{r.pk}" for r in runs) +
                                  "; a GPU worker trains them (progress on this page and on /jobs/).", messages.SUCCESS)
                return HttpResponseRedirect(reverse("admin:rewards_rewardmodelrun_changelist"))
        context = {**self.admin_site.each_context(request), "title": "Launch reward-model training", "form": form,
                   "opts": self.model._meta, **(extra_context or {})}
        return render(request, "admin/rewards/rewardmodelrun/launch.html", context)

    @admin.action(description="Cancel selected runs (queued or running)")
    def cancel_runs(self, request, queryset):
        for run in queryset:
            try:
                services.reward_run_cancel(run=run)
            except ValidationError as error:
                self.message_user(request, " ".join(error.messages), messages.WARNING)
            else:
                self.message_user(request, f"Cancelled run #{run.pk}.", messages.SUCCESS)

    @admin.action(description="Relaunch selected runs (same kind, base, batches and config)")
    def relaunch_runs(self, request, queryset):
        for run in queryset:
            try:
                new = services.reward_run_relaunch(run=run, created_by=request.user)
            except ValidationError as error:
                self.message_user(request, f"Run #{run.pk} was not relaunched: {' '.join(error.messages)}",
                                  messages.ERROR)
            else:
                self.message_user(request, f"Relaunched run #{run.pk} as run #{new.pk}.", messages.SUCCESS)

    # --- columns and read-only fields ---

    @admin.display(description="progress")
    def progress_bar(self, run):
        return format_html('<progress max="1" value="{}"></progress> {}', f"{run.progress:.4f}",
                           f"{run.step}/{run.total_steps}" if run.total_steps else _pct(run.progress))

    @admin.display(description="held-out accuracy")
    def held_out_accuracy(self, run):
        return _pct((_eval_sets(run).get("all") or {}).get("accuracy"))

    @admin.display(description="batches")
    def batch_labels(self, run):
        return ", ".join(b.label for b in run.batches.order_by("label"))

    @admin.display(description="config")
    def config_json(self, run):
        return format_html("<pre>{}</pre>", json.dumps(run.config, indent=2, sort_keys=True))

    @admin.display(description="per test set")
    def by_test_set(self, run):
        return per_test_set_table(_eval_sets(run)) if _eval_sets(run) else "–"

    @admin.display(description="per strength")
    def by_strength(self, run):
        return strength_table(_eval_sets(run)) if _eval_sets(run) else "–"

    @admin.display(description="per safety bin")
    def by_safety_bin(self, run):
        return safety_bin_table(_eval_sets(run)) if _eval_sets(run) else "–"

    @admin.display(description="before training")
    def pre_training(self, run):
        return pre_training_table(run)

    @admin.display(description="calibration")
    def calibration(self, run):
        return calibration_table(_eval_sets(run)["all"]) if "all" in _eval_sets(run) else "–"

    @admin.display(description="reward distributions")
    def distributions(self, run):
        return distribution_table(_eval_sets(run)["all"]) if "all" in _eval_sets(run) else "–"

    @admin.display(description="training")
    def training(self, run):
        return training_table(run) if run.metrics else "–"

    @admin.display(description="data")
    def data(self, run):
        return data_table(run)


def _add_errors(form: forms.Form, error: ValidationError) -> None:
    if not hasattr(error, "error_dict"):
        form.add_error(None, error)
        return
    for field, errors in error.message_dict.items():
        form.add_error(field if field in form.fields else None, errors)
