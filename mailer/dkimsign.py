"""DKIM signatures on the SMTP path: the key read once per process, the wire bytes signed.

dkimpy does the signing (relaxed/relaxed, rsa-sha256), with its RSA step done by OpenSSL
(below): about 0.7 ms of CPU a transactional email with a 2048-bit key, where dkimpy's
pure-Python RSA alone took 5 ms. The README's DKIM section has the measured figures.
The private key never reaches a log or an error message; errors name the setting instead.
"""

from __future__ import annotations

import base64
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

import dkim
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils
from dkim.asn1 import BIT_STRING, INTEGER, NULL, OBJECT_IDENTIFIER, SEQUENCE
from dkim.crypto import UnparsableKeyError, parse_pem_private_key

from . import conf
from .exceptions import MailerConfigurationError

#: Headers signed once more than the email has them (RFC 6376 §8.15). A verifier takes
#: each header from the bottom up, so without this anyone relaying a signed email could
#: add a second From or Subject above ours, which many clients show, and the signature
#: would still pass. These are the headers a reader sees and acts on (the set rspamd
#: over-signs by default when present); the others are signed once.
OVERSIGNED = frozenset({b"from", b"to", b"cc", b"reply-to", b"subject"})

#: Keys shorter than this are ignored by receivers (RFC 8301); 2048 bits is the norm.
MIN_KEY_BITS = 1024

CANONICALIZATION = (b"relaxed", b"relaxed")
ALGORITHM = b"rsa-sha256"

# DER of the rsaEncryption algorithm identifier (1.2.840.113549.1.1.1, NULL parameters).
_RSA_ENCRYPTION = b"\x2a\x86\x48\x86\xf7\x0d\x01\x01\x01"
_PEM = re.compile(rb"-----BEGIN ([A-Z ]*)PRIVATE KEY-----\n.+?\n-----END \1PRIVATE KEY-----", re.S)


def _der(tag: int, content: bytes) -> bytes:
    """One DER element (dkimpy's ``asn1_encode`` fails on contents of 256 bytes or more)."""
    size = len(content)
    if size < 0x80:
        return bytes((tag, size)) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(length))) + length + content


