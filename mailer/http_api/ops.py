"""Health and metrics endpoints for operators (plain Django views, no API key)."""

from __future__ import annotations

import hmac
import ipaddress

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.http import require_GET

from .. import conf, health, metrics


@require_GET
def live(request: HttpRequest) -> JsonResponse:
    """The process answers: nothing else is checked (a liveness probe)."""
    return JsonResponse({"status": "ok"})


@require_GET
def ready(request: HttpRequest) -> JsonResponse:
    """Database, broker and Redis reachable: 200, else 503; workers and beat reported."""
    ok, body = health.ready()
    return JsonResponse(body, status=200 if ok else 503)


@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    """Prometheus metrics, for a bearer METRICS_TOKEN or an address in METRICS_ALLOWED_IPS."""
    if not allowed(request):
        return HttpResponse("Forbidden\n", status=403, content_type="text/plain")
    return HttpResponse(metrics.render(), content_type="text/plain; version=0.0.4; charset=utf-8")


def allowed(request: HttpRequest) -> bool:
    token = conf.get("METRICS_TOKEN")
    header = request.headers.get("Authorization", "")
    if token and hmac.compare_digest(header.encode(), f"Bearer {token}".encode()):
        return True
    try:
        address = ipaddress.ip_address(request.META.get("REMOTE_ADDR", ""))
    except ValueError:
        return False
    for network in conf.get("METRICS_ALLOWED_IPS") or ():
        try:
            if address in ipaddress.ip_network(network, strict=False):
                return True
        except ValueError:
            continue
    return False
