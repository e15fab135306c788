"""Emails to the site's ADMINS when operators must look: marketing paused by the
reputation guard, failed messages piling up. Each alert at most once per ALERT_INTERVAL,
across every process (a row in the database holds the quiet period)."""

from __future__ import annotations

import logging
from datetime import timedelta

from django.core.mail import mail_admins
from django.db import IntegrityError, transaction
from django.utils import timezone

from . import conf
from .models import Message, MessageStatus, QuotaCounter

logger = logging.getLogger(__name__)


def alert(name: str, subject: str, text: str) -> bool:
    """Email ADMINS unless this alert went out less than ALERT_INTERVAL ago."""
    now = timezone.now()
    until = now + timedelta(seconds=float(conf.get("ALERT_INTERVAL")))
    key = f"mailer:alert:{name}"
    try:
        with transaction.atomic():
            row, created = QuotaCounter.objects.select_for_update().get_or_create(
                key=key, defaults={"expires_at": until}
            )
            if not created:
                if row.expires_at > now:
                    return False
                QuotaCounter.objects.filter(pk=row.pk).update(expires_at=until)
    except IntegrityError:
        return False  # another process is sending this alert right now
    logger.error("mailer: alert %s: %s", name, subject)
    mail_admins(f"mailer: {subject}", text, fail_silently=True)
    return True


def reputation_paused(reasons: list[str]) -> bool:
    """The reputation guard paused marketing (all of it, or some campaigns)."""
    text = "The reputation guard paused marketing mail:\n\n" + "\n".join(
        f"- {reason}" for reason in reasons
    )
    text += "\n\nTransactional mail keeps flowing. Lift the pause in the admin once fixed."
    return alert("reputation", "marketing paused by the reputation guard", text)


def check_failed() -> int:
    """Alert when FAILED_ALERT_THRESHOLD messages failed within FAILED_ALERT_WINDOW;
    returns how many failed in the window."""
    threshold = conf.get("FAILED_ALERT_THRESHOLD")
    if not threshold:
        return 0
    since = timezone.now() - timedelta(seconds=float(conf.get("FAILED_ALERT_WINDOW")))
    failed = Message.objects.filter(status=MessageStatus.FAILED, updated_at__gte=since).count()
    if failed >= int(threshold):
        alert(
            "failed",
            f"{failed} messages failed",
            f"{failed} messages failed in the last {conf.get('FAILED_ALERT_WINDOW')} s "
            f"(threshold {threshold}). See Messages filtered by status 'failed' in the admin.",
        )
    return failed
