"""Public pages mailer serves to recipients: email verification."""

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from .accounts import InvalidVerificationLink, verify_email


def verify_email_view(request: HttpRequest, token: str) -> HttpResponse:
    try:
        contact = verify_email(token)
    except InvalidVerificationLink as exc:
        return render(request, "mailer/pages/verify_failed.html", {"reason": str(exc)}, status=400)
    return render(request, "mailer/pages/verified.html", {"contact": contact})
