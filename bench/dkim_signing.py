"""DKIM benchmark: CPU per email of signing on the SMTP path, in-process, no services.

    .venv/bin/python bench/dkim_signing.py [--emails 300]

Makes a throwaway 2048-bit key with the openssl command, builds emails the size of a
transactional (HTML ~6 KB) and a campaign email (HTML ~40 KB) with mailer's MIME
builder, and times, in CPU seconds of this process:

a. building the unsigned bytes (the reference: what the SMTP path costs without DKIM);
b. ``dkimsign.sign`` on them (what SMTPBackend adds per email);
c. the parts of b: the RSA signature alone (OpenSSL, as mailer signs; dkimpy's own
   pure-Python RSA beside it) and the rest
   (parsing the email, relaxed canonicalisation, SHA-256 of headers and body, the PEM).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

import django  # noqa: E402

django.setup()

from django.test import override_settings  # noqa: E402
from dkim.crypto import RSASSA_PKCS1_v1_5_sign, parse_pem_private_key  # noqa: E402

from mailer import dkimsign, mime  # noqa: E402
from mailer.dkimsign import openssl_rsa_sign  # noqa: E402

PARAGRAPH = (
    "Thanks for signing up. Your account is ready: sign in with the button below and "
    "tell us what you think. Ünïcode here and there, as real mail has. "
)


def email_bytes(html_size: int) -> bytes:
    html = "<html><body>" + f"<p style='font-family:sans-serif'>{PARAGRAPH}</p>\n" * (
        html_size // (len(PARAGRAPH) + 40)
    )
    return mime.build(
        from_header="Mailer <noreply@mailer.test>",
        to_header="Ada Lovelace <ada@example.com>",
        subject="Welcome to Mailer, Ada!",
        text=PARAGRAPH * 10,
        html=html + "</body></html>",
        message_id="<bench@mailer.test>",
        headers={
            "X-Mailer-Message-Id": "0b8e7d7e-bench",
            "List-Unsubscribe": "<https://mailer.test/u/TOKEN/>",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        },
    )


def per_email_us(function, count: int) -> float:
    function()
    start = time.process_time()
    for _ in range(count):
        function()
    return (time.process_time() - start) / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emails", type=int, default=300)
    args = parser.parse_args()
    openssl = shutil.which("openssl")
    if openssl is None:
        sys.exit("needs the openssl command to make a throwaway key")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bench.pem"
        path.write_bytes(
            subprocess.run(
                [openssl, "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
                capture_output=True,
                check=True,
            ).stdout
        )
        mailer = {
            "DKIM_DOMAIN": "mailer.test",
            "DKIM_SELECTOR": "bench",
            "DKIM_PRIVATE_KEY_FILE": str(path),
        }
        with override_settings(MAILER=mailer):
            pem = dkimsign.configured_key().pem
            key = parse_pem_private_key(pem)
            pure = per_email_us(
                lambda: RSASSA_PKCS1_v1_5_sign(hashlib.sha256(b"x"), key), args.emails
            )
            rsa = per_email_us(lambda: openssl_rsa_sign(hashlib.sha256(b"x"), key), args.emails)
            print(f"DKIM signing, 2048-bit RSA key, {args.emails} emails each, CPU µs per email")
            print(f"{'email':<26}{'bytes':>8}{'build':>10}{'sign':>10}{'  RSA':>10}{'rest':>10}")
            for label, size in (("transactional (6 KB)", 6_000), ("campaign (40 KB)", 40_000)):
                data = email_bytes(size)
                build = per_email_us(lambda s=size: email_bytes(s), args.emails)
                sign = per_email_us(lambda d=data: dkimsign.sign(d), args.emails)
                print(
                    f"{label:<26}{len(data):>8}{build:>10.0f}{sign:>10.0f}{rsa:>10.0f}"
                    f"{sign - rsa:>10.0f}"
                )
            print(f"RSA step by dkimpy's own pure-Python code, for comparison: {pure:.0f} µs")


if __name__ == "__main__":
    main()
