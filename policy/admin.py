"""Admin of the policy side: checkpoints (shown; registered by services and rounds) and RLHF rounds,
launched from the add form (every check of policy.rounds.round_launch shows on its field), listed
with their live status, cancelled or resumed by actions, and shown with their metrics: the PPO curves
(reward, KL, entropy, clip fraction, value loss) and the paper's Figure 7 table (max vs median reward
of N samples)."""
import json

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.utils.html import format_html, format_html_join

from annotation.models import Batch
from rewards.models import RewardModelRun
from webapp.jobs import JobStatus

from . import rounds, selectors, services
from .models import Checkpoint, RLHFRound

CURVES = [("reward_raw", "reward (raw R_c)"), ("kl", "KL(pi || pi_0)"), ("entropy", "entropy"),
          ("clipfrac", "clip fraction"), ("value_loss", "value loss")]


@admin.register(Checkpoint)
class CheckpointAdmin(admin.ModelAdmin):
    list_display = ["name", "format", "parent", "produced_by", "held_back", "short_sha", "created_at"]
    list_filter = ["format", "held_back"]
    search_fields = ["name", "sha256"]
    list_select_related = ["parent", "produced_by"]
    readonly_fields = ["name", "format", "path", "tokenizer_path", "tokenizer_sha256", "params", "parent",
                       "produced_by", "held_back", "sha256", "created_at"]
    actions = ["release_selected"]

    @admin.action(description="Release selected held-back checkpoints (let default generation arms use them)")
    def release_selected(self, request, queryset):
        for checkpoint in queryset:
            try:
                services.checkpoint_release(checkpoint=checkpoint)
            except ValidationError as error:
                self.message_user(request, " ".join(error.messages), messages.WARNING)
            else:
                self.message_user(request, f"{checkpoint.name} released: default generation arms may use it.")

    def has_add_permission(self, request):
        return False  # registered through the API or manage.py, produced by rounds

    def has_delete_permission(self, request, obj=None):
        return False

    @admin.display(description="sha256")
    def short_sha(self, obj):
        return obj.sha256[:12] or "–"


class RoundLaunchForm(forms.ModelForm):
    """Everything round_launch takes; the prompt set from batches, tags and/or ids."""

    policy = forms.ModelChoiceField(queryset=Checkpoint.objects.exclude(format=Checkpoint.Format.EXTERNAL))
    helpfulness_rm = forms.ModelChoiceField(
        queryset=RewardModelRun.objects.filter(kind=RewardModelRun.Kind.HELPFULNESS, status=JobStatus.SUCCEEDED))
    safety_rm = forms.ModelChoiceField(
        queryset=RewardModelRun.objects.filter(kind=RewardModelRun.Kind.SAFETY, status=JobStatus.SUCCEEDED))
    batches = forms.ModelMultipleChoiceField(queryset=Batch.objects.all(), required=False,
                                             help_text="The prompts of these batches' comparisons")
    tags = forms.CharField(required=False, help_text="Comma-separated: prompts carrying all these tags "
                                                     "(e.g. demo-world, train)")
    prompt_ids = forms.CharField(required=False, help_text="Comma-separated prompt ids")
    prompt_limit = forms.IntegerField(required=False, min_value=1, help_text="A seeded sample of this many")
    stage_list = forms.MultipleChoiceField(label="Stages", choices=RLHFRound.Stage.choices, required=False,
                                           widget=forms.CheckboxSelectMultiple,
                                           help_text="They run in the order listed. None ticked: the recipe's stages "
                                                     "for the policy's size (rejection sampling + SFT under 1B "
                                                     "parameters, + PPO from 1B; docs/recipes.md)")
    eval_tags = forms.CharField(required=False, label="Evaluation prompt tags",
                                help_text="Comma-separated: evaluate on prompts carrying all these tags (e.g. "
                                          "demo-world, heldout); none: a held-out share (eval_fraction) of the prompts")
    round_config = forms.JSONField(
        label="Config", initial=dict, required=False, widget=forms.Textarea(attrs={"rows": 12, "cols": 80}),
        help_text="Only what differs from the recipe, e.g. {\"ppo\": {\"kl_coef\": 0.05}}. Fields left out take the "
                  "recipe of the policy's size (policy/recipes.py, docs/recipes.md), stored whole on the round.")

    class Meta:
        model = RLHFRound
        fields: list[str] = []

    def clean(self):
        data = super().clean()
        if self.errors:
            return data
        try:
            ids = [int(x) for x in (data.get("prompt_ids") or "").replace(" ", "").split(",") if x]
        except ValueError:
            self.add_error("prompt_ids", "Whole numbers separated by commas.")
            return data
        tags = [t.strip() for t in (data.get("tags") or "").split(",") if t.strip()]
        prompts = rounds.prompts_for_round(ids=ids, batches=list(data.get("batches") or []), tags=tags,
                                           limit=data.get("prompt_limit"))
        eval_tags = [t.strip() for t in (data.get("eval_tags") or "").split(",") if t.strip()]
        eval_prompts = rounds.prompts_for_round(tags=eval_tags) if eval_tags else None
        try:
            self.instance = rounds.round_launch(
                policy=data["policy"], helpfulness_rm=data["helpfulness_rm"], safety_rm=data["safety_rm"],
                prompts=prompts, stages=data.get("stage_list") or None, config=data.get("round_config") or {},
                eval_prompts=eval_prompts, created_by=self.user,
            )  # fmt: skip
        except ValidationError as error:
            fields = {"prompts": "batches", "stages": "stage_list", "config": "round_config",
                      "eval_prompts": "eval_tags"}
            for field, errors in error.message_dict.items():
                target = fields.get(field, field)
                if field.startswith("config."):
                    target, errors = "round_config", [f"{field.removeprefix('config.')}: {e}" for e in errors]
                self.add_error(target if target in self.fields else None, errors)
        return data


