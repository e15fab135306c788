"""Email backends mailer ships: a faster SMTP backend, and an outbox of .eml files.

Hosts may name either in EMAIL_BACKEND; ``transport`` also upgrades Django's own SMTP
backend to ``SMTPBackend`` (same settings, same behaviour, less CPU per email).
"""

from __future__ import annotations

import os
import re
import smtplib
import uuid
from pathlib import Path

from django.conf import settings
from django.core.mail.backends.base import BaseEmailBackend
from django.core.mail.backends.smtp import EmailBackend as DjangoSMTPBackend
from django.core.mail.message import sanitize_address

from . import dkimsign
from .exceptions import MailerConfigurationError, ServiceUnavailable
from .mime import PLAIN_ADDRESS, PreparedEmail, envelope_sender


class _PlainAddresses:
    """smtplib's MAIL FROM and RCPT TO parse each address again (``quoteaddr``, about
    0.1 ms a call); a plain ASCII addr-spec needs only its angle brackets."""

    def mail(self, sender, options=()):
        if options or not PLAIN_ADDRESS.match(sender):
            return super().mail(sender, options)
        self.putcmd("mail", f"FROM:<{sender}>")
        return self.getreply()

    def rcpt(self, recip, options=()):
        if options or not PLAIN_ADDRESS.match(recip):
            return super().rcpt(recip, options)
        self.putcmd("rcpt", f"TO:<{recip}>")
        return self.getreply()


class _Pipelining:
    """MAIL, RCPT and DATA in one write where the server offers PIPELINING (RFC 2920):
    two round trips an email instead of four, which halves the time a connection waits
    on a relay that is a network hop away. Anything unusual goes smtplib's own way."""

    def sendmail(self, from_addr, to_addrs, msg, mail_options=(), rcpt_options=()):
        self.ehlo_or_helo_if_needed()
        if isinstance(to_addrs, str):
            to_addrs = [to_addrs]
        plain = all(PLAIN_ADDRESS.match(address) for address in [from_addr, *to_addrs])
        if (
            not self.has_extn("pipelining")
            or mail_options
            or rcpt_options
            or not plain
            or not isinstance(msg, bytes)
        ):
            return super().sendmail(from_addr, to_addrs, msg, mail_options, rcpt_options)
        size = f" SIZE={len(msg)}" if self.has_extn("size") else ""
        commands = [f"MAIL FROM:<{from_addr}>{size}\r\n"]
        commands += [f"RCPT TO:<{address}>\r\n" for address in to_addrs]
        commands.append("DATA\r\n")
        self.send("".join(commands).encode("ascii"))
        mail_code, mail_reply = self.getreply()
        refused, replies = {}, [self.getreply() for _ in to_addrs]
        data_code, data_reply = self.getreply()
        for address, (code, reply) in zip(to_addrs, replies, strict=True):
            if code not in (250, 251):
                refused[address] = (code, reply)
        if mail_code != 250:
            self._give_up(mail_code, data_code)
            raise smtplib.SMTPSenderRefused(mail_code, mail_reply, from_addr)
        closing = any(code == 421 for code, _ in refused.values())
        if closing or len(refused) == len(to_addrs):
            self._give_up(421 if closing else 0, data_code)
            raise smtplib.SMTPRecipientsRefused(refused)
        if data_code != 354:
            self._give_up(data_code, data_code)
            raise smtplib.SMTPDataError(data_code, data_reply)
        data = _DOT_LINE.sub(b"..", msg)
        if not data.endswith(b"\r\n"):
            data += b"\r\n"
        self.send(data + b".\r\n")
        code, reply = self.getreply()
        if code != 250:
            if code == 421:
                self.close()
            else:
                self._rset()
            raise smtplib.SMTPDataError(code, reply)
        return refused

    def _give_up(self, code: int, data_code: int) -> None:
        """After a refusal: close on 421, else end an accepted DATA empty and reset."""
        if code == 421:
            self.close()
            return
        if data_code == 354:  # the server took DATA although nothing may be sent
            self.send(b".\r\n")
            self.getreply()
        self._rset()


_DOT_LINE = re.compile(rb"(?m)^\.")


class _SMTP(_Pipelining, _PlainAddresses, smtplib.SMTP):
    pass


class _SMTPSSL(_Pipelining, _PlainAddresses, smtplib.SMTP_SSL):
    pass


class SMTPBackend(DjangoSMTPBackend):
    """Django's SMTP backend, sending a ``PreparedEmail``'s ready bytes as they are, and
    signing what it sends with DKIM when ``MAILER['DKIM_DOMAIN']`` is set.

    Django's ``_send`` parses the sender and every recipient again for each email (about
    0.25 ms); a PreparedEmail already has its bytes and bare addresses. Anything else gets
    the envelope Django's ``_send`` would compute, so both paths sign the same way.
    """

    @property
    def connection_class(self):
        return _SMTPSSL if self.use_ssl else _SMTP

    def _send(self, email_message) -> bool:
        encoding = email_message.encoding or settings.DEFAULT_CHARSET
        if isinstance(email_message, PreparedEmail) and not (email_message.cc or email_message.bcc):
            sender = envelope_sender(email_message.from_email, encoding)
            recipients = email_message.envelope_recipients(encoding)
        elif not email_message.recipients():
            return False
        else:
            sender = sanitize_address(email_message.from_email, encoding)
            recipients = [sanitize_address(a, encoding) for a in email_message.recipients()]
        data = email_message.message().as_bytes(linesep="\r\n")
        try:
            data = dkimsign.sign(data)
        except MailerConfigurationError as exc:
            # Unsigned mail from a domain that publishes DKIM fails DMARC: it waits, like
            # mail behind refused SMTP credentials, until ops fix the key.
            raise ServiceUnavailable(f"DKIM: {exc}") from exc
        try:
            self.connection.sendmail(sender, recipients, data)
        except smtplib.SMTPException:
            if not self.fail_silently:
                raise
            return False
        return True


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
