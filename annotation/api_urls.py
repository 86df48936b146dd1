"""/api/ (included by webapp/urls.py): the v1 endpoints, the OpenAPI schema and its browsable docs."""
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView
from rest_framework.routers import SimpleRouter

from policy.api import CheckpointViewSet, RoundViewSet
from rewards.api import RewardModelRunViewSet

from .api import views

router = SimpleRouter(trailing_slash=False)
router.register("comparisons", views.ComparisonViewSet, basename="comparison")
router.register("assignments", views.AssignmentViewSet, basename="assignment")
router.register("judgments", views.JudgmentViewSet, basename="judgment")
router.register("batches", views.BatchViewSet, basename="batch")
router.register("snapshots", views.SnapshotViewSet, basename="snapshot")
router.register("checkpoints", CheckpointViewSet, basename="checkpoint")
router.register("rounds", RoundViewSet, basename="round")
router.register("reward-runs", RewardModelRunViewSet, basename="reward-run")

app_name = "api"
urlpatterns = [
    path("v1/export/preferences", views.ExportPreferencesView.as_view(), name="export-preferences"),
    re_path(r"^v1/export/snapshots/(?P<sha256>[0-9a-f]{64})$", views.SnapshotDownloadView.as_view(),
            name="snapshot-download"),
    path("v1/", include(router.urls)),
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="api:schema"), name="docs"),
    path("redoc/", SpectacularRedocView.as_view(url_name="api:schema"), name="redoc"),
]
