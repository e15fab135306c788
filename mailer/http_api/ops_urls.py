"""Probes and metrics: ``path("", include("mailer.http_api.ops_urls"))``."""

from django.urls import path

from . import ops

urlpatterns = [
    path("health/live", ops.live, name="mailer-health-live"),
    path("health/ready", ops.ready, name="mailer-health-ready"),
    path("metrics", ops.metrics_view, name="mailer-metrics"),
]