@admin.register(RLHFRound)
class RLHFRoundAdmin(admin.ModelAdmin):
    list_display = ["id", "policy_in", "status", "stage", "progress_bar", "progress_message", "checkpoint_out",
                    "verdict", "created_at"]
    list_filter = ["status", "verdict"]
    search_fields = ["policy_in__name", "=id"]
    list_select_related = ["policy_in", "checkpoint_out"]
    actions = ["cancel_selected", "resume_selected"]
    readonly_fields = ["status", "current_stage", "progress", "progress_message", "error", "verdict", "evaluation",
                       "checkpoint_out", "policy_in", "lineage_root", "helpfulness_rm", "safety_rm", "stages",
                       "prompt_count", "created_by", "created_at", "started_at", "finished_at", "ppo_curves",
                       "figure7", "config_json", "snapshot_hashes", "other_metrics"]
    change_form_template = "admin/policy/rlhfround/change_form.html"
    change_list_template = "admin/policy/rlhfround/change_list.html"

    def get_form(self, request, obj=None, **kwargs):
        if obj is None:
            kwargs["form"] = RoundLaunchForm
            form = super().get_form(request, obj, **kwargs)
            form.user = request.user
            return form
        return super().get_form(request, obj, **kwargs)

    def get_fields(self, request, obj=None):
        if obj is None:
            return ["policy", "helpfulness_rm", "safety_rm", "batches", "tags", "prompt_ids", "prompt_limit",
                    "eval_tags", "stage_list", "round_config"]
        return self.readonly_fields

    def get_readonly_fields(self, request, obj=None):
        return self.readonly_fields if obj is not None else []

    def save_model(self, request, obj, form, change):
        if not change:  # round_launch created it in the form's clean()
            messages.info(request, f"Round {obj.pk} is queued for the workers.")

    def save_related(self, request, form, formsets, change):
        pass  # the prompts were set by round_launch

    def has_delete_permission(self, request, obj=None):
        return False

    def changeform_view(self, request, object_id=None, form_url="", extra_context=None):
        extra_context = {**(extra_context or {}), "show_save_and_continue": False, "show_save_and_add_another": False}
        if object_id is not None:
            extra_context["refresh_seconds"] = 5 if RLHFRound.objects.filter(
                pk=object_id, status__in=[JobStatus.QUEUED, JobStatus.RUNNING]).exists() else None
        return super().changeform_view(request, object_id, form_url, extra_context)

    def changelist_view(self, request, extra_context=None):
        active = RLHFRound.objects.filter(status__in=[JobStatus.QUEUED, JobStatus.RUNNING]).exists()
        return super().changelist_view(request, {**(extra_context or {}), "refresh_seconds": 5 if active else None})

    # --- columns and fields

    @admin.display(description="stage")
    def stage(self, obj):
        return obj.current_stage or "–"

    @admin.display(description="progress", ordering="progress")
    def progress_bar(self, obj):
        return format_html('<progress value="{}" max="1"></progress> {}%', f"{obj.progress:.3f}",
                           round(obj.progress * 100))

    @admin.display(description="prompts")
    def prompt_count(self, obj):
        return obj.prompts.count()

    @admin.display(description="config")
    def config_json(self, obj):
        return format_html("<pre>{}</pre>", json.dumps(obj.config, indent=2))

    @admin.display(description="evaluation against the parent")
    def evaluation(self, obj):
        evaluation = (obj.metrics or {}).get("evaluation")
        human = selectors.round_human_win_rate(rnd=obj)
        rows = [(label, row) for label, row in (
            ("oracle (demo world)", (evaluation or {}).get("oracle")),
            ("helpfulness RM", (evaluation or {}).get("helpfulness_rm")),
            ("safety RM", (evaluation or {}).get("safety_rm")),
            ("people", human)) if row]
        warnings = format_html_join("", '<p style="color:#ba2121"><strong>Warning:</strong> {}</p>',
                                    ((w,) for w in rounds.round_warnings(obj)))
        if not rows:
            return format_html("{}<p>Not evaluated.</p>", warnings)
        body = format_html_join("", "<tr><td>{}</td><td>{}</td><td>{}</td><td>{} / {} / {}</td><td>{}</td></tr>", (
            (label, f"{r['win_rate']:.1%}" if r.get("win_rate") is not None else "–",
             f"{r['ci95'][0]:.1%} – {r['ci95'][1]:.1%}", r["wins"], r["losses"], r["ties"], r["n"])
            for label, r in rows))
        return format_html("{}<p>{}</p><table><tr><th>judge</th><th>win rate (ties half)</th><th>95% CI</th>"
                           "<th>W / L / T</th><th>prompts</th></tr>{}</table>",
                           warnings, rounds.evaluation_line(evaluation), body)

    @admin.display(description="PPO curves")
    def ppo_curves(self, obj):
        curve = ((obj.metrics or {}).get("ppo") or {}).get("curve") or []
        if not curve:
            return "–"
        charts = format_html_join("", '<div style="display:inline-block;margin:0 1em 1em 0">{}<br>{}</div>',
                                  ((label, _sparkline([p.get(key) for p in curve])) for key, label in CURVES))
        rows = format_html_join("", "<tr><td>{}</td>" + "<td>{}</td>" * len(CURVES) + "</tr>",
                                ([p.get("iteration")] + [_num(p.get(key)) for key, _ in CURVES] for p in curve))
        head = format_html_join("", "<th>{}</th>", ((label,) for _, label in CURVES))
        return format_html('{}<table><tr><th>iteration</th>{}</tr>{}</table>', charts, head, rows)

    @admin.display(description="Max vs median reward of N samples (Figure 7)")
    def figure7(self, obj):
        table = ((obj.metrics or {}).get("rejection_sampling") or {}).get("max_vs_median") or []
        if not table:
            return "–"
        rows = format_html_join("", "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                                ((r["n"], _num(r["max"]), _num(r["median"]), _num(r["max"] - r["median"]))
                                 for r in table))
        return format_html("<table><tr><th>N</th><th>max</th><th>median</th><th>gap</th></tr>{}</table>", rows)

    @admin.display(description="other metrics")
    def other_metrics(self, obj):
        rest = {k: v for k, v in (obj.metrics or {}).items() if k != "ppo"}
        rest["ppo"] = {k: v for k, v in ((obj.metrics or {}).get("ppo") or {}).items() if k != "curve"}
        for key in ("rejection_sampling",):
            if isinstance(rest.get(key), dict):
                rest[key] = {k: v for k, v in rest[key].items() if k != "max_vs_median"}
        return format_html("<pre>{}</pre>", json.dumps(rest, indent=2))

    # --- actions

    @admin.action(description="Cancel selected rounds")
    def cancel_selected(self, request, queryset):
        for rnd in queryset:
            try:
                rounds.round_cancel(rnd=rnd)
            except ValidationError as error:
                self.message_user(request, " ".join(error.messages), messages.WARNING)
            else:
                self.message_user(request, f"Round {rnd.pk} cancelled; its worker stops at its next step.")

    @admin.action(description="Resume selected rounds (send to the workers again, e.g. after a lost worker)")
    def resume_selected(self, request, queryset):
        for rnd in queryset:
            try:
                rounds.round_resume(rnd=rnd)
            except ValidationError as error:
                self.message_user(request, " ".join(error.messages), messages.WARNING)
            else:
                self.message_user(request, f"Round {rnd.pk} sent to the workers again.")


def _num(value) -> str:
    return "–" if value is None else f"{value:.4g}"


def _sparkline(values, width: int = 220, height: int = 60):
    """An inline SVG polyline of a series (None values skipped); numbers only, so nothing to escape."""
    points = [(i, float(v)) for i, v in enumerate(values) if v is not None]
    if not points:
        return "–"
    lo, hi = min(v for _, v in points), max(v for _, v in points)
    span, n = (hi - lo) or 1.0, max(len(values) - 1, 1)
    coords = " ".join(f"{i * width / n:.1f},{height - (v - lo) / span * height:.1f}" for i, v in points)
    return format_html('<svg width="{}" height="{}" style="border:1px solid #ccc"><polyline fill="none" '
                       'stroke="#417690" stroke-width="1.5" points="{}"/></svg><br><small>{} .. {}</small>',
                       width, height + 2, coords, _num(lo), _num(hi))
