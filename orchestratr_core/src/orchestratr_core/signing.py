"""Message authentication for a fleet that shares a key: HMAC-SHA256 over a message's
body and the routing facts its receiver acts on.

A transport that crosses process boundaries signs every message it publishes with
the *current* key and accepts a message only if its authenticator verifies under
the current or the *previous* key (key rotation: two keys are accepted at once). A
message without a valid authenticator is refused as a :class:`SignatureError`
(a :class:`~orchestratr_core.errors.MalformedMessage`: transports dead-letter it
with one warning and never act on it).

Keys come from ``--signing-key-file PATH`` on the command line, else the file named
by ``ORCHESTRATR_SIGNING_KEY_FILE``, else ``ORCHESTRATR_SIGNING_KEY`` itself. A key
file (and the variable) holds one or two keys separated by white space or new
lines, the current one first; lines starting with ``#`` are comments. A key is at
least :data:`MIN_KEY_LENGTH` printable characters (``openssl rand -hex 32``).
Each key has a public id, derived from it, that travels with the authenticator so
that the receiver knows which key to check with. Key material never appears in a
``repr``, a log line or an error.

The authenticator, one header value ``v1:<key id>:<base64url HMAC>``, covers the
body and the ``context`` the transport passes: for RabbitMQ the exchange, the routing
key, the validated ``user_id`` and the signing time (see ``docs/reliability.md``,
"Forged messages and broker permissions", for what that does and does not cover).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path

from orchestratr_core.errors import ConfigurationError, MalformedMessage
from orchestratr_core.logs import add_secret

__all__ = [
    "KEY_ENV",
    "KEY_FILE_ENV",
    "MIN_KEY_LENGTH",
    "SignatureError",
    "Signer",
    "SigningKey",
    "load_signer",
]

log = logging.getLogger("orchestratr.signing")

KEY_ENV = "ORCHESTRATR_SIGNING_KEY"
"""Environment variable holding the key(s) themselves (current first)."""
KEY_FILE_ENV = "ORCHESTRATR_SIGNING_KEY_FILE"
"""Environment variable naming a key file (wins over :data:`KEY_ENV`)."""
MIN_KEY_LENGTH = 32
"""Shortest key accepted, in characters (``openssl rand -hex 32`` gives 64)."""

_SCHEME = "v1"
_DOMAIN = b"orchestratr-signature-v1\x00"


class SignatureError(MalformedMessage):
    """A message whose authenticator is missing, malformed, of an unknown key, or wrong."""


class SigningKey:
    """One secret key. Its :attr:`key_id` is public; the secret never leaves it."""

    __slots__ = ("_secret", "key_id")

    def __init__(self, secret: str | bytes) -> None:
        raw = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
        if len(raw) < MIN_KEY_LENGTH:
            raise ConfigurationError(
                f"a signing key must be at least {MIN_KEY_LENGTH} characters "
                f"(got {len(raw)}; make one with `openssl rand -hex 32`)"
            )
        self._secret = raw
        add_secret(raw.decode("utf-8", "replace"))  # scrubbed from every log line
        self.key_id = hashlib.sha256(b"orchestratr-key-id\x00" + raw).hexdigest()[:16]
        """Public name of the key (derived from it; reveals nothing usable)."""

    def digest(self, data: bytes) -> bytes:
        """HMAC-SHA256 of ``data`` under this key."""
        return hmac.new(self._secret, data, hashlib.sha256).digest()

    def __repr__(self) -> str:
        return f"<SigningKey id={self.key_id}>"

    __str__ = __repr__


def _canonical(body: bytes, context: Sequence[str]) -> bytes:
    """Length-prefixed fields, then the body: no two inputs share an encoding."""
    parts = [_DOMAIN]
    for field in context:
        data = field.encode("utf-8")
        parts.append(len(data).to_bytes(4, "big"))
        parts.append(data)
    parts.append(len(body).to_bytes(8, "big"))
    parts.append(body)
    return b"".join(parts)


class Signer:
    """Signs with the current key; verifies with the current or the previous one."""

    def __init__(self, current: SigningKey, previous: SigningKey | None = None) -> None:
        self.current = current
        self.previous = previous
        self._keys: Mapping[str, SigningKey] = {
            k.key_id: k for k in (previous, current) if k is not None
        }

    @property
    def key_ids(self) -> tuple[str, ...]:
        """Ids of the keys accepted, the signing one first."""
        return (self.current.key_id,) + (
            (self.previous.key_id,) if self.previous is not None else ()
        )

    def __repr__(self) -> str:
        return f"<Signer keys={','.join(self.key_ids)}>"

    @classmethod
    def parse(cls, text: str, source: str = "the signing key") -> Signer:
        """One or two keys separated by white space; ``#`` starts a comment line."""
        tokens = [
            token
            for line in text.splitlines()
            if not line.lstrip().startswith("#")
            for token in line.split()
        ]
        if not tokens:
            raise ConfigurationError(f"{source} holds no key")
        if len(tokens) > 2:
            raise ConfigurationError(
                f"{source} holds {len(tokens)} keys; at most two (current, then previous)"
            )
        try:
            keys = [SigningKey(token) for token in tokens]
        except ConfigurationError as exc:
            raise ConfigurationError(f"{source}: {exc}") from None
        return cls(keys[0], keys[1] if len(keys) > 1 else None)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Signer:
        """Read a key file; warn once if others than its owner may read it."""
        file = Path(path)
        try:
            text = file.read_text("utf-8")
            mode = file.stat().st_mode
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read the signing key file {str(file)!r}: {exc.strerror}"
            ) from None
        except UnicodeDecodeError:
            raise ConfigurationError(
                f"the signing key file {str(file)!r} is not UTF-8 text"
            ) from None
        signer = cls.parse(text, f"the signing key file {str(file)!r}")
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning(
                "the signing key file %s can be read by others than its owner (chmod 600 it)",
                file,
            )
        return signer

    def sign(self, body: bytes, context: Sequence[str]) -> str:
        """The authenticator of ``body`` in ``context``, under the current key."""
        mac = self.current.digest(_canonical(body, context))
        encoded = base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")
        return f"{_SCHEME}:{self.current.key_id}:{encoded}"

    def verify(self, signature: object, body: bytes, context: Sequence[str]) -> str:
        """Check ``signature``; return the id of the key that made it, or raise
        :class:`SignatureError` saying why (never with key material)."""
        if signature is None:
            raise SignatureError("no authenticator (unsigned message)")
        if isinstance(signature, bytes):
            try:
                signature = signature.decode("ascii")
            except UnicodeDecodeError:
                raise SignatureError("an authenticator that is not ASCII") from None
        if not isinstance(signature, str):
            raise SignatureError("an authenticator that is not a string")
        scheme, _, rest = signature.partition(":")
        key_id, _, encoded = rest.partition(":")
        if scheme != _SCHEME or not key_id or not encoded:
            raise SignatureError("a malformed authenticator")
        key = self._keys.get(key_id)
        if key is None:
            raise SignatureError(f"an authenticator of unknown key {key_id[:16]!r}")
        try:
            mac = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        except ValueError:
            raise SignatureError("a malformed authenticator") from None
        if not hmac.compare_digest(mac, key.digest(_canonical(body, context))):
            raise SignatureError(f"a wrong authenticator (key {key_id})")
        return key_id


def load_signer(
    path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> Signer | None:
    """The fleet's signer: from ``path``, else ``$ORCHESTRATR_SIGNING_KEY_FILE``, else
    ``$ORCHESTRATR_SIGNING_KEY``; ``None`` when none is set (messages are then
    neither signed nor checked)."""
    env = os.environ if environ is None else environ
    if path is not None and str(path).strip():
        return Signer.from_file(path)
    file = env.get(KEY_FILE_ENV, "").strip()
    if file:
        return Signer.from_file(file)
    text = env.get(KEY_ENV, "")
    if text.strip():
        return Signer.parse(text, f"${KEY_ENV}")
    return None
