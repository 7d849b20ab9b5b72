"""Building a :class:`~orchestratr_sql.storage.SqlStorage` from a URL: the connector
of the URL's driver (importing only that plugin's module) and its dialect."""

from __future__ import annotations

import importlib
from typing import Any

from orchestratr_core.backend_urls import DEFAULT_SQLITE_URL
from orchestratr_core.errors import ConfigurationError
from orchestratr_core.plugin.spec import BackendSpec
from orchestratr_sql.connection import Connector
from orchestratr_sql.dialect import Dialect, get_dialect
from orchestratr_sql.storage import SqlStorage
from orchestratr_sql.url import DatabaseUrl, parse_url

__all__ = ["build_storage", "make_connector", "storage_from_url"]


_MODULES = {
    "sqlite": "orchestratr_sql.sqlite",
    "postgresql": "orchestratr_sql.postgresql",
    "mysql": "orchestratr_sql.mysql",
    "sqlserver": "orchestratr_sql.sqlserver",
}


def make_connector(url: DatabaseUrl) -> tuple[Connector, Dialect]:
    """The connector and dialect for ``url``, importing only that plugin's module."""
    module = importlib.import_module(_MODULES[url.dialect])
    connector: Connector = module.make_connector(url)
    dialect = get_dialect(url.dialect)
    return connector, dialect


def storage_from_url(url: str, **options: Any) -> SqlStorage:
    """A (not yet opened) storage for a database URL, e.g.
    ``storage_from_url("sqlite:///orchestratr.sqlite3")``. ``options`` override URL
    parameters (see :class:`~orchestratr_sql.url.StorageOptions`)."""
    parsed = parse_url(url, options)
    connector, dialect = make_connector(parsed)
    return SqlStorage(connector, dialect)


def build_storage(
    spec: BackendSpec, plugin: str, default_url: str | None = None
) -> SqlStorage | None:
    """The body of each plugin module's ``orchestratr_make_storage`` hook: a
    storage for ``spec`` if it names ``plugin``, else ``None``."""
    if spec.plugin != plugin:
        return None
    url = spec.url or default_url
    if url is None:
        raise ConfigurationError(f"the {plugin} storage needs a URL, e.g. {_EXAMPLES[plugin]}")
    parsed = parse_url(url, spec.options)
    if parsed.dialect != plugin:
        raise ConfigurationError(
            f"storage plugin {plugin!r} cannot use the URL {parsed.masked!r} "
            f"(that is a {parsed.dialect} URL)"
        )
    connector, dialect = make_connector(parsed)
    return SqlStorage(connector, dialect)


_EXAMPLES = {
    "sqlite": DEFAULT_SQLITE_URL,
    "postgresql": "postgresql://user:password@host:5432/dbname",
    "mysql": "mysql://user:password@host:3306/dbname",
    "sqlserver": "mssql://user:password@host:1433/dbname?driver=ODBC+Driver+18+for+SQL+Server",
}
