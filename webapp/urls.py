from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from annotation.import_views import staff_import
from webapp.auth import ThrottledLoginView

urlpatterns = [
    path("admin/", admin.site.urls),
    path("login/", ThrottledLoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("api/", include("annotation.api_urls")),
    path("staff/import/", staff_import, name="staff-import"),
    path("", include("annotation.urls")),
]
