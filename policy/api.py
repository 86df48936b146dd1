"""REST API of the policy side: checkpoints (researchers read, admins register) and RLHF rounds (researchers
read, admins launch and cancel). URLs: annotation/api_urls.py."""
from django_filters import rest_framework as filters
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import mixins, serializers, status
from rest_framework.decorators import action
from rest_framework.response import Response

from annotation.api.views import ApiViewSet
from annotation.models import Batch
from rewards.models import RewardModelRun
from webapp.permissions import IsAdmin, IsResearcher

from . import rounds, selectors, services
from .models import Checkpoint, RLHFRound


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


# --- RLHF rounds ------------------------------------------------------------------------------------

class RoundSerializer(serializers.ModelSerializer):
    policy_in = serializers.SlugRelatedField(slug_field="name", read_only=True)
    lineage_root = serializers.SlugRelatedField(slug_field="name", read_only=True)
    checkpoint_out = serializers.SlugRelatedField(slug_field="name", read_only=True, allow_null=True)
    stages = serializers.ListField(child=serializers.ChoiceField(choices=RLHFRound.Stage.choices), read_only=True)
    config = serializers.DictField(read_only=True)
    snapshot_hashes = serializers.ListField(child=serializers.CharField(), read_only=True)

    class Meta:
        model = RLHFRound
        fields = ["id", "status", "current_stage", "progress", "progress_message", "error", "policy_in", "lineage_root",
                  "helpfulness_rm", "safety_rm", "stages", "config", "snapshot_hashes", "checkpoint_out", "verdict",
                  "created_at", "started_at", "finished_at"]
        read_only_fields = fields


class RoundDetailSerializer(RoundSerializer):
    metrics = serializers.DictField(read_only=True, help_text="Per stage: rejection sampling (incl. max_vs_median, "
                                    "the paper's Figure 7), SFT, PPO (curve: reward, KL, entropy, clip fraction, "
                                    "value loss per iteration); evaluation: the new checkpoint against its parent on "
                                    "held-out prompts (oracle, helpfulness_rm, safety_rm: win_rate, wins, losses, "
                                    "ties, n, ci95; verdict, verdict_source)")
    evaluation_summary = serializers.SerializerMethodField(help_text="The evaluation in one sentence")
    human_evaluation = serializers.SerializerMethodField(
        help_text="People's win rate of the new checkpoint on the evaluation pairs sent to them (null before any)")

    class Meta(RoundSerializer.Meta):
        fields = [*RoundSerializer.Meta.fields, "evaluation_summary", "human_evaluation", "warnings", "metrics"]
        read_only_fields = fields

    warnings = serializers.SerializerMethodField(help_text="A regression, a PPO stage that kept its start, ...")

    def get_warnings(self, obj) -> list[str]:
        return rounds.round_warnings(obj)

    def get_evaluation_summary(self, obj) -> str:
        return rounds.evaluation_line((obj.metrics or {}).get("evaluation"))

    def get_human_evaluation(self, obj) -> dict | None:
        return selectors.round_human_win_rate(rnd=obj)


