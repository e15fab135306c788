"""Print the DNS TXT record that publishes the DKIM public key; optionally make a new key."""

from __future__ import annotations

import os
import shutil
import subprocess

from django.core.management.base import BaseCommand, CommandError

from mailer import conf, dkimsign
from mailer.exceptions import MailerConfigurationError

KEY_BITS = 2048


def generate_key(path: str) -> bytes:
    """Write a new RSA private key (PEM) to ``path``, readable by its owner only.

    dkimpy has no key generator of its own beyond a wrapper around the ``openssl``
    command (``dkim.dknewkey``), and ``cryptography`` is not a dependency: this runs
    openssl too, but writes the file itself so it is never readable by others, not even
    for a moment, and never replaces a key that may be in use.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        raise CommandError("--generate needs the openssl command; install OpenSSL.")
    result = subprocess.run(
        [openssl, "genpkey", "-algorithm", "RSA", "-pkeyopt", f"rsa_keygen_bits:{KEY_BITS}"],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        raise CommandError(
            f"openssl could not generate a key: {result.stderr.decode(errors='replace')}"
        )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise CommandError(f"{path} exists: a key in use is never overwritten.") from None
    except OSError as exc:
        raise CommandError(f"{path} cannot be written: {exc.strerror}.") from None
    with os.fdopen(fd, "wb") as file:
        os.fchmod(file.fileno(), 0o600)
        file.write(result.stdout)
    return result.stdout


class Command(BaseCommand):
    help = (
        "Print the DNS TXT record (<selector>._domainkey.<domain>) that publishes the public "
        "half of MAILER['DKIM_PRIVATE_KEY'] or MAILER['DKIM_PRIVATE_KEY_FILE']."
    )
    # It is how a key gets set up: the checks it would run first fail until that is done.
    requires_system_checks = []

    def add_arguments(self, parser):
        parser.add_argument(
            "--generate",
            metavar="PATH",
            help=f"First write a new {KEY_BITS}-bit RSA private key (PEM, mode 0600) to PATH "
            "and print the record for it. An existing file is never overwritten.",
        )
        parser.add_argument("--selector", help="Default: MAILER['DKIM_SELECTOR'].")
        parser.add_argument("--domain", help="Default: MAILER['DKIM_DOMAIN'].")

    def handle(self, *args, generate=None, selector=None, domain=None, **options):
        selector = selector or conf.get("DKIM_SELECTOR")
        domain = domain or conf.get("DKIM_DOMAIN")
        if not selector or not domain:
            raise CommandError(
                "No DKIM selector or domain: set MAILER_DKIM_SELECTOR and MAILER_DKIM_DOMAIN, "
                "or pass --selector and --domain."
            )
        try:
            if generate:
                key = dkimsign.parse_key(generate_key(generate), generate)
            else:
                key = dkimsign.configured_key()
        except MailerConfigurationError as exc:
            raise CommandError(str(exc)) from None

        name = dkimsign.record_name(selector, domain)
        value = key.dns_value()
        strings = dkimsign.txt_strings(value)
        out = self.stdout.write
        if generate:
            out(f"Wrote a new {key.bits}-bit RSA private key to {generate} (mode 0600).")
            out(f"Give it to the workers: MAILER_DKIM_PRIVATE_KEY_FILE={generate}")
            out("")
        out(f"Publish this DNS record ({key.bits}-bit RSA key):")
        out("")
        out(f"Name:  {name}")
        out("Type:  TXT")
        out(f"Value: {value}")
        out("")
        out(f"In a zone file (the value as strings of at most 255 characters, {len(strings)}):")
        out(f"{name}. IN TXT (")
        for string in strings:
            out(f'    "{string}"')
        out(")")
        out("")
        out(
            "Then: python manage.py check (mailer.E008 checks the key, the selector and the "
            "sender's domain), and send a test to a mailbox that shows 'dkim=pass'."
        )
