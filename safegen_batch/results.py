"""The results file: JSON Lines, one line per finished task, append-only.

``status``: ``ok`` (images on disk), ``error`` (the server refused or failed the row) or
``skipped`` (not run: a missing value or the pre-flight check; ``skip`` holds the reason).

Every line is written with one ``write`` of the whole line, then ``flush`` + ``fsync``, only
after the task's images are on disk; so a crash (of the runner, the server or the machine)
loses no finished row and never leaves a row without its images. A torn last line (the runner
killed mid-write) is skipped when reading and the next append starts on a fresh line, so it
never corrupts the following row. An exclusive lock file keeps two runners off one file.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

RESULTS_NAME = "results.jsonl"


class ResultsLockedError(RuntimeError):
    pass


def read_jsonl(path: str | Path) -> tuple[list[dict], int]:
    """(rows, number of unreadable lines). Unreadable lines (a torn write) are skipped."""
    path = Path(path)
    rows: list[dict] = []
    bad = 0
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return rows, 0
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            bad += 1
            continue
        if isinstance(obj, dict):
            rows.append(obj)
        else:
            bad += 1
    return rows, bad


def ok_keys(rows: Iterable[Mapping[str, Any]]) -> set[str]:
    return {r["key"] for r in rows if r.get("status") == "ok" and r.get("key")}


def failed_keys(rows: Iterable[Mapping[str, Any]]) -> set[str]:
    """Keys recorded as errors (``status: skipped`` rows are not failures: checked again)."""
    return {r["key"] for r in rows if r.get("status") == "error" and r.get("key")}


def latest_by_key(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict]:
    """One row per key: the last ok row if there is one, else the last row."""
    out: dict[str, dict] = {}
    for r in rows:
        k = r.get("key")
        if not k:
            continue
        prev = out.get(k)
        if prev is None or r.get("status") == "ok" or prev.get("status") != "ok":
            out[k] = dict(r)
    return out


class ResultsWriter:
    """Appends rows to ``path`` (thread-safe; one line per row; flush + fsync each)."""

    def __init__(self, path: str | Path, lock: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._lock_fh = None
        if lock and fcntl is not None:
            self._lock_fh = open(self.path.with_name(self.path.name + ".lock"), "w")
            try:
                fcntl.flock(self._lock_fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._lock_fh.close()
                self._lock_fh = None
                raise ResultsLockedError(f"another batch runner is writing {self.path}") from None
        existed = self.path.exists()
        self._fh = open(self.path, "ab")
        self._need_newline = False
        if existed and self.path.stat().st_size > 0:
            with open(self.path, "rb") as r:
                r.seek(-1, os.SEEK_END)
                self._need_newline = r.read(1) != b"\n"   # a torn last line
        elif not existed:
            _fsync_dir(self.path.parent)

    def append(self, row: Mapping[str, Any]) -> None:
        data = (json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        with self._lock:
            if self._need_newline:
                data = b"\n" + data
                self._need_newline = False
            self._fh.write(data)
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None
        if self._lock_fh is not None:
            self._lock_fh.close()
            self._lock_fh = None

    def __enter__(self) -> "ResultsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(str(d), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_file_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary name, fsync, rename: never a half file under ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
