"""Admin for the annotation models.

Rows of a frozen batch are read-only here (the database triggers refuse changes anyway; this keeps
the admin from offering them). Assignments and judgments are written only by the services, so the
admin shows them and never adds, edits or deletes them. Text columns are plain strings: the admin
escapes them (no format_html / mark_safe on anything a person or a model wrote).
"""
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Count, Exists, OuterRef, Q
from django.http import HttpResponseRedirect
from django.urls import reverse
from django.utils.safestring import mark_safe

from . import services
from .markdown import render_markdown
from .models import Assignment, Batch, Comparison, Guidelines, Judgment, Prompt, Response, Snapshot

# Batches with more judgments than this are frozen by a worker (hashing them takes a while);
# smaller ones are frozen inside the request, so the result shows at once.
INLINE_FREEZE_MAX_JUDGMENTS = 20000


def _short(text: str, length: int = 80) -> str:
    return text if len(text) <= length else text[: length - 1] + "…"


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class FrozenReadOnlyMixin:
    """Change and delete are refused for rows that belong to a frozen batch."""

    def in_frozen_batch(self, obj) -> bool:
        raise NotImplementedError

    def has_change_permission(self, request, obj=None):
        return super().has_change_permission(request, obj) and not (obj is not None and self.in_frozen_batch(obj))

    def has_delete_permission(self, request, obj=None):
        return super().has_delete_permission(request, obj) and not (obj is not None and self.in_frozen_batch(obj))


@admin.register(Batch)
class BatchAdmin(FrozenReadOnlyMixin, admin.ModelAdmin):
    list_display = ["label", "kind", "status", "comparisons", "judgments", "test_size", "frozen_at", "short_hash"]
    list_filter = ["status", "kind"]
    search_fields = ["label"]
    readonly_fields = ["status", "frozen_at", "content_hash", "test_size", "created_at"]
    actions = ["freeze_selected", "train_reward_models"]

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(
            n_comparisons=Count("comparisons", distinct=True), n_judgments=Count("comparisons__judgments"),
        )

    def in_frozen_batch(self, obj) -> bool:
        return obj.is_frozen

    @admin.display(ordering="n_comparisons")
    def comparisons(self, obj):
        return obj.n_comparisons

    @admin.display(ordering="n_judgments")
    def judgments(self, obj):
        return obj.n_judgments

    @admin.display(description="content hash")
    def short_hash(self, obj):
        return obj.content_hash[:12] or "–"

    @admin.action(description="Train reward models on selected batches")
    def train_reward_models(self, request, queryset):
        """Open the reward-model launch form with these batches ticked; the form checks they are frozen."""
        ids = ",".join(str(pk) for pk in queryset.order_by("pk").values_list("pk", flat=True))
        return HttpResponseRedirect(f"{reverse('admin:rewards_rewardmodelrun_add')}?batches={ids}")

    @admin.action(description="Freeze selected batches")
    def freeze_selected(self, request, queryset):
        from workers.batches import freeze_batch

        for batch in queryset:
            if batch.is_frozen:
                self.message_user(request, f"Batch {batch.label} is already frozen.", messages.WARNING)
            elif batch.n_judgments > INLINE_FREEZE_MAX_JUDGMENTS:
                transaction.on_commit(lambda batch_id=batch.pk: freeze_batch.delay(batch_id))
                self.message_user(request, f"Batch {batch.label} ({batch.n_judgments} judgments) is being frozen "
                                           "by a worker; reload this page to see it frozen.", messages.INFO)
            else:
                try:
                    frozen = services.batch_freeze(batch=batch)
                except ValidationError as error:
                    self.message_user(request, f"Batch {batch.label} was not frozen: {' '.join(error.messages)}",
                                      messages.ERROR)
                else:
                    carried = Comparison.objects.filter(carried_from__batch=frozen).count()
                    self.message_user(request, f"Froze batch {frozen.label}: {batch.n_comparisons} comparisons, "
                                               f"{frozen.test_size} held out, hash {frozen.content_hash[:12]}."
                                      + (f" {carried} not fully judged: carried over to the queue, open leases "
                                         "with them." if carried else ""),
                                      messages.SUCCESS)


@admin.register(Guidelines)
class GuidelinesAdmin(admin.ModelAdmin):
    list_display = ["title", "updated_at"]
    search_fields = ["title", "body_markdown"]
    fields = ["title", "body_markdown", "preview", "updated_at"]
    readonly_fields = ["preview", "updated_at"]

    @admin.display(description="Preview (as annotators see it)")
    def preview(self, obj):
        # render_markdown's output is allowlist-sanitised HTML (annotation/markdown.py).
        return mark_safe(render_markdown(obj.body_markdown)) if obj and obj.pk else "Save to preview."


