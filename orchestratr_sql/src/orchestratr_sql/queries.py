"""Named SQL queries, kept in ``.sql`` files per dialect (Procrastinate-style).

A query file is a sequence of blocks::

    -- name: create_job
    -- Insert one job row.
    INSERT INTO jobs (...) VALUES (:id, :name, ...);

Parameters are written ``:name`` in every dialect and compiled once to the
driver's parameter style (``$1`` for asyncpg, ``?`` for SQLite and ODBC, ``%s``
for aiomysql). The SQL text itself never changes with the input: values always
travel as parameters.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

__all__ = [
    "ParamStyle",
    "Query",
    "compile_query",
    "load_queries",
    "migration_files",
    "multi_row_values",
    "split_statements",
    "values_query",
]

ParamStyle = Literal["numeric", "qmark", "format"]

_NAME_LINE = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)
# A :name parameter outside quotes, not part of a PostgreSQL '::type' cast.
_PARAM = re.compile(r"(?<![:\w]):([A-Za-z_][A-Za-z0-9_]*)")
_QUOTED = re.compile(r"('(?:[^']|'')*')")
_VALUES = re.compile(r"\bVALUES\b", re.IGNORECASE)


@dataclass(frozen=True)
class Query:
    """One statement compiled for a parameter style."""

    name: str
    text: str
    """The SQL as sent to the driver."""
    params: tuple[str, ...]
    """Parameter names in the order the driver expects the values."""

    def bind(self, values: Mapping[str, Any]) -> tuple[Any, ...]:
        """The positional values for this statement, from named ``values``."""
        try:
            return tuple(values[name] for name in self.params)
        except KeyError as exc:
            raise KeyError(f"query {self.name!r} needs parameter {exc.args[0]!r}") from None


def compile_query(name: str, sql: str, style: ParamStyle) -> Query:
    """Compile ``:name`` parameters of ``sql`` to ``style``."""
    order: list[str] = []
    out: list[str] = []
    for index, chunk in enumerate(_QUOTED.split(sql)):
        if index % 2 == 1:  # a quoted literal: copied as is
            out.append(chunk)
            continue

        def replace(match: re.Match[str]) -> str:
            param = match.group(1)
            if style == "numeric":
                if param not in order:
                    order.append(param)
                return f"${order.index(param) + 1}"
            order.append(param)
            return "?" if style == "qmark" else "%s"

        out.append(_PARAM.sub(replace, chunk))
    return Query(name=name, text="".join(out).strip(), params=tuple(order))


def _parse_blocks(text: str, origin: str) -> dict[str, str]:
    blocks: dict[str, str] = {}
    matches = list(_NAME_LINE.finditer(text))
    for position, match in enumerate(matches):
        end = matches[position + 1].start() if position + 1 < len(matches) else len(text)
        body_lines = [
            line
            for line in text[match.end() : end].splitlines()
            if not line.strip().startswith("--")
        ]
        body = "\n".join(body_lines).strip().rstrip(";").strip()
        if not body:
            raise ValueError(f"{origin}: query {match.group(1)!r} is empty")
        if match.group(1) in blocks:
            raise ValueError(f"{origin}: query {match.group(1)!r} defined twice")
        blocks[match.group(1)] = body
    return blocks


@functools.cache
def raw_queries(dialect: str) -> dict[str, str]:
    """The uncompiled queries of ``dialect``: ``sql/common.sql`` overlaid by
    ``sql/<dialect>.sql`` (a dialect file may redefine a common query)."""
    base = resources.files("orchestratr_sql") / "sql"
    queries = _parse_blocks((base / "common.sql").read_text("utf-8"), "common.sql")
    own = _parse_blocks((base / f"{dialect}.sql").read_text("utf-8"), f"{dialect}.sql")
    queries.update(own)
    return queries


@functools.cache
def load_queries(dialect: str, style: ParamStyle) -> dict[str, Query]:
    """Every named query of ``dialect`` compiled for ``style``."""
    return {name: compile_query(name, sql, style) for name, sql in raw_queries(dialect).items()}


@functools.cache
def values_query(dialect: str, name: str, rows: int, style: ParamStyle) -> Query:
    """The single-row ``INSERT ... VALUES (...)`` query ``name`` of ``dialect``
    as a multi-row ``INSERT`` of ``rows`` rows: the row is repeated with its
    parameters renamed ``:param__<row>`` (fill them with :func:`multi_row_values`).
    The text depends on the number of rows only, never on the values."""
    if rows < 1:
        raise ValueError("a multi-row INSERT needs at least one row")
    sql = raw_queries(dialect)[name]
    found = list(_VALUES.finditer(sql))
    if not found:
        raise ValueError(f"query {name!r} has no VALUES clause")
    head, template = sql[: found[-1].end()], sql[found[-1].end() :].strip()
    if not (template.startswith("(") and template.endswith(")")):
        raise ValueError(f"query {name!r} must end with one VALUES (...) row")

    def row(index: int) -> str:
        chunks = _QUOTED.split(template)
        return "".join(
            chunk if position % 2 else _PARAM.sub(rf":\g<1>__{index}", chunk)
            for position, chunk in enumerate(chunks)
        )

    body = head + "\n" + ",\n".join(row(index) for index in range(rows))
    return compile_query(f"{name}[{rows}]", body, style)


def multi_row_values(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The named values of a :func:`values_query` for ``rows`` (one mapping each)."""
    return {
        f"{key}__{index}": value for index, row in enumerate(rows) for key, value in row.items()
    }


def split_statements(script: str) -> list[str]:
    """Split a migration script into statements: each ends with ``;`` at the end
    of a line. Comment-only lines are dropped."""
    statements: list[str] = []
    current: list[str] = []
    for line in script.splitlines():
        if line.strip().startswith("--") or (not current and not line.strip()):
            continue
        current.append(line)
        if line.rstrip().endswith(";"):
            statement = "\n".join(current).strip().rstrip(";").strip()
            if statement:
                statements.append(statement)
            current = []
    rest = "\n".join(current).strip()
    if rest:
        statements.append(rest)
    return statements


@functools.cache
def migration_files(dialect: str) -> tuple[tuple[int, str, str], ...]:
    """``(version, name, script)`` of every migration of ``dialect``, in order.
    Files are named ``NNNN_description.sql``; versions start at 1, no gaps."""
    folder = resources.files("orchestratr_sql") / "migrations" / dialect
    found: list[tuple[int, str, str]] = []
    for entry in folder.iterdir():
        match = re.match(r"^(\d{4})_[a-z0-9_]+\.sql$", entry.name)
        if match:
            found.append((int(match.group(1)), entry.name[:-4], entry.read_text("utf-8")))
    found.sort()
    versions: Sequence[int] = [version for version, _, _ in found]
    if list(versions) != list(range(1, len(found) + 1)):
        raise ValueError(f"migrations of {dialect} are not numbered 1..n without gaps")
    return tuple(found)
