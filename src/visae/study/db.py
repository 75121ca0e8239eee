"""A study's database: SQLite (a file, the default) or PostgreSQL, through SQLAlchemy Core.

Four tables: `visae_study` (schema version, the study's name, the plan's fingerprint and the
spec, so a database belongs to one study and scores offline on its own), `participants`,
`trials` (every participant's trials, fixed when they arrive) and `responses` (at most one per
trial: the trial id is its primary key, so a second submission is refused by the database
itself). A response is acknowledged only after its transaction commits; SQLite runs in WAL mode
with synchronous=NORMAL, durable against a killed server (not against a power cut between the
commit and the next checkpoint), and writes take the lock up front (BEGIN IMMEDIATE) so
concurrent participants wait their turn instead of failing.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visae.errors import VisaeError, first_line

SCHEMA_VERSION = 1
META_TABLE = "visae_study"
SQLITE_PRAGMAS = ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=30000", "foreign_keys=ON")


def database_url(db: str) -> str:
    """A SQLAlchemy URL from what a user types: a file path (SQLite) or postgresql://..."""
    if db.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + db.split("://", 1)[1]
    if "://" in db:
        if db.startswith(("sqlite://", "postgresql+psycopg://")):
            return db
        raise VisaeError(f"database {db!r}: give a file path (SQLite) or a postgresql:// URL")
    return f"sqlite:///{Path(db).resolve()}"


@dataclass
class Tables:
    meta: Any
    participants: Any
    trials: Any
    responses: Any


def tables() -> tuple[Any, Tables]:
    """The schema: SQLAlchemy metadata and the four tables."""
    from sqlalchemy import (
        Column,
        Float,
        ForeignKey,
        Integer,
        MetaData,
        String,
        Table,
        Text,
        UniqueConstraint,
    )

    md = MetaData()
    meta = Table(META_TABLE, md, Column("key", String(64), primary_key=True), Column("value", Text))
    participants = Table(
        "participants",
        md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("token_sha", String(64), unique=True, nullable=False),
        Column("external_id", String(128), unique=True, nullable=True),
        Column("params", Text, nullable=False),
        Column("stage", String(16), nullable=False),
        Column("completion_code", String(64), nullable=False),
        Column("comments", Text, nullable=True),
        Column("created_at", Float, nullable=False),
        Column("completed_at", Float, nullable=True),
    )
    trials = Table(
        "trials",
        md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("participant_id", Integer, ForeignKey("participants.id"), nullable=False),
        Column("position", Integer, nullable=False),
        Column("kind", String(16), nullable=False),
        Column("protocol", String(16), nullable=False),
        Column("sae", String(256), nullable=False),
        Column("latent", Integer, nullable=False),
        Column("payload", Text, nullable=False),
        Column("shown_at", Float, nullable=True),
        UniqueConstraint("participant_id", "position"),
    )
    responses = Table(
        "responses",
        md,
        Column("trial_id", Integer, ForeignKey("trials.id"), primary_key=True),
        Column("participant_id", Integer, ForeignKey("participants.id"), nullable=False),
        Column("clicks", Text, nullable=False),
        Column("pick", Integer, nullable=True),
        Column("name", Text, nullable=True),
        Column("seconds", Float, nullable=False),
        Column("passed", Integer, nullable=True),
        Column("raw", Float, nullable=True),
        Column("chance", Float, nullable=True),
        Column("created_at", Float, nullable=False),
    )
    return md, Tables(meta, participants, trials, responses)


