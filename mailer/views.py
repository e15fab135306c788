"""Public pages mailer serves to recipients: verification, unsubscribe, preferences,
and the open pixel and click redirects of its own tracking."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest, HttpResponseRedirect
from django.shortcuts import render
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_http_methods

from . import tracking, unsubscribe
from .accounts import InvalidVerificationLink, read_verification_token, verify_email
from .models import Event


@csrf_exempt  # the token is the credential; a link opened in another browser has no cookie
@never_cache
@require_http_methods(["GET", "POST"])
def verify_email_view(request: HttpRequest, token: str) -> HttpResponse:
    """GET asks for confirmation and changes nothing: link scanners follow every URL, and
    would otherwise verify addresses nobody confirmed. The button POSTs."""
    try:
        if request.method == "POST":
            contact = verify_email(token)
        else:
            contact = read_verification_token(token)
    except InvalidVerificationLink as exc:
        return render(request, "mailer/pages/verify_failed.html", {"reason": str(exc)}, status=400)
    if request.method == "POST":
        return render(request, "mailer/pages/verified.html", {"contact": contact})
    return render(request, "mailer/pages/verify_confirm.html", {"contact": contact, "token": token})


@csrf_exempt  # RFC 8058: mail clients POST with no cookie and no CSRF token
@never_cache
@require_http_methods(["GET", "POST"])
def unsubscribe_view(request: HttpRequest, token: str) -> HttpResponse:
    """GET asks for confirmation and changes nothing (scanners follow every link);
    POST — the one-click from the mail client, or the confirmation button — unsubscribes."""
    try:
        target = unsubscribe.read_token(token)
    except unsubscribe.InvalidUnsubscribeToken as exc:
        return render(request, "mailer/pages/link_invalid.html", {"reason": str(exc)}, status=400)
    if request.method == "POST":
        one_click = request.POST.get("List-Unsubscribe") == "One-Click"
        unsubscribe.unsubscribe(target, source="one-click" if one_click else "unsubscribe page")
        return render(
            request, "mailer/pages/unsubscribed.html", {"email": target.email, "token": token}
        )
    return render(
        request, "mailer/pages/unsubscribe_confirm.html", {"email": target.email, "token": token}
    )


@csrf_exempt  # the signed token is the credential; there is no session to forge
@never_cache
@require_http_methods(["GET", "POST"])
def preferences_view(request: HttpRequest, token: str) -> HttpResponse:
    try:
        target = unsubscribe.read_token(token)
    except unsubscribe.InvalidUnsubscribeToken as exc:
        return render(request, "mailer/pages/link_invalid.html", {"reason": str(exc)}, status=400)
    notice = ""
    if request.method == "POST":
        action = request.POST.get("action")
        if action == "unsubscribe":
            unsubscribe.unsubscribe(target, source="preference page")
            notice = "You will receive no more marketing email."
        elif action == "subscribe":
            unsubscribe.subscribe(
                target, source=f"preference page, {request.META.get('REMOTE_ADDR', '')}"
            )
            notice = "You are subscribed again. Thank you!"
        else:
            return HttpResponseBadRequest("Unknown action.")
    context = {
        "email": target.email,
        "token": token,
        "subscribed": unsubscribe.is_subscribed(target.email),
        "notice": notice,
    }
    return render(request, "mailer/pages/preferences.html", context)


@never_cache
@require_http_methods(["GET", "HEAD"])
def click_view(request: HttpRequest, token: str) -> HttpResponse:
    """Redirect only to the URL recorded at send time; a bad token gets 400, no redirect."""
    try:
        hit = tracking.resolve_click(token)
    except tracking.TrackingError:
        return HttpResponseBadRequest("This link is not valid.")
    tracking.record_own(
        hit,
        event_type=Event.Type.CLICKED,
        method=request.method,
        user_agent=request.headers.get("User-Agent", ""),
    )
    return HttpResponseRedirect(hit.link.url)


@never_cache
@require_http_methods(["GET", "HEAD"])
def open_view(request: HttpRequest, token: str) -> HttpResponse:
    try:
        hit = tracking.resolve_open(token)
    except tracking.TrackingError:
        return HttpResponseBadRequest("Not a valid pixel.")
    tracking.record_own(
        hit,
        event_type=Event.Type.OPENED,
        method=request.method,
        user_agent=request.headers.get("User-Agent", ""),
    )
    return HttpResponse(tracking.PIXEL, content_type="image/gif")
