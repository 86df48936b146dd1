"""API views of the annotation side (/api/v1/). Each names its permission and narrows its queryset to
what the caller may see; each validates input, calls one service or selector, serializes."""
from django.db.models import Count, IntegerField, OuterRef, Subquery
from django.db.models.functions import Coalesce
import itertools

import django_filters
from django.http import FileResponse, Http404, StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import ValidationError
from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.response import Response
from rest_framework.views import APIView

from webapp.permissions import IsAdmin, IsAnnotator, IsAnnotatorOrResearcher, IsResearcher, is_researcher, is_simulated

from .. import exports, services, snapshots
from ..models import Assignment, Batch, Comparison, Judgment, Snapshot
from ..simulator import WORLD_TAG
from . import serializers as s
from .filters import (
    FILTER_BACKENDS,
    AssignmentFilter,
    BatchFilter,
    ComparisonFilter,
    JudgmentFilter,
    Pagination,
    StrictQueryParamsMixin,
)


class ApiViewSet(StrictQueryParamsMixin, viewsets.GenericViewSet):
    filter_backends = FILTER_BACKENDS
    pagination_class = Pagination
    ordering_fields = ["id"]
    ordering = ["-id"]
    permission_by_action: dict[str, type] = {}

    def get_permissions(self):
        return [self.permission_by_action.get(self.action, self.permission_classes[0])()]


# --- comparisons ------------------------------------------------------------------------------------

@extend_schema_view(
    create=extend_schema(request=s.ComparisonPushSerializer, responses={201: s.ComparisonSerializer}),
    bulk=extend_schema(request=s.ComparisonBulkPushSerializer, responses={201: s.ComparisonBulkResultSerializer}),
)
class ComparisonViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, ApiViewSet):
    """Comparisons: researchers read; admins push them from an external system (atomic)."""

    serializer_class = s.ComparisonSerializer
    filterset_class = ComparisonFilter
    ordering_fields = ["id", "created_at"]
    permission_classes = [IsResearcher]
    permission_by_action = {"create": IsAdmin, "bulk": IsAdmin}
    queryset = Comparison.objects.select_related(
        "prompt", "batch", "response_a__checkpoint", "response_b__checkpoint")

    def create(self, request):
        push = s.ComparisonPushSerializer(data=request.data)
        push.is_valid(raise_exception=True)
        comparison = push.push()
        return Response(s.ComparisonSerializer(self.get_queryset().get(pk=comparison.pk)).data,
                        status=status.HTTP_201_CREATED)

    @action(detail=False, methods=["post"])
    def bulk(self, request):
        """Up to 500 comparisons in one transaction: all are created, or none."""
        push = s.ComparisonBulkPushSerializer(data=request.data)
        push.is_valid(raise_exception=True)
        ids = services.comparison_push_many(items=[
            {**item, "response_a": services.ResponseInput(**item["response_a"]),
             "response_b": services.ResponseInput(**item["response_b"])}
            for item in push.validated_data["comparisons"]
        ])
        created = self.get_queryset().filter(pk__in=ids).order_by("id")
        return Response(s.ComparisonBulkResultSerializer({"comparisons": created}).data, status=status.HTTP_201_CREATED)


# --- assignments and judging --------------------------------------------------------------------------

IDEMPOTENCY_KEY = OpenApiParameter(
    "Idempotency-Key", OpenApiTypes.STR, OpenApiParameter.HEADER, required=False,
    description="A client-chosen key (at most 100 characters); a retry with the same key returns the "
                "judgment already made (200) instead of 201. A key you already used on another assignment "
                "is refused (400).",
)


class LeaseParamsSerializer(serializers.Serializer):
    tag = serializers.ListField(
        child=serializers.CharField(max_length=50), required=False, default=list, max_length=20,
        help_text="Only a comparison whose prompt carries this tag (repeat it: every one); simulated accounts "
                  f"get only prompts tagged {WORLD_TAG}, whatever they ask.")


