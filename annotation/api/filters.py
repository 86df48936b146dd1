"""Query parameters of the API: explicit allowlists of filters and orderings; anything else is a 400."""
import datetime

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import Q
from django_filters import rest_framework as filters
from django_filters.fields import IsoDateTimeField
from rest_framework.exceptions import ValidationError
from rest_framework.filters import OrderingFilter
from rest_framework.pagination import CursorPagination

from ..exports import annotator_pseudonym
from ..models import Assignment, Batch, Comparison, ComparisonOrigin, Judgment, JudgmentSource, SafetyBin

class Pagination(CursorPagination):
    page_size_query_param = "page_size"
    max_page_size = 1000
    ordering = "-id"


class StrictOrderingFilter(OrderingFilter):
    """OrderingFilter that refuses (400) a field outside the view's ordering_fields instead of
    silently ignoring it."""

    def remove_invalid_fields(self, queryset, fields, view, request):
        valid = {name for name, _ in self.get_valid_fields(queryset, view, {"request": request})}
        invalid = [f for f in fields if f.lstrip("-") not in valid]
        if invalid:
            raise ValidationError({self.ordering_param: f"Cannot order by {', '.join(invalid)}; "
                                                        f"allowed: {', '.join(sorted(valid))}."})
        return fields


class StrictQueryParamsMixin:
    """Any query parameter that is not a declared filter, ordering, cursor or page size is a 400."""

    extra_query_params: tuple[str, ...] = ()

    def allowed_query_params(self) -> set[str]:
        allowed = set(self.extra_query_params)
        if getattr(self, "action", None) == "list" or not hasattr(self, "action"):
            filterset = getattr(self, "filterset_class", None)
            allowed |= set(filterset.base_filters) if filterset else set()
            if getattr(self, "ordering_fields", None):
                allowed.add("ordering")
            if getattr(self, "pagination_class", None):
                allowed |= {"cursor", "page_size"}
        return allowed

    def initial(self, request, *args, **kwargs):
        super().initial(request, *args, **kwargs)
        unknown = sorted(set(request.query_params) - self.allowed_query_params())
        if unknown:
            raise ValidationError({p: "Unknown query parameter." for p in unknown})


class CharInFilter(filters.BaseInFilter, filters.CharFilter):
    pass


class UtcDateTimeField(IsoDateTimeField):
    """ISO 8601, converted to UTC: PostgreSQL refuses offsets beyond +-15:59 that Python accepts."""

    def to_python(self, value):
        value = super().to_python(value)
        if value is None:
            return None
        try:
            return value.astimezone(datetime.UTC)
        except OverflowError:
            raise DjangoValidationError("Date out of range.") from None


class UtcDateTimeFilter(filters.IsoDateTimeFilter):
    field_class = UtcDateTimeField


def user_ids_for_pseudonym(pseudonym: str) -> list[int]:
    """Pseudonyms are one-way; the users are few, so each one's pseudonym is computed to match."""
    ids = get_user_model().objects.filter(judgments__isnull=False).values_list("id", flat=True).distinct()
    return [uid for uid in ids if annotator_pseudonym(uid) == pseudonym]


class JudgmentFilter(filters.FilterSet):
    batch = CharInFilter(field_name="comparison__batch__label", lookup_expr="in",
                         help_text="Batch label(s), comma-separated")
    strength = filters.ChoiceFilter(choices=Judgment.Strength.choices)
    safety_bin = filters.ChoiceFilter(choices=SafetyBin.choices)
    source = filters.ChoiceFilter(choices=JudgmentSource.choices)
    origin = filters.ChoiceFilter(field_name="comparison__origin", choices=ComparisonOrigin.choices)
    split = filters.ChoiceFilter(choices=[("train", "train"), ("test", "test")], method="filter_split")
    checkpoint = filters.CharFilter(method="filter_checkpoint", help_text="Either response's checkpoint name")
    annotator = filters.CharFilter(method="filter_annotator", help_text="The annotator's pseudonym")
    is_adversarial = filters.BooleanFilter(field_name="comparison__prompt__is_adversarial")
    created_after = UtcDateTimeFilter(field_name="created_at", lookup_expr="gte")
    created_before = UtcDateTimeFilter(field_name="created_at", lookup_expr="lt")

    class Meta:
        model = Judgment
        fields: list[str] = []  # only the filters declared above

    def filter_split(self, queryset, name, value):
        return queryset.filter(comparison__is_test=value == "test")

    def filter_checkpoint(self, queryset, name, value):
        return queryset.filter(Q(comparison__response_a__checkpoint__name=value)
                               | Q(comparison__response_b__checkpoint__name=value))

    def filter_annotator(self, queryset, name, value):
        return queryset.filter(annotator_id__in=user_ids_for_pseudonym(value))


class BatchFilter(filters.FilterSet):
    status = filters.ChoiceFilter(choices=Batch.Status.choices)
    kind = filters.ChoiceFilter(choices=Batch.Kind.choices)

    class Meta:
        model = Batch
        fields: list[str] = []


class ComparisonFilter(filters.FilterSet):
    batch = CharInFilter(field_name="batch__label", lookup_expr="in")
    origin = filters.ChoiceFilter(choices=ComparisonOrigin.choices)
    judged = filters.BooleanFilter(field_name="batch", lookup_expr="isnull", exclude=True)

    class Meta:
        model = Comparison
        fields: list[str] = []


class AssignmentFilter(filters.FilterSet):
    status = filters.ChoiceFilter(choices=Assignment.Status.choices)

    class Meta:
        model = Assignment
        fields: list[str] = []


FILTER_BACKENDS = [filters.DjangoFilterBackend, StrictOrderingFilter]
