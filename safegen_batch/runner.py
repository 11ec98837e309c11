"""The batch runner: prompt rows -> prompts on one or more ComfyUI servers -> images + JSONL.

Balancing: one worker thread per server, all pulling tasks from one shared queue; each keeps at
most ``inflight`` prompts (default 2) queued on its server, so a server never idles between
prompts while the runner fetches the previous result, and a faster server takes more tasks.

Each worker holds one websocket (its own client id) and follows its prompts' events:
``progress`` drives the progress bar, ``execution_success`` -> the /history entry, the output
images fetched through /view and written under ``OUT/images/`` (temporary name + rename), then
one JSONL row (``status: ok``); ``execution_error`` / a rejected POST /prompt -> a row with
``status: error`` and the node's id, class and message; the batch continues.

A server that goes away (websocket closed, connection refused) has its in-flight tasks put
back at the front of the shared queue at once (another server takes them, or this one after it
reconnects); the worker retries the connection for ``reconnect_timeout`` seconds and then gives
up. When every worker has given up, the run ends with exit code 3 and the unfinished rows are
simply not in the JSONL: rerunning the same command skips every row already there with status
ok and runs the rest. A task lost with ``max_attempts`` servers in a row is recorded as an
error (a prompt that crashes its server is not retried forever).

Only connection failures count as "server unavailable". Any other exception in a worker (a
bug, a broken install) ends that worker as *crashed*: its tasks go back to the queue (another
worker may take them), and the exception (type, message, traceback tail) is printed at once
and again in the summary; the run's exit code is then 4.

Tasks with ``skip`` set (a missing value, or the pre-flight check with ``--out-of-range skip``)
are never queued: each is written once as a ``status: skipped`` row with the reason, so the
report can say which prompts were not run and why.
"""
from __future__ import annotations

import collections
import http.client
import json
import os
import sys
import threading
import time
import traceback
import urllib.error
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

from safegen_batch.client import ComfyClient, ComfyHostError, PromptError
from safegen_batch.prompts import PromptRow, row_key, task_key
from safegen_batch.results import RESULTS_NAME, ResultsWriter, failed_keys, latest_by_key, ok_keys, \
    read_jsonl, write_file_atomic
from safegen_batch.workflow import PromptMapper, WorkflowError

SAFETY_UI_KEY = "safegen_safety"
# the server went away (connection refused / reset, half a response): requeue, reconnect
TRANSPORT_ERRORS = (urllib.error.URLError, ConnectionError, OSError, http.client.HTTPException)
EXIT_OK, EXIT_ROW_ERRORS, EXIT_UNFINISHED, EXIT_CRASHED = 0, 1, 3, 4


@dataclass
class Task:
    key: str
    row_key: str
    row: PromptRow
    sample: int
    seed: int | None
    attempts: int = 0           # times its server was lost while it was in flight
    pair_key: str | None = None     # row_key of the adversarial row; shared by its paired twin
    seed_source: str | None = None  # "column 'X'", "--seed", "--seeds", "workflow"
    skip: dict | None = None        # {"reason", "message", ...}: recorded as skipped, not run
    overrides: dict | None = None   # {"node.input": value} after the mapping (pre-flight clamp)
    adjusted: list | None = None    # what the clamp changed: [{"input", "from", "to", "reason"}]


@dataclass
class RunConfig:
    servers: list[str]
    out_dir: Path
    method: str = "default"
    workflow_name: str = ""
    inflight: int = 2
    reconnect_timeout: float = 30.0
    prompt_timeout: float = 3600.0
    max_attempts: int = 3
    retry_failed: bool = True
    progress: bool = True