class StudyDB:
    """The engine and tables of one study's database, checked against the study on open."""

    def __init__(self, url: str) -> None:
        self.url = database_url(url)
        self.sqlite = self.url.startswith("sqlite")
        if self.sqlite:
            # one writer at a time, queued here rather than in SQLite's busy handler (which
            # sleeps in steps of up to 100 ms); readers see the last commit and never wait
            self.engine = self._engine(url, "BEGIN IMMEDIATE")
            self.reader = self._engine(url, "BEGIN")
            self._write_lock: Any = threading.Lock()
        else:
            self.engine = self.reader = self._engine(url, None)
            self._write_lock = nullcontext()
        self.metadata, self.t = tables()

    def _engine(self, url: str, begin: str | None) -> Any:
        from sqlalchemy import create_engine, event

        kw: dict[str, Any] = {"pool_size": 20, "max_overflow": 20}
        kw |= {"connect_args": {"timeout": 30}} if self.sqlite else {"pool_pre_ping": True}
        try:
            engine = create_engine(self.url, **kw)
        except Exception as e:  # a bad URL or a missing driver
            raise VisaeError(f"cannot open database {url}: {first_line(e)}") from None
        if begin is not None:

            @event.listens_for(engine, "connect")
            def _pragmas(conn: Any, _record: Any) -> None:
                conn.isolation_level = None  # SQLAlchemy's BEGIN below, not the driver's
                cur = conn.cursor()
                for pragma in SQLITE_PRAGMAS:
                    cur.execute(f"PRAGMA {pragma}")
                cur.close()

            @event.listens_for(engine, "begin")
            def _begin(conn: Any) -> None:
                conn.exec_driver_sql(begin)

        return engine

    @contextmanager
    def begin(self) -> Iterator[Any]:
        """A write transaction; committed when the block ends, rolled back if it raises."""
        with self._write_lock, self._transaction(self.engine) as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Any]:
        """A read-only transaction: one consistent snapshot, taking no write lock."""
        with self._transaction(self.reader) as conn:
            yield conn

    @contextmanager
    def _transaction(self, engine: Any) -> Iterator[Any]:
        from sqlalchemy.exc import OperationalError

        try:
            with engine.begin() as conn:
                yield conn
        except OperationalError as e:
            raise VisaeError(f"database {self.display}: {first_line(e.orig or e)}") from None

    @property
    def display(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    def read_meta(self) -> dict[str, str] | None:
        """The study's metadata, or None in an empty database; refuses a database that holds
        other tables but no visae study."""
        from sqlalchemy import inspect, select

        with self.read() as conn:
            names = set(inspect(conn).get_table_names())
            if META_TABLE not in names:
                if names & {"participants", "trials", "responses"}:
                    raise VisaeError(f"database {self.display} is not a visae study database")
                return None
            rows = conn.execute(select(self.t.meta)).all()
        return {r.key: r.value for r in rows}

    def open(self, name: str, fingerprint: str, spec: dict[str, Any]) -> None:
        """Create the tables for a new study, or check that the database is this study's."""
        meta = self.read_meta()
        if meta is None:
            self.metadata.create_all(self.engine)
            with self.begin() as conn:
                conn.execute(
                    self.t.meta.insert(),
                    [
                        {"key": "schema_version", "value": str(SCHEMA_VERSION)},
                        {"key": "study", "value": name},
                        {"key": "fingerprint", "value": fingerprint},
                        {"key": "spec", "value": json.dumps(spec)},
                        {"key": "created_at", "value": str(time.time())},
                    ],
                )
            return
        check_schema(meta, self.display)
        if meta.get("fingerprint") != fingerprint:
            raise VisaeError(
                f"database {self.display} holds study {meta.get('study')!r} (plan "
                f"{meta.get('fingerprint', '')[:12]}), not this spec's {name!r} (plan "
                f"{fingerprint[:12]}): give another --db"
            )

    def existing(self) -> dict[str, str]:
        """The metadata of a database that must already hold a study (for offline scoring)."""
        meta = self.read_meta()
        if meta is None:
            raise VisaeError(f"database {self.display} holds no visae study")
        check_schema(meta, self.display)
        return meta

    def rows(self) -> list[dict[str, str]]:
        """Every response joined with its trial, in the responses-CSV format (plus the
        participant's recruitment ids and typed name)."""
        from sqlalchemy import select

        t = self.t
        q = (
            select(
                t.participants.c.id.label("pid"),
                t.participants.c.params,
                t.trials.c.position,
                t.trials.c.kind,
                t.trials.c.protocol,
                t.trials.c.sae,
                t.trials.c.latent,
                t.trials.c.payload,
                t.responses,
            )
            .join(t.trials, t.trials.c.id == t.responses.c.trial_id)
            .join(t.participants, t.participants.c.id == t.responses.c.participant_id)
            .order_by(t.participants.c.id, t.trials.c.position)
        )
        with self.read() as conn:
            result = conn.execute(q).all()
        return [export_row(r) for r in result]


def check_schema(meta: dict[str, str], where: str) -> None:
    version = meta.get("schema_version")
    if version != str(SCHEMA_VERSION):
        raise VisaeError(
            f"database {where} has study schema version {version}; this visae reads "
            f"{SCHEMA_VERSION}"
        )


RECRUITMENT = ("PROLIFIC_PID", "STUDY_ID", "SESSION_ID")


def export_row(r: Any) -> dict[str, str]:
    """One response as the responses CSV writes it (every value a string)."""
    payload = json.loads(r.payload)
    params = json.loads(r.params)
    choices = payload.get("choices", [])
    row = {
        "participant": f"p{r.pid}",
        "kind": r.kind,
        "protocol": r.protocol,
        "sae": r.sae,
        "latent": r.latent if r.latent >= 0 else "",
        "image": payload.get("query", ""),
        "clicks": r.clicks,
        "pick": "" if r.pick is None else r.pick,
        "correct": payload.get("correct", ""),
        "choices": len(choices) if choices else "",
        "seconds": f"{r.seconds:.3f}",
        "passed": "" if r.passed is None else r.passed,
        "name": r.name or "",
        "position": r.position,
        "raw": "" if r.raw is None else f"{r.raw:.6f}",
        "chance": "" if r.chance is None else f"{r.chance:.6f}",
    } | {k.lower(): params.get(k, "") for k in RECRUITMENT}
    return {k: str(v) for k, v in row.items()}