class RoundLaunchSerializer(serializers.Serializer):
    policy = serializers.SlugRelatedField(slug_field="name", queryset=Checkpoint.objects.all(),
                                          help_text="Name of the policy checkpoint to improve")
    helpfulness_rm = serializers.PrimaryKeyRelatedField(queryset=RewardModelRun.objects.all())
    safety_rm = serializers.PrimaryKeyRelatedField(queryset=RewardModelRun.objects.all())
    prompt_ids = serializers.ListField(child=serializers.IntegerField(min_value=1), required=False, default=list,
                                       max_length=rounds.MAX_PROMPTS)
    batches = serializers.ListField(child=serializers.CharField(max_length=100), required=False, default=list,
                                    help_text="Labels of batches whose comparisons' prompts join the set")
    tags = serializers.ListField(child=serializers.CharField(max_length=100), required=False, default=list,
                                 help_text="Prompts carrying all of these tags join the set")
    prompt_limit = serializers.IntegerField(min_value=1, required=False, allow_null=True, default=None,
                                            help_text="A seeded sample of this many of the prompts")
    stages = serializers.ListField(child=serializers.ChoiceField(choices=RLHFRound.Stage.choices), required=False,
                                   allow_null=True, default=None,
                                   help_text="In the order rejection_sampling, sft, gatt, ppo, context_distillation; "
                                             "default: the recipe's stages for the policy's size "
                                             "(rejection_sampling, sft under 1B parameters; + ppo from 1B)")
    config = serializers.DictField(required=False, default=dict,
                                   help_text="RoundConfig fields to override (policy/round_config.py); the rest take "
                                             "the recipe of the policy's size (policy/recipes.py); errors name the "
                                             "field as config.<section>.<name>")
    eval_tags = serializers.ListField(child=serializers.CharField(max_length=100), required=False, default=list,
                                      help_text="Evaluate on prompts carrying all of these tags (none of them may be "
                                                "a training prompt); default: a held-out share of the prompts")
    eval_prompt_ids = serializers.ListField(child=serializers.IntegerField(min_value=1), required=False, default=list,
                                            max_length=rounds.MAX_PROMPTS, help_text="Evaluation prompts by id")

    def validate_batches(self, labels):
        found = {b.label: b for b in Batch.objects.filter(label__in=labels)}
        if missing := [label for label in labels if label not in found]:
            raise serializers.ValidationError(f"Unknown batch(es): {', '.join(missing)}.")
        return list(found.values())


class RoundFilter(filters.FilterSet):
    status = filters.ChoiceFilter(choices=RLHFRound._meta.get_field("status").choices)
    policy = filters.CharFilter(field_name="policy_in__name")

    class Meta:
        model = RLHFRound
        fields: list[str] = []


@extend_schema_view(
    create=extend_schema(request=RoundLaunchSerializer, responses={201: RoundDetailSerializer}),
    cancel=extend_schema(request=None, responses={200: RoundDetailSerializer}),
    retrieve=extend_schema(responses={200: RoundDetailSerializer}),
)
class RoundViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, ApiViewSet):
    """RLHF rounds: researchers read (the list without metrics); admins launch and cancel."""

    serializer_class = RoundSerializer
    filterset_class = RoundFilter
    ordering_fields = ["id", "created_at"]
    permission_classes = [IsResearcher]
    permission_by_action = {"create": IsAdmin, "cancel": IsAdmin}
    queryset = RLHFRound.objects.select_related("policy_in", "lineage_root", "checkpoint_out")

    def get_serializer_class(self):
        return RoundSerializer if self.action == "list" else RoundDetailSerializer

    def create(self, request):
        """Launch a round; 400 names the field (config values as config.<section>.<name>)."""
        form = RoundLaunchSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        data = form.validated_data
        prompts = rounds.prompts_for_round(ids=data["prompt_ids"], batches=data["batches"], tags=data["tags"],
                                           limit=data["prompt_limit"])
        eval_prompts = (rounds.prompts_for_round(ids=data["eval_prompt_ids"], tags=data["eval_tags"])
                        if data["eval_prompt_ids"] or data["eval_tags"] else None)
        rnd = rounds.round_launch(policy=data["policy"], helpfulness_rm=data["helpfulness_rm"],
                                  safety_rm=data["safety_rm"], prompts=prompts, stages=data["stages"],
                                  config=data["config"], eval_prompts=eval_prompts, created_by=request.user)
        return Response(RoundDetailSerializer(self.get_queryset().get(pk=rnd.pk)).data, status=status.HTTP_201_CREATED)

    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        """Cancel a queued or running round; the worker stops at its next step."""
        rnd = rounds.round_cancel(rnd=self.get_object())
        return Response(RoundDetailSerializer(self.get_queryset().get(pk=rnd.pk)).data)
