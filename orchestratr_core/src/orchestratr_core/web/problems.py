"""Errors as RFC 9457 (formerly 7807) problem details.

Every error response is ``application/problem+json`` with ``type``, ``title``,
``status`` and ``detail``; ``detail`` is the same one-line message the Python
API raises (for example the job-name validation message of
:func:`~orchestratr_core.job.validate_name`). None contains a credential.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field
from starlette.responses import JSONResponse

__all__ = ["PROBLEM_MEDIA_TYPE", "ApiProblem", "Problem", "problem_response"]

PROBLEM_MEDIA_TYPE = "application/problem+json"
_TYPE_PREFIX = "urn:orchestratr:problem:"


class Problem(BaseModel):
    """A problem details document."""

    type: str = Field(description="A URN naming the kind of problem")
    title: str = Field(description="A short summary of the kind of problem")
    status: int = Field(description="The HTTP status code")
    detail: str = Field(description="What went wrong, for a person")
    errors: list[dict[str, Any]] | None = Field(
        default=None, description="Field-by-field errors of a rejected request"
    )


class ApiProblem(Exception):
    """Raise in a handler to answer with a problem document."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        kind: str | None = None,
        headers: dict[str, str] | None = None,
        errors: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.kind = kind or title.lower().replace(" ", "-")
        self.headers = headers or {}
        self.errors = errors

    def response(self) -> JSONResponse:
        """The HTTP response for this problem."""
        return problem_response(
            self.status, self.title, self.detail, self.kind, self.headers, self.errors
        )


def problem_response(
    status: int,
    title: str,
    detail: str,
    kind: str,
    headers: dict[str, str] | None = None,
    errors: list[dict[str, Any]] | None = None,
) -> JSONResponse:
    """A ``application/problem+json`` response."""
    body: dict[str, Any] = {
        "type": _TYPE_PREFIX + kind,
        "title": title,
        "status": status,
        "detail": detail,
    }
    if errors is not None:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_MEDIA_TYPE)
