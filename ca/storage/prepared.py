"""Prebuilt statements run on the driver's own cursor.

The statements every ACME request and every issuance runs are built once, with SQLAlchemy Core,
at import. `Prepared` compiles each once per dialect (SQLAlchemy writes the SQL, bind casts and
all, and supplies each column type's bind and result conversions) and then runs it on the DBAPI
cursor of the connection SQLAlchemy lends. What it leaves out per call is SQLAlchemy's
execution machinery: cache-key generation, the execution context, the result object.

`scripts/bench statements` measures the difference for a look-up by primary key, its row
converted: about 21 µs through `Connection.execute` against 11 µs here (SQLite, this machine). A
certificate's ACME cycle runs about 45 such statements, a dozen inside a write transaction
that holds SQLite's one write lock meanwhile.

Transactions, the pool and error translation stay SQLAlchemy's: a statement runs inside the
caller's `Connection` (or the connection of its `Session`), a driver error is raised as the
SQLAlchemy exception `Connection.execute` would raise, and a lost connection is invalidated as
it would be. Rows are named tuples (`row.id`, `row[0]`, unpacking).

Only what these statements need is supported, and anything else is refused when the statement
is first compiled: no expanding (IN-list) parameters, no Python-side column defaults other than
constants, no `onupdate` columns.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from sqlalchemy import exc
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.orm import Session
from sqlalchemy.sql import Delete, Insert, Select, Update
from sqlalchemy.sql.compiler import SQLCompiler

Statement = Select[*tuple[Any, ...]] | Insert | Update | Delete
Params = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class _Bind:
    name: str  # as rendered in the SQL
    key: str  # the caller's parameter name
    required: bool  # False: the statement carries `value` (a literal, a bindparam default)
    value: Any
    convert: Callable[[Any], Any] | None  # the column type's bind processor


@dataclasses.dataclass(frozen=True)
class _Compiled:
    sql: str
    positions: tuple[str, ...] | None  # bind names in order, for positional paramstyles
    binds: tuple[_Bind, ...]
    defaults: tuple[tuple[str, Any], ...]  # INSERT: constant column defaults not given
    row: type[tuple[Any, ...]] | None  # named tuple of the result columns
    convert: tuple[Callable[[Any], Any] | None, ...]  # per result column


class Rows:
    """A statement's rows, fetched, and its rowcount."""

    __slots__ = ("_rows", "rowcount")

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    def __iter__(self) -> Iterator[Any]:
        return iter(self._rows)

    def first(self) -> Any | None:
        return self._rows[0] if self._rows else None

    def one_or_none(self) -> Any | None:
        if len(self._rows) > 1:
            raise exc.MultipleResultsFound("Multiple rows were found when one or none was required")
        return self.first()

    def one(self) -> Any:
        row = self.one_or_none()
        if row is None:
            raise exc.NoResultFound("No row was found when one was required")
        return row

    def scalar(self) -> Any | None:
        return self._rows[0][0] if self._rows else None

    def scalar_one(self) -> Any:
        return self.one()[0]

    def scalars(self) -> list[Any]:
        return [row[0] for row in self._rows]


