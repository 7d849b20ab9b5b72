"""SQL driver errors as OrchestratR errors: one line, URL masked, secrets scrubbed."""

from __future__ import annotations

from orchestratr_core.errors import BackendUnavailable, DataRejected, PermanentBackendError
from orchestratr_sql.connection import Connector, ErrorKind, scrub

__all__ = ["backend_error"]


def backend_error(
    connector: Connector, exc: BaseException, kind: ErrorKind, what: str
) -> Exception:
    """The OrchestratR error for a classified driver error: one line, URL
    masked, driver text scrubbed of secrets."""
    where = f"{connector.product} at {connector.url.masked}"
    detail = scrub(str(exc) or type(exc).__name__, connector.url.secrets)
    if kind is ErrorKind.AUTH:
        return PermanentBackendError(
            f"{where}: authentication failed, check the user and password ({detail})"
        )
    if kind is ErrorKind.UNKNOWN_DATABASE:
        return PermanentBackendError(
            f"{where}: the database does not exist, create it first ({detail})"
        )
    if kind is ErrorKind.DATA:
        return DataRejected(f"{where} refused a value ({what}): {detail}"[:1000])
    return BackendUnavailable(f"{where} is unavailable ({what}): {detail}")