def _prompt_in_frozen_batch():
    return Exists(Comparison.objects.filter(prompt=OuterRef("pk"), batch__status=Batch.Status.FROZEN))


@admin.register(Prompt)
class PromptAdmin(FrozenReadOnlyMixin, admin.ModelAdmin):
    list_display = ["id", "short_text", "source", "is_adversarial", "awaiting_responses", "turns", "author", "created_at"]
    list_filter = ["source", "is_adversarial", "awaiting_responses", "language"]
    search_fields = ["text", "external_id", "author__username"]
    list_select_related = ["author"]
    raw_id_fields = ["author", "continues"]
    readonly_fields = ["created_at"]
    date_hierarchy = "created_at"

    def in_frozen_batch(self, obj) -> bool:
        return Prompt.objects.filter(pk=obj.pk).filter(_prompt_in_frozen_batch()).exists()

    @admin.display(description="text")
    def short_text(self, obj):
        return _short(obj.text)

    @admin.display(description="prior turns")
    def turns(self, obj):
        return len(obj.context)


@admin.register(Response)
class ResponseAdmin(FrozenReadOnlyMixin, admin.ModelAdmin):
    list_display = ["id", "short_prompt", "checkpoint", "temperature", "top_p", "short_text", "created_at"]
    list_filter = ["checkpoint"]
    search_fields = ["text", "prompt__text"]
    list_select_related = ["prompt", "checkpoint"]
    raw_id_fields = ["prompt", "checkpoint"]
    readonly_fields = ["created_at"]

    def in_frozen_batch(self, obj) -> bool:
        return Comparison.objects.filter(Q(response_a=obj) | Q(response_b=obj), batch__status=Batch.Status.FROZEN).exists()

    @admin.display(description="prompt")
    def short_prompt(self, obj):
        return _short(obj.prompt.text, 50)

    @admin.display(description="text")
    def short_text(self, obj):
        return _short(obj.text)


@admin.register(Comparison)
class ComparisonAdmin(FrozenReadOnlyMixin, admin.ModelAdmin):
    """Comparisons come from the services (sampling jobs, the API, imports); here only the overlap
    changes, and only while the batch is open."""

    list_display = ["id", "short_prompt", "batch", "origin", "overlap", "judgment_count", "is_test", "created_at"]
    list_filter = ["origin", "is_test", "batch__status", "batch"]
    search_fields = ["prompt__text", "=id"]
    list_select_related = ["prompt", "batch"]
    raw_id_fields = ["prompt", "response_a", "response_b", "batch"]
    readonly_fields = ["prompt", "response_a", "response_b", "batch", "origin", "is_test", "created_at"]

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(n_judgments=Count("judgments"))

    def has_add_permission(self, request):
        return False

    def in_frozen_batch(self, obj) -> bool:
        return obj.batch_id is not None and obj.batch.is_frozen

    @admin.display(description="prompt")
    def short_prompt(self, obj):
        return _short(obj.prompt.text, 60)

    @admin.display(description="judgments", ordering="n_judgments")
    def judgment_count(self, obj):
        return obj.n_judgments


@admin.register(Assignment)
class AssignmentAdmin(ReadOnlyAdmin):
    list_display = ["id", "comparison_id", "annotator", "status", "displayed_order", "leased_at", "submitted_at"]
    list_filter = ["status", "displayed_order"]
    search_fields = ["annotator__username", "=comparison__id"]
    list_select_related = ["annotator"]


@admin.register(Judgment)
class JudgmentAdmin(ReadOnlyAdmin):
    """Judgments are the annotators' record: shown, never edited here (frozen ones cannot change at all)."""

    list_display = ["id", "comparison_id", "batch", "annotator", "source", "chosen", "strength", "a_safe", "b_safe",
                    "safety_bin", "seconds_spent", "created_at"]
    list_filter = ["source", "chosen", "strength", "safety_bin", "comparison__batch__status", "comparison__batch"]
    search_fields = ["annotator__username", "note", "=comparison__id"]
    list_select_related = ["annotator", "comparison__batch"]
    date_hierarchy = "created_at"

    @admin.display(ordering="comparison__batch__label")
    def batch(self, obj):
        return obj.comparison.batch


@admin.register(Snapshot)
class SnapshotAdmin(ReadOnlyAdmin):
    list_display = ["sha256", "row_count", "schema_version", "path", "created_at"]
    search_fields = ["sha256", "path"]