@dataclass
class RunSummary:
    total: int = 0              # tasks in the prompt file x samples
    skipped: int = 0            # already ok in the JSONL
    ok: int = 0                 # finished ok in this run
    failed: int = 0             # recorded as error in this run
    excluded: int = 0           # recorded as skipped (missing value / pre-flight), not run
    unfinished: int = 0         # not run (servers unavailable / interrupted / workers crashed)
    seconds: float = 0.0
    per_server: dict[str, int] = field(default_factory=dict)
    results: str = ""
    excluded_reasons: dict[str, int] = field(default_factory=dict)   # reason -> tasks
    crashed: dict[str, str] = field(default_factory=dict)    # server -> "Type: message" of its worker
    gave_up: dict[str, str] = field(default_factory=dict)    # server -> why it was given up

    @property
    def exit_code(self) -> int:
        if self.crashed:
            return EXIT_CRASHED
        if self.unfinished:
            return EXIT_UNFINISHED
        return EXIT_ROW_ERRORS if self.failed else EXIT_OK


def build_tasks(rows: list[PromptRow], mapper: PromptMapper, method: str, repeat: int = 1,
                seeds: list[int] | None = None, default_seed: int | None = None) -> list[Task]:
    """One task per (row, sample), and per (row, sample) a second one for the row's paired
    (clean) prompt when the file has a paired column: same seed and settings, role "paired".

    Seeds: ``seeds``: one sample per seed (overrides the row's seed); else the row's seed, or
    ``default_seed`` for a row without one (or, when that is None, the workflow's own seed);
    ``repeat`` N: that seed + k, k = 0..N-1. A row whose prompt (or paired prompt) cell is empty
    becomes a task with ``skip`` set (reason ``missing_value``)."""
    tasks = []
    base_default = mapper.default_seed()
    for r in rows:
        if seeds:
            samples, src = list(enumerate(seeds)), "--seeds"
        else:
            if r.seed is not None:
                base, src = r.seed, f"column {r.seed_column!r}" if r.seed_column else "row"
            elif default_seed is not None:
                base, src = default_seed, "--seed"
            else:
                base, src = None, "workflow"
            if repeat > 1:
                base = base if base is not None else base_default
                samples = [(k, None if base is None else base + k) for k in range(repeat)]
            else:
                samples = [(0, base)]
        twin = r.paired_row() if r.paired_column is not None else None
        for k, s in samples:
            pk = row_key(r, k, s) if twin is not None else None
            t = Task(task_key(r, k, s, method, mapper.hash), row_key(r, k, s), r, k, s,
                     pair_key=pk, seed_source=src)
            if not r.prompt:
                t.skip = {"reason": "missing_value", "message": f"empty {r.prompt_column!r} cell"}
            tasks.append(t)
            if twin is not None:
                pt = Task(task_key(twin, k, s, method, mapper.hash), row_key(twin, k, s), twin, k, s,
                          pair_key=pk, seed_source=src)
                if not twin.prompt:
                    pt.skip = {"reason": "missing_value",
                               "message": f"empty {twin.prompt_column!r} cell (the paired prompt)"}
                tasks.append(pt)
    return tasks


def task_values(task: Task, fields: set[str]) -> dict[str, Any]:
    v: dict[str, Any] = {"prompt": task.row.prompt, "seed": task.seed, "guidance": task.row.guidance}
    for f in fields - set(v):
        try:
            v[f] = task.row.value(f)
        except KeyError:
            raise WorkflowError(f"the prompt file has no column {f!r} (row {task.row.index}, line "
                                f"{task.row.line}; columns: {', '.join(task.row.fields)})") from None
    return v


# ------------------------------------------------------------------------------ shared state
class TaskQueue:
    def __init__(self, tasks: list[Task]):
        self._dq = collections.deque(tasks)
        self._lock = threading.Lock()
        self._open = len(tasks)      # not yet finished (queued or in flight)

    def take(self) -> Task | None:
        with self._lock:
            return self._dq.popleft() if self._dq else None

    def put_back(self, task: Task) -> None:
        with self._lock:
            self._dq.appendleft(task)

    def finish(self) -> None:
        with self._lock:
            self._open -= 1

    def all_done(self) -> bool:
        with self._lock:
            return self._open <= 0

    def remaining(self) -> list[Task]:
        with self._lock:
            return list(self._dq)


