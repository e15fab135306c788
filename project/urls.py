"""URLs of the demo host: admin, accounts pages wired to mailer, mailer's own pages."""

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from mailer.forms import PasswordResetForm

from . import views

urlpatterns = [
    path("", views.home, name="home"),
    path("register/", views.register, name="register"),
    path(
        "accounts/password_reset/",
        auth_views.PasswordResetView.as_view(form_class=PasswordResetForm),
        name="password_reset",
    ),
    path("accounts/", include("django.contrib.auth.urls")),
    path("mailer/", include("mailer.urls")),
    # /anymail/<esp>/tracking/: anymail's webhooks, guarded by mailer
    path("anymail/", include("mailer.webhooks")),
    path("admin/", admin.site.urls),
    # mailer's HTTP API, health checks and metrics
    path("api/v1/", include("mailer.http_api.urls")),
    path("", include("mailer.http_api.ops_urls")),
]
