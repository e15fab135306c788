"""Email backends mailer ships: a faster SMTP backend, Postmark with batch calls, and an
outbox of .eml files.

Hosts may name any of them in EMAIL_BACKEND; ``transport`` also upgrades Django's own SMTP
backend to ``SMTPBackend`` and anymail's Postmark backend to ``PostmarkBackend`` (same
settings, same behaviour, less CPU and fewer round trips per email).
"""

from __future__ import annotations

import os
import re
import smtplib
import uuid
from pathlib import Path

import requests
from anymail.backends.postmark import EmailBackend as AnymailPostmarkBackend
from anymail.exceptions import AnymailError, AnymailRequestsAPIError
from anymail.message import AnymailStatus
from django.conf import settings
from django.core.mail.backends.base import BaseEmailBackend
from django.core.mail.backends.smtp import EmailBackend as DjangoSMTPBackend
from django.core.mail.message import sanitize_address

from . import dkimsign
from .exceptions import MailerConfigurationError, PermanentSendError, ServiceUnavailable
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


class PostmarkBackend(AnymailPostmarkBackend):
    """anymail's Postmark backend, plus Postmark's batch endpoint for mailer's workers.

    ``/email/batch`` takes up to 500 complete messages in one call, each with its own
    recipient, content, headers and metadata: a campaign's personal emails (their own
    unsubscribe links and tracking) travel together, and one round trip and one HTTP
    request's CPU serve them all. Each message is built by anymail exactly as a single
    send would build it, and each gets its own outcome.
    """

    #: Postmark's limits for one batch call: 500 messages and 50 MB.
    batch_limit = 500
    batch_bytes = 45 * 1024 * 1024

    #: Per-message error codes that are about the account or the sender, not the email:
    #: a bad token, an unknown or unconfirmed sender signature, no credits, pending
    #: approval. Mail waits for ops instead of failing.
    ACCOUNT_ERRORS = frozenset({10, 400, 401, 405, 412})

    def send_batch(self, emails: list) -> list[Exception | None]:
        """Send the emails in as few calls as the limits allow; by position, None for an
        email Postmark accepted (its ``anymail_status`` set) or the error for that email.

        A failed call (unreachable, 429, 5xx, refused credentials) is every one of its
        emails' error, and nothing after it is sent, as each would wait anyway.
        """
        outcomes: list[Exception | None] = [None] * len(emails)
        ready: list[tuple[int, object, bytes]] = []
        alone: list[int] = []
        for index, email in enumerate(emails):
            email.anymail_status = AnymailStatus()
            try:
                if not self.run_pre_send(email):
                    outcomes[index] = PermanentSendError("A pre_send receiver cancelled it.")
                    continue
                payload = self.build_message_payload(email, self.send_defaults)
                if (
                    payload.get_api_endpoint() != "email"
                    or payload.server_token != self.server_token
                ):
                    alone.append(index)  # templates, merge data, another server: one call
                    continue
                ready.append((index, payload, payload.serialize_json(payload.data).encode()))
            except AnymailError as exc:
                outcomes[index] = exc
        groups = list(self._groups(ready))
        for number, group in enumerate(groups):
            failed = self._post_group(group, emails, outcomes)
            if failed is not None:  # the service is down or asks us to slow down
                unsent = [index for later in groups[number:] for index, _, _ in later]
                for index in unsent + alone:
                    outcomes[index] = failed
                return outcomes
        for index in alone:
            outcomes[index] = self._send_alone(emails[index])
        return outcomes

    def _groups(self, ready):
        group, size = [], 2
        for item in ready:
            if group and (len(group) >= self.batch_limit or size + len(item[2]) > self.batch_bytes):
                yield group
                group, size = [], 2
            group.append(item)
            size += len(item[2]) + 1
        if group:
            yield group

    def _post_group(self, group, emails, outcomes) -> Exception | None:
        """One batch call; each email's outcome in ``outcomes``. Returns the call's error
        when the whole call failed in a way that concerns every email."""
        first = group[0][1]
        body = b"[" + b",".join(data for _, _, data in group) + b"]"
        try:
            response = self.session.request(
                "POST",
                f"{self.api_url}email/batch",
                data=body,
                headers={**first.headers, "X-Postmark-Server-Token": self.server_token},
                timeout=self.timeout,
            )
        except requests.RequestException as exc:
            return ServiceUnavailable(f"ESP connection: {exc.__class__.__name__}")
        if response.status_code in (400, 422):
            # The call as a whole refused (a request too large, one message Postmark
            # cannot parse): each email alone, so one bad email fails only itself.
            for index, _, _ in group:
                outcomes[index] = self._send_alone(emails[index])
            return None
        if not 200 <= response.status_code < 300:
            return AnymailRequestsAPIError(
                email_message=emails[group[0][0]], payload=first, response=response, backend=self
            )
        try:
            answers = response.json()
        except ValueError:
            answers = None
        if not isinstance(answers, list) or len(answers) != len(group):
            error = PermanentSendError("Postmark answered the batch with an unreadable response.")
            for index, _, _ in group:
                outcomes[index] = error
            return None
        for (index, payload, _), answer in zip(group, answers, strict=True):
            outcomes[index] = self._outcome(emails[index], payload, answer, response)
        return None

    def _outcome(self, email, payload, answer, response) -> Exception | None:
        code = answer.get("ErrorCode", 0) if isinstance(answer, dict) else None
        if code in self.ACCOUNT_ERRORS:
            return ServiceUnavailable(f"Postmark refused the account or sender: {code}")
        try:
            status = self.parse_recipient_status(_Answer(answer, response), payload, email)
            email.anymail_status.esp_response = response
            email.anymail_status.set_recipient_status(status)
            self.run_post_send(email)
            self.raise_for_recipient_status(email.anymail_status, response, payload, email)
        except AnymailError as exc:
            return exc
        return None

    def _send_alone(self, email) -> Exception | None:
        try:
            return None if self._send(email) else PermanentSendError("Not sent.")
        except AnymailError as exc:
            return exc


class _Answer:
    """One message's entry of a batch response, as anymail reads a response."""

    def __init__(self, answer, response: requests.Response):
        self._answer, self.status_code = answer, response.status_code
        self.reason, self.headers = response.reason, response.headers

    def json(self):
        return self._answer

    @property
    def text(self) -> str:
        return repr(self._answer)