class Progress:
    """A plain-stderr progress bar: rows done/failed, rate, ETA, each server's current step."""

    def __init__(self, total: int, stream: TextIO | None = None, enabled: bool = True,
                 min_interval: float | None = None):
        self.total, self.ok, self.failed = total, 0, 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.min_interval = min_interval if min_interval is not None else (0.2 if self.tty else 2.0)
        self.t0 = time.monotonic()
        self.steps: dict[str, tuple[int, int]] = {}
        self._last = 0.0
        self._lock = threading.Lock()
        self._bar_shown = False

    def step(self, server: str, value: int, maximum: int) -> None:
        self.steps[server] = (value, maximum)
        self.render()

    def row(self, ok: bool) -> None:
        with self._lock:
            if ok:
                self.ok += 1
            else:
                self.failed += 1
        self.render(force=self.ok + self.failed >= self.total)

    def line(self) -> str:
        n = self.ok + self.failed
        el = time.monotonic() - self.t0
        rate = n / el if el > 0 else 0.0
        eta = (self.total - n) / rate if rate > 0 else None
        w = 24
        fill = int(w * n / self.total) if self.total else w
        s = (f"[{'#' * fill}{'-' * (w - fill)}] {n}/{self.total} ok {self.ok} failed {self.failed} "
             f"{rate:.2f} rows/s ETA {_hms(eta) if eta is not None else '?'}")
        if self.steps:
            s += " | " + " ".join(f"{_short(u)} {v}/{m}" for u, (v, m) in sorted(self.steps.items()))
        return s

    def render(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        with self._lock:
            if not force and now - self._last < self.min_interval:
                return
            self._last = now
            if self.tty:
                self.stream.write("\r\x1b[2K" + self.line())
                self._bar_shown = True
            else:
                self.stream.write(self.line() + "\n")
            self.stream.flush()

    def message(self, text: str) -> None:
        with self._lock:
            if self.tty and self._bar_shown:
                self.stream.write("\r\x1b[2K")
            self.stream.write(text + "\n")
            self.stream.flush()
        if self.tty and self.enabled:
            self.render(force=True)

    def close(self) -> None:
        if self.enabled and self.tty and self._bar_shown:
            self.stream.write("\n")
            self.stream.flush()


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _short(url: str) -> str:
    return url.split("://", 1)[-1].rstrip("/")


# ------------------------------------------------------------------------------ rows
def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def prompt_error_info(e: PromptError) -> dict:
    err = e.error if isinstance(e.error, dict) else {"message": str(e.error)}
    nodes = []
    for nid, info in (e.node_errors or {}).items():
        for x in info.get("errors", []) or [{}]:
            nodes.append({"node_id": str(nid), "node_type": info.get("class_type"),
                          "message": x.get("message", ""), "details": x.get("details", "")})
    first = nodes[0] if nodes else {}
    msg = (f"{first['message']}: {first['details']}" if first.get("details") else first.get("message")) \
        if first else f"{err.get('message', '')}{': ' + err['details'] if err.get('details') else ''}"
    return {"kind": "prompt_error", "node_id": first.get("node_id"), "node_type": first.get("node_type"),
            "message": msg, "error": err.get("message", ""), "details": err.get("details", ""),
            "nodes": nodes}


def execution_error_info(data: dict) -> dict:
    tb = data.get("traceback") or []
    tb = "".join(tb) if isinstance(tb, list) else str(tb)
    return {"kind": "execution_error", "node_id": data.get("node_id"), "node_type": data.get("node_type"),
            "exception_type": data.get("exception_type"),
            "message": str(data.get("exception_message", "")).strip(),
            "traceback": "\n".join(tb.strip().splitlines()[-15:])}


def _node_order(k: str):
    return (0, int(k), "") if str(k).isdigit() else (1, 0, str(k))


def image_refs(outputs: dict) -> list[dict]:
    """Output images of a history entry (type 'output'; the temp/preview ones only if the
    workflow saves none), each with the node id."""
    refs = []
    for nid in sorted(outputs, key=_node_order):
        for r in (outputs[nid] or {}).get("images", []) or []:
            if isinstance(r, dict) and r.get("filename"):
                refs.append({**r, "node": nid})
    saved = [r for r in refs if r.get("type", "output") == "output"]
    return saved or refs


def safety_results(outputs: dict) -> list[dict] | None:
    found = None
    for nid in sorted(outputs, key=_node_order):
        v = (outputs[nid] or {}).get(SAFETY_UI_KEY)
        if isinstance(v, list):
            found = (found or []) + [dict(x, node=nid) if isinstance(x, dict) else x for x in v]
    return found


# ------------------------------------------------------------------------------ worker
@dataclass
class _InFlight:
    task: Task
    graph_inputs: dict
    queued: float
    started: float | None = None


class ServerWorker(threading.Thread):
    def __init__(self, url: str, run: "BatchRun"):
        super().__init__(name=f"safegen-batch {_short(url)}", daemon=True)
        self.url = url.rstrip("/")
        self.r = run
        self.client = ComfyClient(self.url, timeout=30)
        self.client_id = f"safegen-batch-{uuid.uuid4().hex[:12]}"
        self.ws = None
        self.inflight: dict[str, _InFlight] = {}
        self.lost_at: float | None = None
        self.gave_up = False
        self.last_error: str | None = None   # the last connection failure
        self.crash: str | None = None        # "Type: message" when the worker crashed

    # -- connection
    def _connect(self) -> bool:
        """Try once; False when the worker has given up."""
        try:
            ws = self.client.connect_ws(self.client_id, timeout=5)
            ws.settimeout(0.2)
        except Exception as e:  # noqa: BLE001
            if not _is_transport_error(e):
                raise  # not the server being away (e.g. a missing module): the worker crashes
            self.last_error = _reason(e)
            now = time.monotonic()
            if self.lost_at is None:
                self.lost_at = now
                self.r.progress.message(f"server {self.url} unreachable ({_reason(e)}); retrying for "
                                        f"{self.r.cfg.reconnect_timeout:g} s")
            if now - self.lost_at >= self.r.cfg.reconnect_timeout:
                self.r.progress.message(f"server {self.url}: giving up after "
                                        f"{self.r.cfg.reconnect_timeout:g} s without a connection")
                self.gave_up = True
                return False
            self.r.stop.wait(0.5)
            return True
        if self.lost_at is not None:
            self.r.progress.message(f"server {self.url}: connected again")
        self.ws, self.lost_at = ws, None
        return True

    def _lost(self, reason: Exception | str) -> None:
        if self.ws is not None:
            try:
                self.ws.close()
            except Exception:  # noqa: BLE001
                pass
        self.ws = None
        if self.lost_at is None:
            self.lost_at = time.monotonic()
        back = 0
        for pid, f in list(self.inflight.items()):
            f.task.attempts += 1
            if f.task.attempts >= self.r.cfg.max_attempts:
                self.r.record_error(f.task, self.url, pid, {
                    "kind": "server_lost", "node_id": None, "node_type": None,
                    "message": f"the server went away while running this row ({f.task.attempts} times); "
                               f"last: {_reason(reason)}"}, f)
            else:
                self.r.queue.put_back(f.task)
                back += 1
        self.inflight.clear()
        self.r.progress.steps.pop(self.url, None)
        self.r.progress.message(f"server {self.url} lost ({_reason(reason)}); "
                                f"{back} row(s) back in the queue")

    # -- main loop
    def run(self) -> None:
        try:
            self._loop()
        except Exception as e:  # noqa: BLE001 - a bug must not hang the batch
            self.crash = f"{type(e).__name__}: {e}"
            tb = traceback.format_exc().strip().splitlines()
            self.r.progress.message(f"worker for {self.url} crashed: {self.crash}\n  traceback (tail):\n  "
                                    + "\n  ".join(tb[-8:]))
            for f in self.inflight.values():
                self.r.queue.put_back(f.task)
            self.inflight.clear()
            self.gave_up = True
        finally:
            if self.ws is not None:
                try:
                    self.ws.close()
                except Exception:  # noqa: BLE001
                    pass

    def _loop(self) -> None:
        import websocket

        while not self.r.stop.is_set():
            if self.r.queue.all_done() and not self.inflight:
                return
            if self.ws is None:
                if not self._connect():
                    return
                continue
            while len(self.inflight) < self.r.cfg.inflight and not self.r.stop.is_set():
                task = self.r.queue.take()
                if task is None:
                    break
                try:
                    submitted = self._submit(task)
                except BaseException:
                    if not any(f.task is task for f in self.inflight.values()):
                        self.r.queue.put_back(task)   # a crash must not lose the task in hand
                    raise
                if not submitted:
                    break
            if self.ws is None:
                continue
            try:
                opcode, payload = self.ws.recv_data()
            except websocket.WebSocketTimeoutException:
                self._check_timeouts()
                continue
            except (websocket.WebSocketException, OSError) as e:
                self._lost(e)
                continue
            if opcode != websocket.ABNF.OPCODE_TEXT:
                continue
            try:
                msg = json.loads(payload)
            except ValueError:
                continue
            try:
                self._handle(msg.get("type"), msg.get("data") or {})
            except TRANSPORT_ERRORS as e:
                self._lost(e)

    def _submit(self, task: Task) -> bool:
        """Queue one task; False when the server is gone (task put back)."""
        try:
            graph, applied = self.r.mapper.graph_for(task_values(task, self.r.mapper.fields()),
                                                     task.overrides)
        except WorkflowError as e:
            self.r.record_error(task, self.url, None, {"kind": "mapping_error", "node_id": None,
                                                       "node_type": None, "message": str(e)})
            return True
        t = time.monotonic()
        try:
            pid = self.client.queue(graph, client_id=self.client_id)
        except PromptError as e:
            self.r.record_error(task, self.url, None, prompt_error_info(e), inputs=applied)
            return True
        except TRANSPORT_ERRORS as e:
            self.r.queue.put_back(task)
            self._lost(e)
            return False
        except ComfyHostError as e:  # HTTP 500 etc.: the server answered, the row failed
            self.r.record_error(task, self.url, None, {"kind": "http_error", "node_id": None,
                                                       "node_type": None, "message": str(e)[:2000]},
                                inputs=applied)
            return True
        self.inflight[pid] = _InFlight(task, applied, t)
        return True

    def _check_timeouts(self) -> None:
        now = time.monotonic()
        for pid, f in list(self.inflight.items()):
            if now - (f.started or f.queued) > self.r.cfg.prompt_timeout:
                del self.inflight[pid]
                self.r.record_error(f.task, self.url, pid, {
                    "kind": "timeout", "node_id": None, "node_type": None,
                    "message": f"no result within {self.r.cfg.prompt_timeout:g} s"}, f)

    def _handle(self, mtype: str | None, data: dict) -> None:
        pid = data.get("prompt_id")
        if mtype == "progress" and pid in self.inflight:
            self.r.progress.step(self.url, int(data.get("value", 0)), int(data.get("max", 0)))
            return
        if pid not in self.inflight:
            return
        f = self.inflight[pid]
        if mtype == "execution_start":
            f.started = time.monotonic()
        elif mtype == "execution_error":
            del self.inflight[pid]
            self.r.record_error(f.task, self.url, pid, execution_error_info(data), f)
        elif mtype == "execution_interrupted":
            del self.inflight[pid]
            self.r.record_error(f.task, self.url, pid, {
                "kind": "interrupted", "node_id": data.get("node_id"), "node_type": data.get("node_type"),
                "message": "the prompt was interrupted on the server"}, f)
        elif mtype == "execution_success":
            hist = self.client._wait_history(pid, until=time.monotonic() + 30)
            if not hist:
                raise ConnectionError(f"no /history entry for prompt {pid}")
            outputs = hist.get("outputs") or {}
            refs = image_refs(outputs)
            files = []
            try:
                for i, ref in enumerate(refs):
                    data_ = self.client.view(ref["filename"], ref.get("subfolder", ""),
                                             ref.get("type", "output"))
                    ext = os.path.splitext(ref["filename"])[1] or ".png"
                    rel = f"images/{f.task.key[:16]}_{i}{ext}"
                    write_file_atomic(self.r.cfg.out_dir / rel, data_)
                    files.append(rel)
            except ComfyHostError as e:  # the server answered, but not with the image (e.g. 404)
                del self.inflight[pid]
                self.r.record_error(f.task, self.url, pid, {"kind": "fetch_error", "node_id": None,
                                                            "node_type": None, "message": str(e)}, f)
                return
            del self.inflight[pid]
            self.r.progress.steps.pop(self.url, None)
            self.r.record_ok(f.task, self.url, pid, f, files, refs, safety_results(outputs))


def _is_transport_error(e: BaseException) -> bool:
    """A failure of the connection (server away / refused / reset / handshake), as opposed to a
    bug or a broken install."""
    if isinstance(e, TRANSPORT_ERRORS):
        return True
    return any(c.__module__.split(".")[0] == "websocket" for c in type(e).__mro__)


def _reason(e: Exception | str) -> str:
    if isinstance(e, str):
        return e
    s = str(e) or type(e).__name__
    return f"{type(e).__name__}: {s}"[:300]


# ------------------------------------------------------------------------------ the run
class BatchRun:
    def __init__(self, cfg: RunConfig, mapper: PromptMapper, tasks: list[Task],
                 log: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.mapper = mapper
        self.all_tasks = tasks
        self.stop = threading.Event()
        self.results_path = cfg.out_dir / RESULTS_NAME
        self.summary = RunSummary(total=len(tasks), results=str(self.results_path))
        self._sum_lock = threading.Lock()
        self.writer: ResultsWriter | None = None
        self.queue: TaskQueue | None = None
        self.progress: Progress | None = None
        self.log = log or (lambda s: (sys.stderr.write(s + "\n"), sys.stderr.flush()))

    # -- row writers (called from worker threads)
    def _base_row(self, task: Task, server: str, pid: str | None, inputs: dict | None) -> dict:
        r = task.row
        return {"key": task.key, "row_key": task.row_key, "method": self.cfg.method,
                "index": r.index, "line": r.line, "id": r.id, "prompt": r.prompt,
                "seed": task.seed, "guidance": r.guidance, "categories": list(r.categories),
                "sample": task.sample, "workflow": self.cfg.workflow_name,
                "workflow_hash": self.mapper.hash, "server": server, "prompt_id": pid,
                "inputs": inputs or {}, "attempt": task.attempts + 1, "fields": r.fields,
                "role": r.role, "pair_key": task.pair_key, "prompt_column": r.prompt_column,
                "paired_column": r.paired_column, "seed_source": task.seed_source,
                "adjusted": task.adjusted}

    def skip_row(self, task: Task) -> dict:
        row = self._base_row(task, None, None, None)
        row.update({"status": "skipped", "images": [], "safety": None, "error": None,
                    "skip": task.skip, "seconds": None, "finished_at": _now()})
        return row

    def record_ok(self, task: Task, server: str, pid: str, f: _InFlight, files: list[str],
                  refs: list[dict], safety: list[dict] | None) -> None:
        now = time.monotonic()
        row = self._base_row(task, server, pid, f.graph_inputs)
        row.update({"status": "ok", "images": files,
                    "image_refs": [{k: r.get(k) for k in ("node", "filename", "subfolder", "type")}
                                   for r in refs],
                    "safety": safety, "error": None, "seconds": round(now - f.queued, 4),
                    "exec_seconds": round(now - f.started, 4) if f.started else None,
                    "finished_at": _now()})
        self.writer.append(row)
        with self._sum_lock:
            self.summary.ok += 1
            self.summary.per_server[server] = self.summary.per_server.get(server, 0) + 1
        self.queue.finish()
        self.progress.row(True)

    def record_error(self, task: Task, server: str, pid: str | None, error: dict,
                     f: _InFlight | None = None, inputs: dict | None = None) -> None:
        if inputs is None:
            inputs = f.graph_inputs if f else {}
        row = self._base_row(task, server, pid, inputs)
        row.update({"status": "error", "images": [], "safety": None, "error": error,
                    "seconds": round(time.monotonic() - f.queued, 4) if f else None,
                    "finished_at": _now()})
        self.writer.append(row)
        with self._sum_lock:
            self.summary.failed += 1
        self.queue.finish()
        where = (f"node {error.get('node_id')} ({error.get('node_type')})" if error.get("node_id")
                 else error["kind"])
        msg = str(error.get("message") or "").splitlines()
        self.progress.message(f"row {task.row.index} (line {task.row.line}) failed: {where}: "
                              f"{msg[0] if msg else ''}")
        self.progress.row(False)

    # -- main
    def execute(self) -> RunSummary:
        t0 = time.monotonic()
        self.cfg.out_dir.mkdir(parents=True, exist_ok=True)
        self.writer = ResultsWriter(self.results_path)
        try:
            existing, bad = read_jsonl(self.results_path)
            if bad:
                self.log(f"{self.results_path}: skipped {bad} unreadable line(s) (a torn write)")
            done = ok_keys(existing)
            skip = done | (set() if self.cfg.retry_failed else failed_keys(existing))
            latest = latest_by_key(existing)
            todo, excluded, seen = [], [], set()
            for t in self.all_tasks:
                if t.key in skip or t.key in seen:
                    continue
                seen.add(t.key)
                (excluded if t.skip else todo).append(t)
            self.summary.skipped = len(self.all_tasks) - len(todo) - len(excluded)
            self.summary.excluded = len(excluded)
            for t in excluded:
                reason = str(t.skip.get("reason", "?"))
                self.summary.excluded_reasons[reason] = self.summary.excluded_reasons.get(reason, 0) + 1
                prev = latest.get(t.key)
                if not (prev and prev.get("status") == "skipped" and prev.get("skip") == t.skip):
                    self.writer.append(self.skip_row(t))   # once per key and reason, not per rerun
            self.queue = TaskQueue(todo)
            self.progress = Progress(len(todo), enabled=self.cfg.progress)
            if self.summary.skipped:
                self.log(f"{self.summary.skipped} of {len(self.all_tasks)} row(s) already in "
                         f"{self.results_path.name}: skipped")
            if todo:
                workers = [ServerWorker(u, self) for u in self.cfg.servers]
                for w in workers:
                    w.start()
                try:
                    while any(w.is_alive() for w in workers):
                        for w in workers:
                            w.join(timeout=0.25)
                        self.progress.render()
                except KeyboardInterrupt:
                    self.stop.set()
                    self.log("interrupted: finishing rows in flight are not written; rerun to continue")
                    for w in workers:
                        w.join(timeout=5)
                self.progress.close()
                # Tasks still queued or abandoned in flight (all servers gone / interrupted)
                left = self.queue.remaining() + [f.task for w in workers for f in w.inflight.values()]
                self.summary.unfinished = len({t.key for t in left})
                for w in workers:
                    if w.crash:
                        self.summary.crashed[w.url] = w.crash
                    elif w.gave_up:
                        self.summary.gave_up[w.url] = (
                            f"no connection for {self.cfg.reconnect_timeout:g} s"
                            + (f" (last: {w.last_error})" if w.last_error else ""))
        finally:
            self.writer.close()
        self.summary.seconds = time.monotonic() - t0
        return self.summary
