"""REST API of reward-model runs (/api/v1/reward-runs): researchers read, admins launch and cancel.
URLs: annotation/api_urls.py."""
from django_filters import rest_framework as filters
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import mixins, serializers, status
from rest_framework.decorators import action
from rest_framework.exceptions import ValidationError
from rest_framework.response import Response

from annotation.api.views import ApiViewSet
from annotation.models import Batch
from policy.models import Checkpoint
from webapp.jobs import JobStatus
from webapp.permissions import IsAdmin, IsResearcher

from . import services
from .models import RewardKind, RewardModelRun


class RewardModelRunSerializer(serializers.ModelSerializer):
    base_checkpoint = serializers.SlugRelatedField(slug_field="name", read_only=True)
    batches = serializers.SlugRelatedField(slug_field="label", many=True, read_only=True)
    snapshots = serializers.SlugRelatedField(slug_field="sha256", many=True, read_only=True)
    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True, allow_null=True)

    class Meta:
        model = RewardModelRun
        fields = ["id", "kind", "base_checkpoint", "batches", "snapshots", "status", "progress", "progress_message",
                  "error", "step", "total_steps", "config", "manifest_sha256", "tokenizer_sha256", "warnings",
                  "metrics", "artifact_path", "created_by", "created_at", "started_at", "finished_at"]
        read_only_fields = fields

    warnings = serializers.SerializerMethodField(
        help_text="Why the held-out accuracy should not be trusted (not above chance with 95% confidence, not above "
                  "the length-only baseline, no held-out pairs); empty when fine or not finished")

    def get_warnings(self, run) -> list[str]:
        return accuracy_warnings((run.metrics or {}).get("eval")) if run.status == "succeeded" else []


class RewardModelRunListSerializer(RewardModelRunSerializer):
    """The list leaves out the metrics (per-set evaluation tables, the loss curve): read one run for them."""

    class Meta(RewardModelRunSerializer.Meta):
        fields = [f for f in RewardModelRunSerializer.Meta.fields if f not in ("metrics", "warnings")]
        read_only_fields = fields


class RewardLaunchSerializer(serializers.Serializer):
    kind = serializers.ChoiceField(choices=[*RewardKind.values, services.PAIR],
                                   help_text=f"helpfulness, safety, or {services.PAIR} (both twins on the same data)")
    base_checkpoint = serializers.SlugRelatedField(slug_field="name", queryset=Checkpoint.objects.all(),
                                                   help_text="Name of a registered checkpoint with weights")
    batches = serializers.ListField(child=serializers.CharField(max_length=100), allow_empty=False, max_length=200,
                                    help_text="Labels of frozen batches")
    config = serializers.DictField(required=False, default=dict,
                                   help_text="RewardTrainConfig fields to override (lr, micro_batch_size, ...)")

    def validate_batches(self, labels: list[str]) -> list[Batch]:
        found = list(Batch.objects.filter(label__in=labels))
        if missing := sorted(set(labels) - {b.label for b in found}):
            raise serializers.ValidationError(f"No batch labelled {', '.join(missing)}.")
        return found


class RewardLaunchResultSerializer(serializers.Serializer):
    runs = RewardModelRunSerializer(many=True, read_only=True)


class RewardModelRunFilter(filters.FilterSet):
    kind = filters.ChoiceFilter(choices=RewardKind.choices)
    status = filters.ChoiceFilter(choices=JobStatus.choices)
    base_checkpoint = filters.CharFilter(field_name="base_checkpoint__name", help_text="Checkpoint name")

    class Meta:
        model = RewardModelRun
        fields: list[str] = []


@extend_schema_view(
    list=extend_schema(responses={200: RewardModelRunListSerializer(many=True)}),
    create=extend_schema(request=RewardLaunchSerializer, responses={201: RewardLaunchResultSerializer}),
    cancel=extend_schema(request=None, responses={200: RewardModelRunSerializer}),
)
class RewardModelRunViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, ApiViewSet):
    """Reward-model runs with their evaluation; admins launch them (one kind or the pair) and cancel them."""

    filterset_class = RewardModelRunFilter
    ordering_fields = ["id", "created_at"]
    permission_classes = [IsResearcher]
    permission_by_action = {"create": IsAdmin, "cancel": IsAdmin}
    queryset = RewardModelRun.objects.select_related("base_checkpoint", "created_by").prefetch_related(
        "batches", "snapshots")

    def get_serializer_class(self):
        return RewardModelRunListSerializer if self.action == "list" else RewardModelRunSerializer

    def create(self, request):
        """Launch training on frozen batches; 400 names the field on bad input, and nothing is created."""
        form = RewardLaunchSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        data = form.validated_data
        kinds = list(RewardKind.values) if data["kind"] == services.PAIR else [data["kind"]]
        runs = services.reward_runs_launch(kinds=kinds, base_checkpoint=data["base_checkpoint"],
                                           batches=data["batches"], config=data["config"], created_by=request.user)
        fresh = self.get_queryset().filter(pk__in=[r.pk for r in runs]).order_by("id")
        return Response(RewardLaunchResultSerializer({"runs": fresh}).data, status=status.HTTP_201_CREATED)

    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        run = self.get_object()
        if not run.is_active:
            raise ValidationError({"status": f"Run #{run.pk} is already {run.status}."})
        services.reward_run_cancel(run=run)
        return Response(RewardModelRunSerializer(self.get_queryset().get(pk=run.pk)).data)
