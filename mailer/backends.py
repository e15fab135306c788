"""Email backends mailer ships: an outbox of .eml files for development and demos."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from django.conf import settings
from django.core.mail.backends.base import BaseEmailBackend


class OutboxBackend(BaseEmailBackend):
    """Writes each email to EMAIL_FILE_PATH as its own .eml file, openable in any client.

    Django's file backend appends every message of a connection to one .log file, which
    no mail client opens; one file per email is what a developer wants to look at.
    """

    def __init__(self, *, file_path: str | None = None, fail_silently: bool = False, **kwargs):
        super().__init__(fail_silently=fail_silently, **kwargs)
        self.directory = Path(file_path or settings.EMAIL_FILE_PATH)

    def send_messages(self, email_messages) -> int:
        self.directory.mkdir(parents=True, exist_ok=True)
        sent = 0
        for email in email_messages:
            if not email.recipients():
                continue
            data = email.message().as_bytes(linesep="\r\n")
            name = getattr(email, "message_id", "") or f"<{uuid.uuid4()}>"
            stem = name.strip("<>").split("@")[0]
            target = self.directory / f"{stem}.eml"
            partial = target.with_suffix(".part")
            partial.write_bytes(data)
            os.replace(partial, target)
            sent += 1
        return sent
