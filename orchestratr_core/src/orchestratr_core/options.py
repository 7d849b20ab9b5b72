"""The one parser of backend options given in a URL query (``?fence_timeout=0.5``)
and as keyword options (which win), used by every backend: names are checked
against what the backend knows, strings from a URL or a command line are turned
into the number or truth value an option takes. What a value must satisfy beyond
its type (ranges, relations between options) stays with each backend."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any
from urllib.parse import unquote, unquote_plus, urlsplit

from orchestratr_core.errors import ConfigurationError

__all__ = ["OptionKind", "check_known", "coerce", "merge", "split_query"]

OptionKind = type[int] | type[float] | type[bool] | type[str]
"""What an option holds: ``int``, ``float``, ``bool`` or ``str``."""

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def split_query(
    url: str,
    known: Collection[str] | None = None,
    *,
    aliases: Mapping[str, str] | None = None,
    plus_is_space: bool = True,
) -> tuple[str, dict[str, str]]:
    """Take the options out of ``url``'s query: every parameter, or only those named
    in ``known`` (after renaming by ``aliases``). Returns the URL without them (the
    rest is for the driver) and the options, decoded. ``plus_is_space`` decodes as
    HTML forms do (``a+b`` is ``a b``); without it only ``%xx`` escapes are decoded."""
    decode = unquote_plus if plus_is_space else unquote
    parts = urlsplit(url)
    options: dict[str, str] = {}
    kept: list[str] = []
    for item in parts.query.split("&"):
        if not item:
            continue
        key, _, value = item.partition("=")
        key = decode(key)
        key = (aliases or {}).get(key, key)
        if known is None or key in known:
            options[key] = decode(value)
        else:
            kept.append(item)
    return parts._replace(query="&".join(kept)).geturl(), options


def merge(from_url: Mapping[str, Any], keywords: Mapping[str, Any]) -> dict[str, Any]:
    """The options of a URL overridden by keyword options."""
    return {**from_url, **keywords}


def check_known(names: Collection[str], known: Collection[str], what: str) -> None:
    """Refuse option names outside ``known``, naming them and what is known (in the
    order ``known`` lists them)."""
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ConfigurationError(
            f"unknown {what} option(s) {', '.join(unknown)}; known: {', '.join(known)}"
        )


def coerce(
    name: str, value: Any, kind: OptionKind, *, unit: str = "", optional: bool = False
) -> Any:
    """``value`` as option ``name`` takes it, or :class:`ConfigurationError`. A string
    (from a URL, the environment or a command line) is parsed; a number becomes the
    kind's (a whole one for ``int``); ``True``/``False`` is no number; ``None`` is
    kept for an ``optional`` option. ``unit`` words the error (``"seconds"``)."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ConfigurationError(f"option {name} must be true or false, not {value!r}")
    if kind is str:
        return None if value in (None, "") else str(value)
    if value is None and optional:
        return None
    number: int | float | None = None
    if isinstance(value, str):
        try:
            number = int(value) if kind is int else float(value)
        except ValueError:
            number = None
    elif isinstance(value, int | float) and not isinstance(value, bool):
        number = value
    if kind is int and isinstance(number, float):
        number = int(number) if number.is_integer() else None
    if number is None:
        of = f" of {unit}" if unit else ""
        whole = " (a whole one)" if kind is int else ""
        raise ConfigurationError(f"option {name} must be a number{of}{whole}, not {value!r}")
    return int(number) if kind is int else float(number)