@extend_schema_view(
    next=extend_schema(request=None, parameters=[LeaseParamsSerializer], responses={
        200: s.AssignmentSerializer, 204: OpenApiResponse(description="No comparison is waiting for you"),
        400: OpenApiResponse(description="An unknown query parameter, an empty tag or one over 50 characters, "
                                          "more than 20 tags")}),
    judgment=extend_schema(request=s.JudgmentSubmitSerializer, parameters=[IDEMPOTENCY_KEY],
                           responses={201: s.JudgmentSerializer, 200: s.JudgmentSerializer}),
    skip=extend_schema(request=None, responses={200: s.AssignmentSerializer}),
)
class AssignmentViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, ApiViewSet):
    """The caller's own assignments: lease the next comparison, judge it, or skip it."""

    serializer_class = s.AssignmentSerializer
    filterset_class = AssignmentFilter
    ordering_fields = ["id", "leased_at"]
    permission_classes = [IsAnnotator]

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):  # schema generation: no user
            return Assignment.objects.none()
        return Assignment.objects.filter(annotator=self.request.user).select_related(
            "comparison__prompt", "comparison__response_a", "comparison__response_b")

    def allowed_query_params(self) -> set[str]:
        return super().allowed_query_params() | ({"tag"} if self.action == "next" else set())

    @action(detail=False, methods=["post"])
    def next(self, request):
        """Your current lease, or a new one on the oldest comparison with a free slot (204: none) whose
        prompt carries every `tag` given."""
        params = LeaseParamsSerializer(data=request.query_params)
        params.is_valid(raise_exception=True)
        tags = params.validated_data["tag"]
        if is_simulated(request.user):  # the simulator's oracle can judge its own world's prompts only
            tags = [*tags, WORLD_TAG]
        assignment = services.assignment_lease_next(annotator=request.user, tags=tags)
        if assignment is None:
            return Response(status=status.HTTP_204_NO_CONTENT)
        return Response(s.AssignmentSerializer(self.get_queryset().get(pk=assignment.pk)).data)

    @action(detail=True, methods=["post"])
    def judgment(self, request, pk=None):
        """Submit the judgment of your assignment; safe to retry (same Idempotency-Key: 200)."""
        key = request.headers.get("Idempotency-Key", "").strip()
        if len(key) > 100 or not key.isprintable():
            raise ValidationError({"Idempotency-Key": "At most 100 printable characters."})
        form = s.JudgmentSubmitSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        data = form.validated_data
        judgment, created = services.judgment_submit_once(
            assignment_id=_int_or_404(pk), annotator=request.user, idempotency_key=key, chosen=data["chosen"],
            strength=data["strength"], safety=services.SafetyLabels(a_safe=data["a_safe"], b_safe=data["b_safe"]),
            harm_categories=data["harm_categories"], note=data["note"], seconds_spent=data["seconds_spent"],
            source=Judgment.Source.SIMULATED if is_simulated(request.user) else Judgment.Source.HUMAN,
        )
        return Response(s.judgment_payload(judgment), status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)

    @action(detail=True, methods=["post"])
    def skip(self, request, pk=None):
        assignment = self.get_object()
        services.assignment_skip(assignment=assignment, annotator=request.user)
        return Response(s.AssignmentSerializer(self.get_queryset().get(pk=assignment.pk)).data)


def _int_or_404(value) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise Http404("No such assignment.") from None
    if not 0 < number < 2**63:  # beyond any id; databases refuse such literals
        raise Http404("No such assignment.")
    return number


# --- judgments -------------------------------------------------------------------------------------

class JudgmentViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, ApiViewSet):
    """Judgments: researchers read all of them, annotators their own."""

    filterset_class = JudgmentFilter
    ordering_fields = ["id", "created_at"]
    permission_classes = [IsAnnotatorOrResearcher]

    def get_queryset(self):
        judgments = Judgment.objects.select_related(
            "comparison__batch", "comparison__response_a__checkpoint", "comparison__response_b__checkpoint")
        if getattr(self, "swagger_fake_view", False) or is_researcher(self.request.user):
            return judgments
        return judgments.filter(annotator=self.request.user)

    def get_serializer_class(self):
        if getattr(self, "swagger_fake_view", False) or is_researcher(self.request.user):
            return s.ResearchJudgmentSerializer
        return s.JudgmentSerializer


# --- batches ---------------------------------------------------------------------------------------------

@extend_schema_view(freeze=extend_schema(request=s.BatchFreezeSerializer, responses={200: s.BatchSerializer}))
class BatchViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, ApiViewSet):
    """Batches by label; admins freeze them (immutable, hashed, with a held-out test slice)."""

    serializer_class = s.BatchSerializer
    filterset_class = BatchFilter
    ordering_fields = ["id", "created_at"]
    permission_classes = [IsResearcher]
    permission_by_action = {"freeze": IsAdmin}
    lookup_field = "label"
    lookup_value_regex = r"[A-Za-z0-9_.\-]+"

    def get_queryset(self):
        # Two correlated counts, each evaluated once per listed batch (a join + GROUP BY here would
        # re-run the judgment count for every comparison row: quadratic in the batch size).
        comparisons = (Comparison.objects.filter(batch=OuterRef("pk")).order_by().values("batch")
                       .annotate(n=Count("id")).values("n"))
        judgments = (Judgment.objects.filter(comparison__batch=OuterRef("pk")).order_by()
                     .values("comparison__batch").annotate(n=Count("id")).values("n"))
        return Batch.objects.annotate(
            n_comparisons=Coalesce(Subquery(comparisons, output_field=IntegerField()), 0),
            n_judgments=Coalesce(Subquery(judgments, output_field=IntegerField()), 0),
        )

    @action(detail=True, methods=["post"])
    def freeze(self, request, label=None):
        batch = self.get_object()
        form = s.BatchFreezeSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        services.batch_freeze(batch=batch, test_size=form.validated_data["test_size"])
        return Response(s.BatchSerializer(self.get_queryset().get(pk=batch.pk)).data)


# --- export and snapshots ----------------------------------------------------------------------------


class JSONLinesRenderer(BaseRenderer):
    media_type = "application/jsonl"
    format = "jsonl"

    def render(self, data, accepted_media_type=None, renderer_context=None):
        return JSONRenderer().render(data)


class CSVRenderer(JSONLinesRenderer):
    media_type = "text/csv"
    format = "csv"


class GzipRenderer(JSONLinesRenderer):
    media_type = "application/gzip"
    format = "gz"


class FirstRenderer(BaseContentNegotiation):
    """Downloads pick their format from their own parameters; `format` here means the row format,
    not DRF's renderer override, and errors are JSON (see finalize_response)."""

    def select_parser(self, request, parsers):
        return parsers[0] if parsers else None

    def select_renderer(self, request, renderers, format_suffix=None):
        return renderers[0], renderers[0].media_type


class DownloadView(StrictQueryParamsMixin, APIView):
    content_negotiation_class = FirstRenderer
    permission_classes = [IsResearcher]

    def finalize_response(self, request, response, *args, **kwargs):
        if isinstance(response, Response):  # an error: JSON, whatever the download's format
            request.accepted_renderer, request.accepted_media_type = JSONRenderer(), "application/json"
        return super().finalize_response(request, response, *args, **kwargs)


def _filter_parameter(name: str, f) -> OpenApiParameter:
    """The OpenAPI description of one JudgmentFilter filter, typed as django-filter parses it."""
    kwargs = {"description": f.extra.get("help_text") or ""}
    if isinstance(f, django_filters.ChoiceFilter):
        kwargs["enum"] = [str(value) for value, _ in f.extra["choices"]]
    kind = (OpenApiTypes.BOOL if isinstance(f, django_filters.BooleanFilter)
            else OpenApiTypes.DATETIME if isinstance(f, django_filters.IsoDateTimeFilter) else OpenApiTypes.STR)
    return OpenApiParameter(name, kind, OpenApiParameter.QUERY, **kwargs)


