"""The Batch API's store: files, batches and per-line results behind one interface.

``BatchStore`` runs on SQLAlchemy 2's asyncio engine, over SQLite (``aiosqlite``, a file: the
embedded default) or PostgreSQL (``asyncpg``, by URL). Every write is one transaction, so a
result counts only once its transaction has committed; a server killed mid-job resumes from
what was committed (``done_lines``).

The schema is versioned: ``qlm_batch_schema`` holds the applied version, and ``MIGRATIONS``
lists the steps from each version to the next; ``open()`` applies the missing ones in order.

Times are Unix seconds (integers), as OpenAI's objects carry them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    delete,
    event,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

# Statuses in which a job still has work (the runner resumes them at start).
ACTIVE_STATUSES = ("validating", "in_progress", "finalizing", "cancelling")
STATUSES = ("validating", "failed", "in_progress", "finalizing", "completed", "expired",
            "cancelling", "cancelled")

metadata = MetaData()

schema_table = Table(
    "qlm_batch_schema", metadata,
    Column("version", Integer, nullable=False),
)

files_table = Table(
    "qlm_batch_files", metadata,
    Column("id", String(64), primary_key=True),
    Column("tenant", String(256), nullable=False, index=True),
    Column("purpose", String(32), nullable=False),
    Column("filename", String(1024), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("created_ns", BigInteger, nullable=False),  # ordering of lists (newest first)
    Column("path", Text, nullable=False),  # the content on local disk
)

batches_table = Table(
    "qlm_batches", metadata,
    Column("id", String(64), primary_key=True),
    Column("tenant", String(256), nullable=False, index=True),
    Column("input_file_id", String(64), nullable=False),
    Column("endpoint", String(64), nullable=False),
    Column("completion_window", String(16), nullable=False),
    Column("status", String(16), nullable=False, index=True),
    Column("num_lines", Integer, nullable=False),
    Column("output_file_id", String(64)),
    Column("error_file_id", String(64)),
    Column("metadata", Text),  # JSON object or NULL
    Column("errors", Text),  # JSON list of {code, message, line, param} or NULL
    Column("created_at", BigInteger, nullable=False),
    Column("created_ns", BigInteger, nullable=False),  # ordering of lists (newest first)
    Column("in_progress_at", BigInteger),
    Column("expires_at", BigInteger, nullable=False),
    Column("finalizing_at", BigInteger),
    Column("completed_at", BigInteger),
    Column("failed_at", BigInteger),
    Column("expired_at", BigInteger),
    Column("cancelling_at", BigInteger),
    Column("cancelled_at", BigInteger),
)

results_table = Table(
    "qlm_batch_results", metadata,
    Column("batch_id", String(64), nullable=False),
    Column("line_no", Integer, nullable=False),  # 1-based line of the input file
    Column("custom_id", Text),  # NULL for a line that could not be parsed
    Column("ok", Boolean, nullable=False),  # True: output file; False: error file
    Column("body", Text, nullable=False),  # the output or error line, JSON
    PrimaryKeyConstraint("batch_id", "line_no"),
)


def _v1(conn: Connection) -> None:
    for t in (files_table, batches_table, results_table):
        t.create(conn, checkfirst=True)


# version reached -> step from the version before it
MIGRATIONS: list[tuple[int, Callable[[Connection], None]]] = [(1, _v1)]


@dataclass(slots=True)
class FileRecord:
    """A stored file (an upload, or a batch's output or error file)."""

    id: str
    tenant: str
    purpose: str
    filename: str
    bytes: int
    created_at: int
    path: str
    created_ns: int = 0  # time.time_ns() at creation: orders lists

    def to_openai(self) -> dict:
        return {"id": self.id, "object": "file", "bytes": self.bytes,
                "created_at": self.created_at, "filename": self.filename,
                "purpose": self.purpose, "status": "processed", "status_details": None}


@dataclass(slots=True)
class BatchRecord:
    """A batch job as stored; ``num_completed``/``num_failed`` are counted from committed
    results when the record is read."""

    id: str
    tenant: str
    input_file_id: str
    endpoint: str
    completion_window: str
    status: str
    num_lines: int
    created_at: int
    expires_at: int
    created_ns: int = 0  # time.time_ns() at creation: orders lists
    output_file_id: str | None = None
    error_file_id: str | None = None
    metadata: dict | None = None
    errors: list[dict] | None = None
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    num_completed: int = 0
    num_failed: int = 0

    def to_openai(self) -> dict:
        errors = None
        if self.errors:
            errors = {"object": "list", "data": self.errors}
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": errors,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "in_progress_at": self.in_progress_at,
            "expires_at": self.expires_at,
            "finalizing_at": self.finalizing_at,
            "completed_at": self.completed_at,
            "failed_at": self.failed_at,
            "expired_at": self.expired_at,
            "cancelling_at": self.cancelling_at,
            "cancelled_at": self.cancelled_at,
            "request_counts": {"total": self.num_lines, "completed": self.num_completed,
                               "failed": self.num_failed},
            "metadata": self.metadata,
        }


