"""Showing URLs and stored text to people without leaking or obeying them.

One home for the rules every message, log line and table follows:

* :func:`mask_url` shows a URL with its password replaced by ``***``. A URL
  that does not parse *cleanly* is treated as wholly secret and shown as
  ``scheme://***``: a password holding an unencoded ``/``, ``?``, ``#``, ``@``
  or white space makes parsers disagree about where it ends, so no part after
  the scheme can be trusted not to be a piece of it.
* :func:`url_secrets` lists the strings of a URL that must never be printed
  (the password; for an unclean URL the whole URL and everything that could be
  its password), for :func:`orchestratr_core.logs.add_secret`.
* :func:`redact_urls` applies :func:`mask_url` to every URL found in free text
  (driver errors, log messages).
* :func:`printable` escapes control characters of stored text (job names,
  arguments, errors, server names) before it reaches a terminal.
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import SplitResult, unquote, urlsplit

__all__ = ["mask_url", "printable", "redact_urls", "url_is_clean", "url_secrets"]

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
# A URL in free text: a scheme, "://" and everything up to white space.
_URL_IN_TEXT = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://\S*")
# Punctuation that quotes or ends a URL in a sentence rather than belonging to it.
_TRAILING = "'\"`,;:.)]}>\\"


def _split(url: str) -> SplitResult | None:
    """``urlsplit(url)`` if the URL parses cleanly, else ``None``.

    Clean means: a ``scheme://`` prefix, no white space or control character,
    at most one ``@`` and only in the authority (an ``@`` further on means a
    password ran into the path, query or fragment), and numeric ports (one per
    host of a comma-separated host list).
    """
    if _SCHEME.match(url) is None:
        return None
    if any(c.isspace() or unicodedata.category(c) == "Cc" for c in url):
        return None
    try:
        parts = urlsplit(url)
        _check_ports(parts)
    except ValueError:
        return None
    if url.count("@") > 1 or ("@" in url and "@" not in parts.netloc):
        return None
    return parts


def _check_ports(parts: SplitResult) -> None:
    """Raise ``ValueError`` unless every port is numeric and in range, also in
    a list of hosts (``h1:5432,h2:5433``, which ``urlsplit`` sees as one)."""
    hosts = parts.netloc.rpartition("@")[2]
    for spec in hosts.split(","):
        _ = urlsplit(f"//{spec}").port  # raises for a bad port


def url_is_clean(url: str) -> bool:
    """True when ``url`` parses without ambiguity (see :func:`mask_url`)."""
    return _split(url) is not None


def mask_url(url: str | None) -> str | None:
    """``url`` for logs and errors: the password replaced by ``***``; a URL
    that does not parse cleanly becomes ``scheme://***`` (wholly secret);
    plugin names and other strings without ``://`` are returned unchanged."""
    if url is None:
        return None
    if "://" not in url:
        return url
    parts = _split(url)
    if parts is None:
        scheme = _SCHEME.match(url)
        return f"{scheme.group(1)}://***" if scheme else "<unparseable URL>"
    if parts.password is None:
        return url
    user, _, host = parts.netloc.rpartition("@")
    name = user.split(":", 1)[0]
    return parts._replace(netloc=f"{name}:***@{host}").geturl()


def url_secrets(url: str | None) -> list[str]:
    """Strings of ``url`` never to print: its password (as written and decoded);
    for a URL that does not parse cleanly, also the URL itself, everything
    after ``scheme://`` and every candidate password (between the first ``:``
    of the user part and each ``@``)."""
    if not url or "://" not in url:
        return []
    parts = _split(url)
    if parts is not None:
        password = parts.password
        return [password, unquote(password)] if password else []
    found = [url]
    rest = url.split("://", 1)[1]
    found.append(rest)
    _user, colon, after = rest.partition(":")
    if colon:
        for at in (i for i, c in enumerate(after) if c == "@"):
            found.append(after[:at])
        if "@" not in after:
            found.append(after)
    return [s for s in dict.fromkeys(found + [unquote(s) for s in found]) if s]


def redact_urls(text: str) -> str:
    """``text`` with every URL in it shown as :func:`mask_url` shows it."""

    def mask(match: re.Match[str]) -> str:
        token = match.group(0)
        url = token.rstrip(_TRAILING)
        # Keep a trailing quote or comma outside, unless the URL is unclean
        # without it too: then the whole token goes (it may end in the password).
        if _split(url) is None and _split(token) is not None:
            url = token
        return (mask_url(url) or "") + token[len(url) :]

    return _URL_IN_TEXT.sub(mask, text)


_ESCAPED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: str) -> str:
    """``text`` with control and format characters (ESC, NUL, newlines,
    bidirectional overrides, ...) written as ``\\xNN`` / ``\\uNNNN`` escapes, so
    that stored text cannot move the cursor, recolour or rewrite a terminal."""
    if text.isprintable():
        return text
    out = []
    for c in text:
        if c.isprintable() or c == " ":
            out.append(c)
        elif c in _ESCAPED:
            out.append(_ESCAPED[c])
        elif ord(c) < 0x100:
            out.append(f"\\x{ord(c):02x}")
        elif ord(c) < 0x10000:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(f"\\U{ord(c):08x}")
    return "".join(out)
