from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from annotation.import_views import staff_import
from webapp import views as webapp_views
from webapp.auth import ThrottledLoginView

urlpatterns = [
    path("admin/", admin.site.urls),
    path("login/", ThrottledLoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("api/", include("annotation.api_urls")),
    path("staff/import/", staff_import, name="staff-import"),
    path("dashboard/", webapp_views.dashboard, name="dashboard"),
    path("jobs/", webapp_views.jobs, name="jobs"),
    path("jobs/status.json", webapp_views.jobs_status, name="jobs-status"),
    path("", include("annotation.urls")),
]