@dataclass(slots=True)
class ResultRow:
    """One line's outcome, written to the output file (``ok``) or the error file."""

    line_no: int
    custom_id: str | None
    ok: bool
    body: str  # the JSON line, without the newline


def database_url(store_url: str | None, sqlite_path: str) -> str:
    """The SQLAlchemy URL: a ``postgresql://`` URL gets the asyncpg driver; without one, the
    SQLite file."""
    if store_url:
        url = make_url(store_url)
        if url.drivername in ("postgresql", "postgres"):
            url = url.set(drivername="postgresql+asyncpg")
        elif url.drivername == "sqlite":
            url = url.set(drivername="sqlite+aiosqlite")
        return url.render_as_string(hide_password=False)
    p = Path(sqlite_path).expanduser().resolve()
    return f"sqlite+aiosqlite:///{p}"


def _batch_from_row(row) -> BatchRecord:
    m = row._mapping
    return BatchRecord(
        id=m["id"], tenant=m["tenant"], input_file_id=m["input_file_id"],
        endpoint=m["endpoint"], completion_window=m["completion_window"], status=m["status"],
        num_lines=m["num_lines"], created_at=m["created_at"], expires_at=m["expires_at"],
        created_ns=m["created_ns"],
        output_file_id=m["output_file_id"], error_file_id=m["error_file_id"],
        metadata=json.loads(m["metadata"]) if m["metadata"] else None,
        errors=json.loads(m["errors"]) if m["errors"] else None,
        in_progress_at=m["in_progress_at"], finalizing_at=m["finalizing_at"],
        completed_at=m["completed_at"], failed_at=m["failed_at"], expired_at=m["expired_at"],
        cancelling_at=m["cancelling_at"], cancelled_at=m["cancelled_at"],
    )


def _file_from_row(row) -> FileRecord:
    m = row._mapping
    return FileRecord(id=m["id"], tenant=m["tenant"], purpose=m["purpose"],
                      filename=m["filename"], bytes=m["bytes"], created_at=m["created_at"],
                      path=m["path"], created_ns=m["created_ns"])


