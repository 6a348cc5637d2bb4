"""HTTP routes: the push API, health, the admin."""

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("", include("notifications.urls")),
    path("admin/", admin.site.urls),
]