EXPORT_PARAMETERS = [s.ExportParamsSerializer] + [_filter_parameter(n, f) for n, f in JudgmentFilter.base_filters.items()]


class ExportPreferencesView(DownloadView):
    """Preference pairs as JSONL (TRL / datasets) or CSV, streamed; see annotation/exports.py."""

    renderer_classes = [JSONLinesRenderer, CSVRenderer]
    extra_query_params = tuple(s.ExportParamsSerializer().fields) + tuple(JudgmentFilter.base_filters)

    @extend_schema(parameters=EXPORT_PARAMETERS, responses={(200, "application/jsonl"): OpenApiTypes.STR,
                                                             (200, "text/csv"): OpenApiTypes.STR})
    def get(self, request):
        params = s.ExportParamsSerializer(data=request.query_params)
        params.is_valid(raise_exception=True)
        options = params.options()
        filterset = JudgmentFilter(data=request.query_params, request=request,
                                   queryset=exports.exportable_judgments(source=request.query_params.get("source")))
        if not filterset.is_valid():
            raise ValidationError(filterset.errors)
        # The first row is read here, so that a database error is an error response, not a cut stream.
        rows = exports.export_rows(filterset.qs, options=options)
        first = next(rows, None)
        rows = itertools.chain([first] if first is not None else [], rows)
        if params.validated_data["export_format"] == "csv":
            fields = exports.AGGREGATE_FIELDS if options.aggregate == "majority" else exports.ROW_FIELDS
            response = StreamingHttpResponse(exports.stream_csv(rows, fields=fields),
                                             content_type="text/csv; charset=utf-8")
            response["Content-Disposition"] = 'attachment; filename="preferences.csv"'
        else:
            response = StreamingHttpResponse(exports.stream_jsonl(rows),
                                             content_type="application/jsonl; charset=utf-8")
            response["Content-Disposition"] = 'attachment; filename="preferences.jsonl"'
        return response


class SnapshotDownloadView(DownloadView):
    """The snapshot's jsonl.gz file, streamed."""

    renderer_classes = [GzipRenderer]

    @extend_schema(responses={(200, "application/gzip"): OpenApiTypes.BINARY})
    def get(self, request, sha256: str):
        snapshot = Snapshot.objects.filter(sha256=sha256).first()
        try:
            path = snapshots.snapshot_file(snapshot) if snapshot else None
        except FileNotFoundError:
            path = None
        if path is None:
            raise Http404("No such snapshot.")
        return FileResponse(path.open("rb"), content_type="application/gzip", as_attachment=True,
                            filename=f"{snapshot.sha256}.jsonl.gz")


@extend_schema_view(create=extend_schema(request=s.SnapshotCreateSerializer, responses={201: s.SnapshotSerializer}))
class SnapshotViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, ApiViewSet):
    """Snapshots of frozen batches: researchers list them, admins make them."""

    serializer_class = s.SnapshotSerializer
    permission_classes = [IsResearcher]
    permission_by_action = {"create": IsAdmin}
    ordering_fields = ["id", "created_at"]
    lookup_field = "sha256"
    lookup_value_regex = "[0-9a-f]{64}"
    queryset = Snapshot.objects.prefetch_related("batches")

    def create(self, request):
        form = s.SnapshotCreateSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        labels = form.validated_data["batches"]
        batches = list(Batch.objects.filter(label__in=labels))
        if missing := sorted(set(labels) - {b.label for b in batches}):
            raise ValidationError({"batches": f"No batch labelled {', '.join(missing)}."})
        snapshot = snapshots.snapshot_create(batches=batches)
        return Response(s.SnapshotSerializer(self.get_queryset().get(pk=snapshot.pk)).data,
                        status=status.HTTP_201_CREATED)