class BatchStore:
    """Files, batches and results in one database (see the module docstring). Create with
    the URL from ``database_url``, then ``await open()`` once before use and ``await close()``
    at shutdown. All methods are coroutines on the server's event loop."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.dialect = make_url(url).get_backend_name()
        self.engine: AsyncEngine | None = None

    def exists(self) -> bool:
        """False for a SQLite file not created yet (a server that never saw a batch)."""
        if self.dialect != "sqlite":
            return True
        db = make_url(self.url).database
        return bool(db) and Path(db).exists()

    async def open(self) -> None:
        """Connect and bring the schema to ``SCHEMA_VERSION`` (creating the SQLite file and
        its folder)."""
        kw: dict = {}
        if self.dialect == "sqlite":
            db = make_url(self.url).database
            if db:
                Path(db).parent.mkdir(parents=True, exist_ok=True)
            # A writer waits for another's lock rather than failing at once.
            kw["connect_args"] = {"timeout": 30}
        self.engine = create_async_engine(self.url, **kw)
        if self.dialect == "sqlite":
            @event.listens_for(self.engine.sync_engine, "connect")
            def _pragmas(dbapi_conn, _record) -> None:
                cur = dbapi_conn.cursor()
                # WAL: readers never block the writer. synchronous=FULL: a commit is on disk
                # when it returns, so a result that counted survives a crash of the machine.
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=FULL")
                cur.close()

        async with self.engine.begin() as conn:
            await conn.run_sync(self._migrate)

    @staticmethod
    def _migrate(conn: Connection) -> None:
        schema_table.create(conn, checkfirst=True)
        current = conn.execute(select(func.max(schema_table.c.version))).scalar() or 0
        if current > SCHEMA_VERSION:
            raise RuntimeError(f"the batch store's schema is version {current}, newer than "
                               f"this qlm-opt's {SCHEMA_VERSION}")
        for version, step in MIGRATIONS:
            if version > current:
                log.info("batch store: migrating schema to version %d", version)
                step(conn)
                conn.execute(delete(schema_table))
                conn.execute(insert(schema_table).values(version=version))

    async def schema_version(self) -> int:
        async with self.engine.connect() as conn:
            return (await conn.execute(select(func.max(schema_table.c.version)))).scalar() or 0

    async def close(self) -> None:
        if self.engine is not None:
            await self.engine.dispose()
            self.engine = None

    # -- files --------------------------------------------------------------------------------
    async def add_file(self, rec: FileRecord) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(insert(files_table).values(
                id=rec.id, tenant=rec.tenant, purpose=rec.purpose, filename=rec.filename,
                bytes=rec.bytes, created_at=rec.created_at, path=rec.path,
                created_ns=rec.created_ns))

    async def get_file(self, file_id: str) -> FileRecord | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(
                select(files_table).where(files_table.c.id == file_id))).first()
        return _file_from_row(row) if row is not None else None

    async def list_files(self, tenant: str | None, purpose: str | None, after: str | None,
                         limit: int) -> list[FileRecord]:
        """Newest first; ``tenant`` None lists every tenant's (the admin key)."""
        q = select(files_table)
        if tenant is not None:
            q = q.where(files_table.c.tenant == tenant)
        if purpose is not None:
            q = q.where(files_table.c.purpose == purpose)
        q = await self._after(q, files_table, after)
        q = q.order_by(files_table.c.created_ns.desc(), files_table.c.id.desc()).limit(limit)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(q)).all()
        return [_file_from_row(r) for r in rows]

    async def delete_file(self, file_id: str) -> bool:
        async with self.engine.begin() as conn:
            res = await conn.execute(delete(files_table).where(files_table.c.id == file_id))
        return res.rowcount > 0

    async def file_in_use(self, file_id: str) -> bool:
        """True when an unfinished batch reads this file."""
        q = select(func.count()).select_from(batches_table).where(
            batches_table.c.input_file_id == file_id,
            batches_table.c.status.in_(ACTIVE_STATUSES))
        async with self.engine.connect() as conn:
            return ((await conn.execute(q)).scalar() or 0) > 0

    # -- batches ------------------------------------------------------------------------------
    async def add_batch(self, rec: BatchRecord, line_errors: Iterable[ResultRow]) -> None:
        """The batch and the errors of its lines that failed validation, in one
        transaction: either both are stored or neither."""
        async with self.engine.begin() as conn:
            await conn.execute(insert(batches_table).values(
                id=rec.id, tenant=rec.tenant, input_file_id=rec.input_file_id,
                endpoint=rec.endpoint, completion_window=rec.completion_window,
                status=rec.status, num_lines=rec.num_lines, created_at=rec.created_at,
                created_ns=rec.created_ns,
                in_progress_at=rec.in_progress_at, expires_at=rec.expires_at,
                metadata=json.dumps(rec.metadata) if rec.metadata is not None else None,
                errors=json.dumps(rec.errors) if rec.errors else None))
            rows = [_result_values(rec.id, r) for r in line_errors]
            if rows:
                await conn.execute(self._insert_new_results(), rows)

    async def get_batch(self, batch_id: str) -> BatchRecord | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(
                select(batches_table).where(batches_table.c.id == batch_id))).first()
            if row is None:
                return None
            rec = _batch_from_row(row)
            await self._fill_counts(conn, [rec])
        return rec

    async def list_batches(self, tenant: str | None, after: str | None,
                           limit: int) -> list[BatchRecord]:
        """Newest first, starting after the batch ``after``; ``tenant`` None: all tenants."""
        q = select(batches_table)
        if tenant is not None:
            q = q.where(batches_table.c.tenant == tenant)
        q = await self._after(q, batches_table, after)
        q = q.order_by(batches_table.c.created_ns.desc(), batches_table.c.id.desc())
        async with self.engine.connect() as conn:
            rows = (await conn.execute(q.limit(limit))).all()
            recs = [_batch_from_row(r) for r in rows]
            await self._fill_counts(conn, recs)
        return recs

    async def _after(self, q, table, after: str | None):
        if after is None:
            return q
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(table.c.created_ns, table.c.id).where(
                table.c.id == after))).first()
        if row is None:
            return q.where(text("1 = 0"))
        at, aid = row
        return q.where(or_(table.c.created_ns < at,
                           (table.c.created_ns == at) & (table.c.id < aid)))

    async def _fill_counts(self, conn, recs: list[BatchRecord]) -> None:
        if not recs:
            return
        by_id = {r.id: r for r in recs}
        q = (select(results_table.c.batch_id, results_table.c.ok, func.count())
             .where(results_table.c.batch_id.in_(list(by_id)))
             .group_by(results_table.c.batch_id, results_table.c.ok))
        for bid, ok, n in (await conn.execute(q)).all():
            if ok:
                by_id[bid].num_completed = n
            else:
                by_id[bid].num_failed = n

    async def active_batches(self) -> list[BatchRecord]:
        """Jobs with work left, oldest first (resumed by the runner at start)."""
        q = (select(batches_table).where(batches_table.c.status.in_(ACTIVE_STATUSES))
             .order_by(batches_table.c.created_ns, batches_table.c.id))
        async with self.engine.connect() as conn:
            return [_batch_from_row(r) for r in (await conn.execute(q)).all()]

    async def count_by_status(self) -> dict[str, int]:
        q = select(batches_table.c.status, func.count()).group_by(batches_table.c.status)
        async with self.engine.connect() as conn:
            return {s: n for s, n in (await conn.execute(q)).all()}

    async def set_status(self, batch_id: str, status: str, *, only_from: Iterable[str] = (),
                         **fields) -> bool:
        """Move a batch to ``status`` and set ``fields`` (timestamps, file ids); with
        ``only_from``, only when its status is one of those. True when a row changed."""
        q = update(batches_table).where(batches_table.c.id == batch_id)
        only = tuple(only_from)
        if only:
            q = q.where(batches_table.c.status.in_(only))
        async with self.engine.begin() as conn:
            res = await conn.execute(q.values(status=status, **fields))
        return res.rowcount > 0

    async def finish_batch(self, batch_id: str, status: str, files: list[FileRecord],
                           **fields) -> None:
        """Record the result files and the final status in one transaction."""
        async with self.engine.begin() as conn:
            for f in files:
                await conn.execute(delete(files_table).where(files_table.c.id == f.id))
                await conn.execute(insert(files_table).values(
                    id=f.id, tenant=f.tenant, purpose=f.purpose, filename=f.filename,
                    bytes=f.bytes, created_at=f.created_at, path=f.path,
                    created_ns=f.created_ns))
            await conn.execute(update(batches_table).where(batches_table.c.id == batch_id)
                               .values(status=status, **fields))

    # -- results ------------------------------------------------------------------------------
    async def add_results(self, batch_id: str, rows: list[ResultRow]) -> None:
        """Commit lines' results in one transaction. A line that already has a result keeps
        it (a retried commit whose first try did commit writes nothing twice)."""
        if not rows:
            return
        async with self.engine.begin() as conn:
            await conn.execute(self._insert_new_results(), [_result_values(batch_id, r)
                                                            for r in rows])

    def _insert_new_results(self):
        if self.dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        elif self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        else:
            return insert(results_table)
        return dialect_insert(results_table).on_conflict_do_nothing(
            index_elements=["batch_id", "line_no"])

    async def done_lines(self, batch_id: str) -> set[int]:
        """Line numbers that have a committed result."""
        q = select(results_table.c.line_no).where(results_table.c.batch_id == batch_id)
        async with self.engine.connect() as conn:
            return set((await conn.execute(q)).scalars().all())

    async def iter_results(self, batch_id: str, ok: bool,
                           chunk: int = 2000) -> AsyncIterator[ResultRow]:
        """Committed results of one kind in line order, read in chunks (a 50,000-line job is
        never all in memory)."""
        last = 0
        while True:
            q = (select(results_table.c.line_no, results_table.c.custom_id,
                        results_table.c.body)
                 .where(results_table.c.batch_id == batch_id, results_table.c.ok == ok,
                        results_table.c.line_no > last)
                 .order_by(results_table.c.line_no).limit(chunk))
            async with self.engine.connect() as conn:
                rows = (await conn.execute(q)).all()
            for line_no, cid, body in rows:
                yield ResultRow(line_no, cid, ok, body)
            if len(rows) < chunk:
                return
            last = rows[-1][0]


def _result_values(batch_id: str, r: ResultRow) -> dict:
    return {"batch_id": batch_id, "line_no": r.line_no, "custom_id": r.custom_id,
            "ok": r.ok, "body": r.body}
