"""REST API of the policy side: checkpoints (researchers read, admins register). URLs: annotation/api_urls.py."""
from django_filters import rest_framework as filters
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import mixins, serializers, status
from rest_framework.response import Response

from annotation.api.views import ApiViewSet
from webapp.permissions import IsAdmin, IsResearcher

from . import services
from .models import Checkpoint


class CheckpointSerializer(serializers.ModelSerializer):
    parent = serializers.SlugRelatedField(slug_field="name", read_only=True, allow_null=True)

    class Meta:
        model = Checkpoint
        fields = ["id", "name", "format", "path", "tokenizer_path", "tokenizer_sha256", "params", "sha256", "parent",
                  "created_at"]
        read_only_fields = fields


class CheckpointRegisterSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=services.MAX_NAME_LENGTH)
    format = serializers.ChoiceField(choices=[Checkpoint.Format.META, Checkpoint.Format.HF])
    path = serializers.CharField(max_length=1000,
                                 help_text="Directory inside TANDEM_MODEL_ROOTS (or relative to the first root)")
    tokenizer_path = serializers.CharField(max_length=1000, required=False, allow_blank=True, default="",
                                           help_text="Default: tokenizer.model beside the weights or one level up")
    parent = serializers.SlugRelatedField(slug_field="name", queryset=Checkpoint.objects.all(), required=False,
                                          allow_null=True, default=None)


class CheckpointFilter(filters.FilterSet):
    format = filters.ChoiceFilter(choices=Checkpoint.Format.choices)
    name = filters.CharFilter()

    class Meta:
        model = Checkpoint
        fields: list[str] = []


@extend_schema_view(create=extend_schema(request=CheckpointRegisterSerializer, responses={201: CheckpointSerializer}))
class CheckpointViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, ApiViewSet):
    serializer_class = CheckpointSerializer
    filterset_class = CheckpointFilter
    ordering_fields = ["id", "created_at"]
    permission_classes = [IsResearcher]
    permission_by_action = {"create": IsAdmin}
    queryset = Checkpoint.objects.select_related("parent")

    def create(self, request):
        """Register a Meta or HF checkpoint on disk: path checked, params read, files hashed."""
        form = CheckpointRegisterSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        checkpoint = services.checkpoint_register(**form.validated_data)
        return Response(CheckpointSerializer(checkpoint).data, status=status.HTTP_201_CREATED)
