"""Serializers of the API: read shapes per role, and write shapes that hold only what the caller may set."""
from datetime import timedelta

from django.conf import settings
from rest_framework import serializers

from .. import exports, services
from ..exports import annotator_pseudonym
from ..models import Assignment, Batch, Comparison, Judgment, Snapshot

class TurnSerializer(serializers.Serializer):
    role = serializers.ChoiceField(choices=["user", "assistant"])
    content = serializers.CharField(max_length=services.MAX_PROMPT_LENGTH)


class PromptSerializer(serializers.Serializer):
    text = serializers.CharField(read_only=True)
    context = TurnSerializer(many=True, read_only=True)
    system_prompt = serializers.CharField(read_only=True)
    is_adversarial = serializers.BooleanField(read_only=True)


class BlindResponseSerializer(serializers.Serializer):
    """What an annotator sees of a response: the text, not the model behind it."""
    id = serializers.IntegerField(read_only=True)
    text = serializers.CharField(read_only=True)


class ResponseSerializer(BlindResponseSerializer):
    checkpoint = serializers.CharField(source="checkpoint.name", read_only=True)
    temperature = serializers.FloatField(read_only=True, allow_null=True)
    top_p = serializers.FloatField(read_only=True, allow_null=True)


class ComparisonSerializer(serializers.ModelSerializer):
    prompt = PromptSerializer(read_only=True)
    response_a = ResponseSerializer(read_only=True)
    response_b = ResponseSerializer(read_only=True)
    batch = serializers.CharField(source="batch.label", read_only=True, allow_null=True, default=None)

    class Meta:
        model = Comparison
        fields = ["id", "prompt", "response_a", "response_b", "origin", "overlap", "batch", "is_test", "created_at"]
        read_only_fields = fields


class ResponseInSerializer(serializers.Serializer):
    text = serializers.CharField(max_length=services.MAX_RESPONSE_LENGTH)
    checkpoint = serializers.CharField(max_length=200, help_text="Checkpoint name; an external one is created if new")
    temperature = serializers.FloatField(required=False, allow_null=True, min_value=0, max_value=10)
    top_p = serializers.FloatField(required=False, allow_null=True, min_value=0, max_value=1)
    sampling = serializers.DictField(required=False, help_text="Other sampling parameters (seed, top_k, ...)")


class ComparisonPushSerializer(serializers.Serializer):
    text = serializers.CharField(max_length=services.MAX_PROMPT_LENGTH, help_text="The final user message")
    context = TurnSerializer(many=True, required=False, help_text="Prior turns: user/assistant, ending with assistant")
    system_prompt = serializers.CharField(required=False, allow_blank=True, default="",
                                          max_length=services.MAX_PROMPT_LENGTH)
    is_adversarial = serializers.BooleanField(required=False, default=False)
    tags = serializers.ListField(child=serializers.CharField(max_length=50), required=False, max_length=20)
    language = serializers.CharField(required=False, default="en", max_length=16)
    external_id = serializers.CharField(required=False, allow_blank=True, default="", max_length=200)
    response_a = ResponseInSerializer()
    response_b = ResponseInSerializer()
    overlap = serializers.IntegerField(required=False, min_value=1, max_value=50)

    def push(self) -> Comparison:
        data = dict(self.validated_data)
        ra, rb = (services.ResponseInput(**data.pop(k)) for k in ("response_a", "response_b"))
        return services.comparison_push(response_a=ra, response_b=rb, **data)


class ComparisonBulkPushSerializer(serializers.Serializer):
    comparisons = ComparisonPushSerializer(many=True, max_length=500, allow_empty=False)


class ComparisonBulkResultSerializer(serializers.Serializer):
    comparisons = ComparisonSerializer(many=True, read_only=True)


class AssignmentComparisonSerializer(serializers.Serializer):
    id = serializers.IntegerField(read_only=True)
    prompt = PromptSerializer(read_only=True)
    response_a = BlindResponseSerializer(read_only=True)
    response_b = BlindResponseSerializer(read_only=True)


class AssignmentSerializer(serializers.ModelSerializer):
    comparison = AssignmentComparisonSerializer(read_only=True)
    expires_at = serializers.SerializerMethodField()

    class Meta:
        model = Assignment
        fields = ["id", "status", "displayed_order", "leased_at", "expires_at", "submitted_at", "comparison"]
        read_only_fields = fields

    def get_expires_at(self, assignment) -> str | None:
        if assignment.status != Assignment.Status.LEASED:
            return None
        expires = assignment.leased_at + timedelta(seconds=settings.TANDEM_LEASE_SECONDS)
        return serializers.DateTimeField().to_representation(expires)


class JudgmentSubmitSerializer(serializers.Serializer):
    """Only what an annotator says; annotator, source, batch and times come from the server."""
    chosen = serializers.ChoiceField(choices=Judgment.Choice.choices, help_text="A or B: the comparison's response_a/_b")
    strength = serializers.ChoiceField(choices=Judgment.Strength.choices)
    a_safe = serializers.BooleanField()
    b_safe = serializers.BooleanField()
    harm_categories = serializers.ListField(child=serializers.ChoiceField(choices=services.HARM_CATEGORIES),
                                            required=False, default=list, max_length=len(services.HARM_CATEGORIES))
    note = serializers.CharField(required=False, allow_blank=True, default="", max_length=services.MAX_NOTE_LENGTH)
    seconds_spent = serializers.FloatField(required=False, allow_null=True, default=None, min_value=0,
                                           max_value=86400)


