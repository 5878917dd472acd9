"""The tags CSV: chosen DICOM values of each exported series, from Orthanc's stored tags.

One row per instance (or per series with `tags.level: series`), header = alias or keyword,
values as Orthanc stores them (dates YYYYMMDD, multiple values joined by `\\`). Only the
tags are read (`/series/{id}/instances-tags?short`), never the pixel data.

Rows are appended series by series. The journal remembers how many bytes of the file are
committed (`steps_meta`); an append first records where it starts, so after a kill -9 the
uncommitted tail is cut off and the series appended again: no duplicate, no half row.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .disk import NO_ROOM
from .export import StepFailed, instance_order, keyword_problem, tag_key

LEVELS = ("instance", "series")
_ITEM_KEYS = ("keyword", "alias", "default")


@dataclass(frozen=True)
class Column:
    """One CSV column: which tag, under which header, and what to write when it is missing."""

    keyword: str
    tag: str
    header: str
    default: str


def parse_columns(items: Any) -> tuple[Column, ...]:
    """`tags.keywords` → columns; raises ValueError("item N: ...") on the first problem."""
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError("must be a non-empty list of keywords or {keyword, alias, default} mappings")
    columns: list[Column] = []
    headers: set[str] = set()
    for n, item in enumerate(items, 1):
        column = _column(n, item)
        if column.header in headers:
            raise ValueError(f"item {n}: column {column.header!r} appears twice (give it another alias)")
        headers.add(column.header)
        columns.append(column)
    return tuple(columns)


def _column(n: int, item: Any) -> Column:
    if isinstance(item, str):
        keyword, alias, default = item, None, ""
    elif isinstance(item, Mapping):
        unknown = [str(k) for k in item if k not in _ITEM_KEYS]
        if unknown:
            raise ValueError(f"item {n}: unknown key {unknown[0]!r} (known: {', '.join(_ITEM_KEYS)})")
        if "keyword" not in item:
            raise ValueError(f"item {n}: keyword is required")
        keyword, alias, default = item["keyword"], item.get("alias"), item.get("default", "")
    else:
        raise ValueError(f"item {n}: must be a keyword or a mapping with keyword/alias/default, got {item!r}")
    problem = keyword_problem(keyword)
    if problem is not None:
        raise ValueError(f"item {n}: {problem}")
    if alias is not None and (not isinstance(alias, str) or not alias.strip() or _has_control(alias)):
        raise ValueError(f"item {n}: alias must be a non-empty single-line string, got {alias!r}")
    if default is None:
        default = ""
    if isinstance(default, bool) or not isinstance(default, (str, int, float)) or _has_control(str(default)):
        raise ValueError(f"item {n}: default must be a single-line text or number, got {default!r}")
    return Column(keyword, tag_key(keyword), (alias or keyword).strip(), str(default))


def _has_control(text: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


@dataclass(frozen=True)
class TagsSettings:
    """`tags` of the config, checked."""

    file: Path
    level: str
    columns: tuple[Column, ...]

    @property
    def header(self) -> list[str]:
        return [c.header for c in self.columns]

    def fingerprint(self) -> dict[str, Any]:
        return {
            "file": str(self.file),
            "level": self.level,
            "columns": [[c.keyword, c.header, c.default] for c in self.columns],
        }


def rows_for(settings: TagsSettings, instance_tags: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    """The CSV rows of one series: every instance in InstanceNumber order, or its first one.

    A value Orthanc does not have (absent, or binary) is the column's default; an empty
    value stays empty, as stored.
    """
    ordered = [tags for _, tags in sorted(instance_tags.items(), key=instance_order)]
    if settings.level == "series":
        ordered = ordered[:1]
    return [[_value(tags.get(c.tag), c.default) for c in settings.columns] for tags in ordered]


def _value(raw: Any, default: str) -> str:
    if raw is None:
        return default
    if isinstance(raw, str):
        return raw
    return json.dumps(raw, separators=(",", ":"))  # not reachable with validated keywords


def encode_rows(rows: Sequence[Sequence[str]]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue().encode("utf-8")


# -- the file ------------------------------------------------------------------------------------

_PATH, _FP, _END, _APPENDING = "tags.path", "tags.fingerprint", "tags.end", "tags.appending"


class TagsFile:
    """The CSV, appended under an exclusive lock with a journal-backed commit point.

    `open` settles the file before the first append: cut an uncommitted tail, start again
    when the settings changed or the file was lost (then `reset` is True: every series'
    rows must be written again), or refuse (`blocked`) a file this journal did not write.
    A disk with no room for that leaves it to the first append (which then waits for room).
    """

    def __init__(self, db: sqlite3.Connection, settings: TagsSettings, fingerprint: str) -> None:
        self.db = db
        self.settings = settings
        self.path = settings.file
        self.fingerprint = fingerprint
        self.blocked: str | None = None
        self.reset = False
        self._fd: int | None = None
        self._reopen = False  # open found no room: the first append opens it
        self._end = 0

    # -- opening -----------------------------------------------------------------------

    def open(self) -> None:
        try:
            self._open()
        except OSError as exc:
            if exc.errno not in NO_ROOM:
                raise
            self.close()
            self._reopen = True

    def _open(self) -> None:
        meta = dict(self.db.execute("SELECT key, value FROM steps_meta WHERE key LIKE 'tags.%'").fetchall())
        ours = meta.get(_PATH) == str(self.path)
        existing = _file_size(self.path)
        if existing and not ours:
            self.blocked = (
                f"tags.file {self.path.name} already exists and was not written by this journal:"
                " remove it or choose another file"
            )
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            self.blocked = f"tags.file {self.path.name} is being written by another run"
            return
        self._fd = fd
        size = os.fstat(fd).st_size
        if not ours or not size or meta.get(_FP) != self.fingerprint:
            self._start_fresh()
            return
        end = int(meta[_END])
        if _APPENDING in meta:
            end = int(meta[_APPENDING])  # a run died mid-append: its rows were never committed
            os.ftruncate(fd, end)
            os.fsync(fd)
            self._commit_end(end)
        elif size < end:
            self._start_fresh()  # cut short outside this tool: write every series again
            return
        elif size > end:
            self.blocked = f"tags.file {self.path.name} was changed since this journal last wrote it: remove it"
            return
        self._end = end

    def _start_fresh(self) -> None:
        assert self._fd is not None
        header = encode_rows([self.settings.header])
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, header, 0)
        os.fsync(self._fd)
        self._end = len(header)
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute("DELETE FROM steps_meta WHERE key LIKE 'tags.%'")
            self.db.executemany(
                "INSERT INTO steps_meta (key, value) VALUES (?, ?)",
                [(_PATH, str(self.path)), (_FP, self.fingerprint), (_END, str(self._end))],
            )
            # Rows written before are gone with the old file: every series is due again.
            self.db.execute("UPDATE steps SET state='pending', reason=NULL WHERE step='tags' AND state='done'")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
        self.reset = True

    def _commit_end(self, end: int) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        self.db.execute("INSERT OR REPLACE INTO steps_meta (key, value) VALUES (?, ?)", (_END, str(end)))
        self.db.execute("DELETE FROM steps_meta WHERE key=?", (_APPENDING,))
        self.db.execute("COMMIT")

    # -- appending ---------------------------------------------------------------------

    def append(self, rows: Sequence[Sequence[str]], commit: Callable[[], None]) -> None:
        """Append rows; `commit` runs inside the transaction that makes them count.

        Between the two transactions the journal says "an append started at offset N":
        whatever lies beyond N after a crash was never committed and is cut off on open.
        """
        if self._reopen:
            try:
                self._open()
            except OSError:
                self.close()
                raise  # still no room: the step waits
            self._reopen = False
        if self.blocked is not None or self._fd is None:
            raise StepFailed(self.blocked or "tags.file is not open")
        data = encode_rows(rows)
        start = self._end
        self.db.execute("INSERT OR REPLACE INTO steps_meta (key, value) VALUES (?, ?)", (_APPENDING, str(start)))
        os.ftruncate(self._fd, start)
        written = 0
        while written < len(data):
            written += os.pwrite(self._fd, data[written:], start + written)
        os.fsync(self._fd)
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute(
                "INSERT OR REPLACE INTO steps_meta (key, value) VALUES (?, ?)", (_END, str(start + len(data)))
            )
            self.db.execute("DELETE FROM steps_meta WHERE key=?", (_APPENDING,))
            commit()
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
        self._end = start + len(data)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # also releases the lock
            self._fd = None


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
