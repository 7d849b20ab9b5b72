"""The web tests' shared pieces: the API token, an HTTP client on an app, the browser,
and reading a Prometheus exposition."""

from __future__ import annotations

import re

import httpx

TOKEN = "s3cret-token-for-tests"

# Debian's Chromium (tests/web/install-browser.sh): Playwright cannot download its own here
CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def client_for(app: object, token: str | None = None) -> httpx.AsyncClient:
    """An HTTP client calling ``app`` in process, with ``token`` as bearer if given."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),  # type: ignore[arg-type]
        base_url="http://127.0.0.1",
        headers=headers,
    )


def value(text: str, name: str, labels: str = "") -> float:
    """The sample ``name{labels}`` in an exposition, 0 if absent."""
    pattern = re.escape(name) + (re.escape("{" + labels + "}") if labels else r"(?:\{\})?")
    match = re.search(rf"^{pattern} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def exposition() -> str:
    """The default registry's exposition text."""
    from prometheus_client import REGISTRY, generate_latest

    return generate_latest(REGISTRY).decode()