class Prepared:
    """One prebuilt Core statement; `run(connection, params)` executes it (see the module)."""

    __slots__ = ("_compiled", "statement")

    def __init__(self, statement: Statement) -> None:
        self.statement = statement
        self._compiled: dict[tuple[str, frozenset[str] | None], _Compiled] = {}

    def run(
        self, executor: Connection | Session, params: Params | Sequence[Params] | None = None
    ) -> Rows:
        """Execute with one parameter set, or with several (executemany, no rows back)."""
        connection = executor.connection() if isinstance(executor, Session) else executor
        many = params is not None and not isinstance(params, Mapping)
        sets: Sequence[Params] = params if many else [params or {}]  # type: ignore[assignment,list-item]
        dialect = connection.dialect
        keys = frozenset(sets[0]) if isinstance(self.statement, Insert) else None
        compiled = self._compiled.get((dialect.name, keys))
        if compiled is None:
            compiled = self._compile(dialect, keys)
            self._compiled[(dialect.name, keys)] = compiled
        arguments = [_arguments(compiled, values) for values in sets]
        dbapi_connection = connection.connection.dbapi_connection
        assert dbapi_connection is not None
        cursor = dbapi_connection.cursor()
        try:
            try:
                if many:
                    cursor.executemany(compiled.sql, arguments)
                else:
                    cursor.execute(compiled.sql, arguments[0])
                fetched = cursor.fetchall() if cursor.description is not None else []
            except dialect.loaded_dbapi.Error as error:
                invalidated = dialect.is_disconnect(error, dbapi_connection, cursor)
                if invalidated:
                    connection.invalidate(error)
                raise exc.DBAPIError.instance(
                    compiled.sql,
                    arguments[0],
                    error,
                    dialect.loaded_dbapi.Error,
                    connection_invalidated=invalidated,
                    dialect=dialect,
                ) from None
            return Rows(_convert(compiled, fetched), cursor.rowcount)
        finally:
            cursor.close()

    def _compile(self, dialect: Dialect, keys: frozenset[str] | None) -> _Compiled:
        statement = self.statement
        defaults: list[tuple[str, Any]] = []
        options: dict[str, Any] = {}
        table = getattr(statement, "table", None)
        if isinstance(statement, Insert):
            assert keys is not None and table is not None
            for column in table.columns:
                if column.key in keys or column.default is None:
                    continue
                if not column.default.is_scalar:
                    raise ValueError(f"{column}: Prepared applies constant defaults only")
                defaults.append((column.key, column.default.arg))
            options["column_keys"] = sorted(keys | {key for key, _ in defaults})
        if isinstance(statement, Update) and table is not None:
            for column in table.columns:
                if column.onupdate is not None:
                    raise ValueError(f"{column}: Prepared does not apply onupdate")
        compiled = statement.compile(dialect=dialect, **options)
        assert isinstance(compiled, SQLCompiler)
        binds = []
        for parameter, name in compiled.bind_names.items():
            if parameter.expanding or parameter.callable is not None:
                raise ValueError(f"{name}: Prepared takes plain values only")
            binds.append(
                _Bind(
                    name,
                    parameter.key,
                    parameter.required,
                    parameter.value,
                    parameter.type.dialect_impl(dialect).bind_processor(dialect),
                )
            )
        columns = list(statement.exported_columns)
        row: type[tuple[Any, ...]] | None = None
        if columns:
            names = [str(key) for key in statement.exported_columns.keys()]  # noqa: SIM118 (iterating gives columns)
            row = collections.namedtuple("Row", names)  # type: ignore[misc,no-redef]
        return _Compiled(
            sql=compiled.string,
            positions=tuple(compiled.positiontup or ()) if dialect.positional else None,
            binds=tuple(binds),
            defaults=tuple(defaults),
            row=row,
            convert=tuple(
                column.type.dialect_impl(dialect).result_processor(dialect, None)
                for column in columns
            ),
        )


def _arguments(compiled: _Compiled, values: Params) -> Any:
    if compiled.defaults:
        values = dict(compiled.defaults) | dict(values)
    bound = {}
    for bind in compiled.binds:
        if bind.key in values:
            value = values[bind.key]
        elif not bind.required:
            value = bind.value
        else:
            raise exc.ArgumentError(f"a value is required for bind parameter {bind.key!r}")
        bound[bind.name] = value if bind.convert is None else bind.convert(value)
    if compiled.positions is None:
        return bound
    return tuple(bound[name] for name in compiled.positions)


def _convert(compiled: _Compiled, fetched: Sequence[Any]) -> list[Any]:
    if compiled.row is None or not fetched:
        return list(fetched)
    row, convert = compiled.row, compiled.convert
    if not any(convert):
        return [row(*values) for values in fetched]
    return [
        row(*[value if c is None else c(value) for c, value in zip(convert, values, strict=True)])
        for values in fetched
    ]