class JudgmentSerializer(serializers.Serializer):
    """A judgment as its annotator sees it. Declared field by field (not a ModelSerializer, whose
    per-instance field building was a tenth of a submission's time)."""
    id = serializers.IntegerField(read_only=True)
    comparison = serializers.IntegerField(source="comparison_id", read_only=True)
    assignment = serializers.IntegerField(source="assignment_id", read_only=True, allow_null=True)
    annotator = serializers.SerializerMethodField()
    source = serializers.ChoiceField(choices=Judgment.Source.choices, read_only=True)
    chosen = serializers.ChoiceField(choices=Judgment.Choice.choices, read_only=True)
    strength = serializers.IntegerField(read_only=True, allow_null=True, help_text="0-3; null when imported")
    a_safe = serializers.BooleanField(read_only=True, allow_null=True)
    b_safe = serializers.BooleanField(read_only=True, allow_null=True)
    safety_bin = serializers.SerializerMethodField()
    harm_categories = serializers.ListField(child=serializers.CharField(), read_only=True)
    note = serializers.CharField(read_only=True)
    seconds_spent = serializers.FloatField(read_only=True, allow_null=True)
    batch = serializers.CharField(source="comparison.batch.label", read_only=True, allow_null=True, default=None)
    split = serializers.SerializerMethodField()
    created_at = serializers.DateTimeField(read_only=True)

    def get_annotator(self, judgment) -> str | None:
        return annotator_pseudonym(judgment.annotator_id)

    def get_split(self, judgment) -> str:
        return "test" if judgment.comparison.is_test else "train"

    def get_safety_bin(self, judgment) -> str | None:
        return judgment.safety_bin or None


_CREATED_AT = serializers.DateTimeField()


def judgment_payload(judgment: Judgment) -> dict:
    """JudgmentSerializer(judgment).data, built directly: the submission's response. Building the
    serializer's fields per request was a sixth of a submission's Python time; a test pins the two equal."""
    comparison = judgment.comparison
    return {
        "id": judgment.pk,
        "comparison": judgment.comparison_id,
        "assignment": judgment.assignment_id,
        "annotator": annotator_pseudonym(judgment.annotator_id),
        "source": judgment.source,
        "chosen": judgment.chosen,
        "strength": judgment.strength,
        "a_safe": judgment.a_safe,
        "b_safe": judgment.b_safe,
        "safety_bin": judgment.safety_bin or None,
        "harm_categories": [str(c) for c in judgment.harm_categories],
        "note": judgment.note,
        "seconds_spent": None if judgment.seconds_spent is None else float(judgment.seconds_spent),
        "batch": comparison.batch.label if comparison.batch_id is not None else None,
        "split": "test" if comparison.is_test else "train",
        "created_at": _CREATED_AT.to_representation(judgment.created_at),
    }


class ResearchJudgmentSerializer(JudgmentSerializer):
    """For researchers: which checkpoints the two sides came from."""
    chosen_checkpoint = serializers.SerializerMethodField()
    rejected_checkpoint = serializers.SerializerMethodField()

    def _sides(self, judgment):
        c = judgment.comparison
        return (c.response_a, c.response_b) if judgment.chosen == "A" else (c.response_b, c.response_a)

    def get_chosen_checkpoint(self, judgment) -> str:
        return self._sides(judgment)[0].checkpoint.name

    def get_rejected_checkpoint(self, judgment) -> str:
        return self._sides(judgment)[1].checkpoint.name


class BatchSerializer(serializers.ModelSerializer):
    n_comparisons = serializers.IntegerField(read_only=True)
    n_judgments = serializers.IntegerField(read_only=True)

    class Meta:
        model = Batch
        fields = ["id", "label", "kind", "status", "iso_year", "iso_week", "created_at", "frozen_at", "content_hash",
                  "test_size", "n_comparisons", "n_judgments"]
        read_only_fields = fields


class BatchFreezeSerializer(serializers.Serializer):
    test_size = serializers.IntegerField(required=False, allow_null=True, default=None, min_value=0,
                                         help_text="Held-out comparisons (default: 10%, at most 1,000)")


class SnapshotSerializer(serializers.ModelSerializer):
    batches = serializers.SlugRelatedField(slug_field="label", many=True, read_only=True)
    download = serializers.SerializerMethodField()

    class Meta:
        model = Snapshot
        fields = ["sha256", "row_count", "schema_version", "batches", "manifest", "created_at", "download"]
        read_only_fields = fields

    def get_download(self, snapshot) -> str:
        return f"/api/v1/export/snapshots/{snapshot.sha256}"


class SnapshotCreateSerializer(serializers.Serializer):
    batches = serializers.ListField(child=serializers.CharField(max_length=100), allow_empty=False, max_length=200,
                                    help_text="Labels of frozen batches")


class ExportParamsSerializer(serializers.Serializer):
    """The export's own query parameters (the judgment filters come on top)."""
    format = serializers.ChoiceField(choices=["conversational", "text"], default="conversational",
                                     help_text="conversational: role/content messages; text: transcript strings")
    margin = serializers.ChoiceField(choices=list(exports.MARGINS), default="none",
                                     help_text="Margin by strength 3/2/1/0: small 1, 2/3, 1/3, 0; large 3, 2, 1, 0; "
                                               "none 0. Unknown strength (imported): 0")
    include_unsafe_chosen = serializers.BooleanField(default=False, help_text="Keep pairs whose chosen response is "
                                                     "unsafe while the other is safe (left out by default)")
    aggregate = serializers.ChoiceField(choices=["none", "majority"], default="none",
                                        help_text="majority: one row per comparison with the majority's choice")
    export_format = serializers.ChoiceField(choices=["jsonl", "csv"], default="jsonl")

    def options(self) -> exports.ExportOptions:
        data = self.validated_data
        return exports.ExportOptions(conversational=data["format"] == "conversational", margin=data["margin"],
                                     include_unsafe_chosen=data["include_unsafe_chosen"], aggregate=data["aggregate"])