def _der_integer(value: int) -> bytes:
    return _der(INTEGER, value.to_bytes(value.bit_length() // 8 + 1, "big"))


@dataclass(frozen=True)
class Key:
    """An RSA private key, parsed; the PEM is kept only to hand to dkimpy."""

    pem: bytes = field(repr=False)
    modulus: int = field(repr=False)
    public_exponent: int = field(repr=False)

    @property
    def bits(self) -> int:
        return self.modulus.bit_length()

    def public_der(self) -> bytes:
        """The public key as DER SubjectPublicKeyInfo, the form a DKIM record's p= holds."""
        rsa_public = _der(SEQUENCE, _der_integer(self.modulus) + _der_integer(self.public_exponent))
        algorithm = _der(SEQUENCE, _der(OBJECT_IDENTIFIER, _RSA_ENCRYPTION) + _der(NULL, b""))
        return _der(SEQUENCE, algorithm + _der(BIT_STRING, b"\0" + rsa_public))

    def dns_value(self) -> str:
        """The TXT record's value: ``v=DKIM1; k=rsa; p=<base64 public key>``."""
        return f"v=DKIM1; k=rsa; p={base64.b64encode(self.public_der()).decode('ascii')}"


def parse_key(pem: str | bytes, source: str) -> Key:
    """Parse PEM text (PKCS#1 or PKCS#8, RSA). ``source`` names the setting in errors.

    Environment variables often carry the PEM's line breaks as a literal backslash-n, or
    with CRLF; both are accepted.
    """
    data = pem.encode("ascii", "replace") if isinstance(pem, str) else pem
    data = data.replace(b"\\n", b"\n").replace(b"\r\n", b"\n").strip()
    match = _PEM.search(data)
    if match is None:
        raise MailerConfigurationError(
            f"{source} is not a PEM private key (it must hold '-----BEGIN PRIVATE KEY-----' "
            "or '-----BEGIN RSA PRIVATE KEY-----'). Generate one with "
            "`python manage.py mailer_dkim_record --generate PATH`."
        )
    if match.group(1) not in (b"", b"RSA "):
        raise MailerConfigurationError(
            f"{source} is a {match.group(1).decode().strip()} key; DKIM signing here needs "
            "an RSA key."
        )
    pem_bytes = match.group(0) + b"\n"
    try:
        parsed = parse_pem_private_key(pem_bytes)
    except (UnparsableKeyError, ValueError, IndexError, TypeError):
        # dkimpy's message may quote key bytes: it is not passed on.
        raise MailerConfigurationError(
            f"{source} does not parse as an RSA private key (PKCS#1 or PKCS#8 PEM)."
        ) from None
    key = Key(pem_bytes, parsed["modulus"], parsed["publicExponent"])
    if key.bits < MIN_KEY_BITS:
        raise MailerConfigurationError(
            f"{source} is a {key.bits}-bit key; receivers ignore DKIM keys under "
            f"{MIN_KEY_BITS} bits. Use a 2048-bit key."
        )
    return key


@functools.lru_cache(maxsize=4)
def load_key(text: str | None, path: str | None) -> Key:
    """The key from DKIM_PRIVATE_KEY or DKIM_PRIVATE_KEY_FILE, read and parsed once per
    process and configuration (a broken one is not cached, so fixing it needs no restart)."""
    if text and path:
        raise MailerConfigurationError(
            "MAILER['DKIM_PRIVATE_KEY'] and MAILER['DKIM_PRIVATE_KEY_FILE'] are both set: "
            "set only one, so it is clear which key signs."
        )
    if text:
        return parse_key(text, "MAILER['DKIM_PRIVATE_KEY']")
    if not path:
        raise MailerConfigurationError(
            "DKIM signing needs a private key: set MAILER['DKIM_PRIVATE_KEY'] (PEM text) or "
            "MAILER['DKIM_PRIVATE_KEY_FILE'] (a path)."
        )
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise MailerConfigurationError(
            f"MAILER['DKIM_PRIVATE_KEY_FILE'] {path!r} cannot be read ({exc.strerror}): make "
            "it readable by the worker's user, or fix the path."
        ) from None
    return parse_key(data, f"MAILER['DKIM_PRIVATE_KEY_FILE'] {path!r}")


def configured_key() -> Key:
    """The configured private key; MailerConfigurationError says what is wrong with it."""
    return load_key(conf.get("DKIM_PRIVATE_KEY") or None, conf.get("DKIM_PRIVATE_KEY_FILE") or None)


def ascii_domain(domain: str) -> str:
    """A domain as DNS and the d= tag need it: lower case, IDNA, no trailing dot."""
    domain = domain.strip().rstrip(".").lower()
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


# --- The RSA step through OpenSSL ----------------------------------------------------------
#
# dkimpy canonicalises and hashes well, but computes the RSA signature with Python's pow():
# 5.2 ms of CPU an email for a 2048-bit key, five times all the rest of sending it. OpenSSL
# (cryptography) computes the same PKCS#1 v1.5 signature, deterministic and byte for byte
# identical, in about 0.2 ms. dkimpy calls the step through its module's global name, so
# that name is pointed here; a digest other than SHA-256 still goes dkimpy's way.

_KEY_FIELDS = (
    "modulus",
    "publicExponent",
    "privateExponent",
    "prime1",
    "prime2",
    "exponent1",
    "exponent2",
    "coefficient",
)
_pure_rsa_sign = dkim.crypto.RSASSA_PKCS1_v1_5_sign


def openssl_rsa_sign(digest, private_key: dict) -> bytes:
    """dkimpy's ``RSASSA_PKCS1_v1_5_sign(hash, private_key)``, by OpenSSL."""
    if digest.name.lower() != "sha256":
        return _pure_rsa_sign(digest, private_key)
    key = _openssl_key(tuple(private_key[name] for name in _KEY_FIELDS))
    return key.sign(digest.digest(), padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))


@functools.lru_cache(maxsize=4)
def _openssl_key(fields: tuple[int, ...]) -> rsa.RSAPrivateKey:
    n, e, d, p, q, dmp1, dmq1, iqmp = fields
    public = rsa.RSAPublicNumbers(e=e, n=n)
    return rsa.RSAPrivateNumbers(p, q, d, dmp1, dmq1, iqmp, public).private_key()


dkim.RSASSA_PKCS1_v1_5_sign = openssl_rsa_sign


def record_name(selector: str, domain: str) -> str:
    """Where the public key is published: ``<selector>._domainkey.<domain>``."""
    return f"{selector}._domainkey.{ascii_domain(domain)}"


def txt_strings(value: str, size: int = 255) -> list[str]:
    """A TXT value cut into the character-strings of at most 255 bytes that DNS needs."""
    return [value[i : i + size] for i in range(0, len(value), size)] or [""]


@dataclass(frozen=True)
class Signer:
    """Signs an email's bytes for one domain, selector and key."""

    domain: bytes
    selector: bytes
    key: Key
    headers: tuple[bytes, ...]  # lower case, in the configured order, no repeats

    def signature(self, data: bytes) -> bytes:
        """The ``DKIM-Signature:`` header field (CRLF-terminated) for ``data``.

        Only headers the email has are listed in h=, and those in OVERSIGNED once more.
        dkimpy parses the PEM on each call (about 0.1 ms, 2 % of a signature); the file,
        its checks and the public key are read once (``load_key``).
        """
        message = dkim.DKIM(data, signature_algorithm=ALGORITHM, linesep=b"\r\n")
        present = {name.lower() for name, _ in message.headers}
        signed = [name for name in self.headers if name in present]
        include = signed + [name for name in signed if name in OVERSIGNED]
        return message.sign(
            self.selector,
            self.domain,
            self.key.pem,
            canonicalize=CANONICALIZATION,
            include_headers=include,
        )

    def sign(self, data: bytes) -> bytes:
        """``data`` with its DKIM-Signature header prepended, otherwise byte for byte."""
        return self.signature(data) + data


@functools.lru_cache(maxsize=4)
def _signer(
    domain: str, selector: str, text: str | None, path: str | None, headers: tuple[str, ...]
) -> Signer:
    names = tuple(dict.fromkeys(name.strip().lower().encode("ascii") for name in headers))
    if b"from" not in names:
        raise MailerConfigurationError("MAILER['DKIM_HEADERS'] must include From (RFC 6376).")
    if not selector:
        raise MailerConfigurationError(
            "MAILER['DKIM_DOMAIN'] is set but MAILER['DKIM_SELECTOR'] is not: set both."
        )
    return Signer(
        domain=ascii_domain(domain).encode("ascii"),
        selector=selector.strip().encode("ascii"),
        key=load_key(text, path),
        headers=names,
    )


def signer() -> Signer | None:
    """The configured signer, built once per process; None when DKIM_DOMAIN is unset."""
    domain = conf.get("DKIM_DOMAIN")
    if not domain:
        return None
    return _signer(
        domain,
        conf.get("DKIM_SELECTOR") or "",
        conf.get("DKIM_PRIVATE_KEY") or None,
        conf.get("DKIM_PRIVATE_KEY_FILE") or None,
        tuple(conf.get("DKIM_HEADERS")),
    )


def sign(data: bytes) -> bytes:
    """The bytes to put on the wire: signed when DKIM is configured, else ``data``.

    A key that cannot be loaded raises MailerConfigurationError: mail is never sent
    unsigned by a set-up that means to sign it.
    """
    configured = signer()
    return configured.sign(data) if configured else data


def aligned(domain: str, sender_domain: str) -> bool:
    """True when the DKIM domain is the sender's domain or a parent of it (DMARC's relaxed
    alignment needs exactly this)."""
    d, s = ascii_domain(domain), ascii_domain(sender_domain)
    return bool(d) and (s == d or s.endswith(f".{d}"))
