"""HTTP + websocket client of a ComfyUI server: the one implementation in this repository.

Used by the batch runner (``python -m safegen_batch``) and, re-exported, by the test/demo
harness ``tools/comfy_host.py`` (which adds ``ComfyServer``, the server process). Stdlib +
``websocket-client`` only (PIL only for ``RunResult.images`` / ``ComfyClient.view_image``);
it never imports ``comfy``.

    from safegen_batch.client import ComfyClient
    c = ComfyClient("http://127.0.0.1:8188")
    res = c.run(graph)                 # queue + follow the websocket to the end
    res.outputs, res.images()

Errors: ``PromptError`` (POST /prompt rejected: validation, with per-node messages),
``ExecutionError`` (a node raised while running: node id, class, exception message),
``PromptInterrupted``, ``RunTimeoutError``; all derive from ``ComfyHostError``.
"""
from __future__ import annotations

import io
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

TERMINAL_EVENTS = ("execution_success", "execution_error", "execution_interrupted")

__all__ = [
    "ComfyClient", "RunResult", "ComfyHostError", "PromptError", "ExecutionError",
    "RunTimeoutError", "PromptInterrupted", "TERMINAL_EVENTS",
]


# --------------------------------------------------------------------------- errors
class ComfyHostError(RuntimeError):
    """Base class for harness errors."""


class PromptError(ComfyHostError):
    """POST /prompt was rejected (HTTP 400): validation failed.

    ``body`` is the JSON answer: ``{"error": {...}, "node_errors": {node_id: {"errors": [...],
    "class_type": ...}}}``.
    """

    def __init__(self, body: Mapping[str, Any], status: int = 400):
        self.body = dict(body) if isinstance(body, Mapping) else {"error": body}
        self.status = status
        self.error = self.body.get("error") or {}
        self.node_errors: dict[str, Any] = self.body.get("node_errors") or {}
        super().__init__(self._format())

    def _format(self) -> str:
        err = self.error if isinstance(self.error, Mapping) else {"message": str(self.error)}
        lines = [f"prompt rejected (HTTP {self.status}): {err.get('message', '')}"
                 + (f" - {err['details']}" if err.get("details") else "")]
        for nid, info in self.node_errors.items():
            ctype = info.get("class_type", "?")
            for e in info.get("errors", []):
                lines.append(f"  node {nid} ({ctype}): {e.get('message', '')}: {e.get('details', '')}")
        return "\n".join(lines)

    def messages(self, node_id: str | None = None) -> list[str]:
        """'message: details' strings for one node (or all nodes)."""
        out = []
        for nid, info in self.node_errors.items():
            if node_id is None or str(nid) == str(node_id):
                for e in info.get("errors", []):
                    out.append(f"{e.get('message', '')}: {e.get('details', '')}")
        return out


class ExecutionError(ComfyHostError):
    """A node raised while the prompt ran (websocket ``execution_error``)."""

    def __init__(self, data: Mapping[str, Any], events: list | None = None):
        self.data = dict(data)
        self.events = events or []
        self.prompt_id = self.data.get("prompt_id")
        self.node_id = self.data.get("node_id")
        self.node_type = self.data.get("node_type")
        self.exception_type = self.data.get("exception_type")
        self.exception_message = str(self.data.get("exception_message", "")).strip()
        tb = self.data.get("traceback") or []
        self.traceback = "".join(tb) if isinstance(tb, list) else str(tb)
        super().__init__(
            f"node {self.node_id} ({self.node_type}) failed: {self.exception_type}: "
            f"{self.exception_message}\n{self.traceback}")


class PromptInterrupted(ComfyHostError):
    """The prompt was interrupted (``execution_interrupted``)."""

    def __init__(self, data: Mapping[str, Any]):
        self.data = dict(data)
        self.node_id = self.data.get("node_id")
        self.node_type = self.data.get("node_type")
        super().__init__(f"prompt interrupted at node {self.node_id} ({self.node_type})")


class RunTimeoutError(ComfyHostError, TimeoutError):
    """No terminal event arrived in time."""


# --------------------------------------------------------------------------- http
def _http(method: str, url: str, body: Any = None, timeout: float = 30.0,
          raw: bool = False) -> tuple[int, Any]:
    data = None
    headers = {}
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            payload = resp.read()
            status = resp.status
    except urllib.error.HTTPError as e:
        payload = e.read()
        status = e.code
    if raw:
        return status, payload
    if not payload:
        return status, None
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, payload.decode("utf-8", "replace")


# --------------------------------------------------------------------------- results
@dataclass
class RunResult:
    prompt_id: str
    events: list[tuple[str, dict]]          # every JSON websocket message, in order
    history: dict                           # /history/<id>[<id>]: prompt, outputs, status, meta
    outputs: dict                           # node_id -> ui dict (e.g. {"images": [...]})
    client: "ComfyClient | None" = field(default=None, repr=False)

    @property
    def status(self) -> dict:
        return self.history.get("status", {})

    def event_types(self) -> list[str]:
        return [t for t, _ in self.events]

    def executed_nodes(self) -> list[str]:
        """Node ids that ran (``executed`` events carry only output nodes; this uses
        ``executing`` events, which every node that actually ran emits)."""
        return [d.get("node") for t, d in self.events
                if t == "executing" and d.get("node") is not None]

    def cached_nodes(self) -> list[str]:
        for t, d in self.events:
            if t == "execution_cached":
                return list(d.get("nodes", []))
        return []

    def ui(self, node_id: str) -> dict:
        """The UI output of one node (what ``executed`` carried / history stores)."""
        return self.outputs.get(str(node_id), {})

    def image_refs(self, node_id: str | None = None) -> list[dict]:
        ids = [str(node_id)] if node_id is not None else sorted(self.outputs, key=_node_sort_key)
        refs = []
        for nid in ids:
            refs.extend(self.outputs.get(nid, {}).get("images", []) or [])
        return refs

    def images(self, node_id: str | None = None) -> list:
        """PIL images of the outputs (all image-output nodes, or one), fetched via /view."""
        if self.client is None:
            raise ComfyHostError("RunResult has no client to fetch images with")
        return [self.client.view_image(r) for r in self.image_refs(node_id)]


def _node_sort_key(k: str):
    return (0, int(k), "") if str(k).isdigit() else (1, 0, str(k))


# --------------------------------------------------------------------------- client
class ComfyClient:
    """HTTP + websocket client of one ComfyUI server."""

    def __init__(self, url: str, timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.client_id = uuid.uuid4().hex

    # -- plain endpoints
    def get(self, path: str, timeout: float | None = None) -> Any:
        status, body = _http("GET", self.url + path, timeout=timeout or self.timeout)
        if status != 200:
            raise ComfyHostError(f"GET {path} -> HTTP {status}: {str(body)[:500]}")
        return body

    def post(self, path: str, body: Any = None, timeout: float | None = None) -> tuple[int, Any]:
        return _http("POST", self.url + path, body if body is not None else {},
                     timeout=timeout or self.timeout)

    def system_stats(self) -> dict:
        return self.get("/system_stats", timeout=5)

    def object_info(self, node_class: str | None = None) -> dict:
        path = "/object_info" + (f"/{urllib.parse.quote(node_class)}" if node_class else "")
        return self.get(path, timeout=max(self.timeout, 60))

    def history(self, prompt_id: str | None = None) -> dict:
        """``/history/<id>`` -> that entry ({} if not there yet); without id, all history."""
        if prompt_id is None:
            return self.get("/history")
        body = self.get(f"/history/{urllib.parse.quote(str(prompt_id))}")
        return (body or {}).get(str(prompt_id), {})

    def queue_state(self) -> dict:
        return self.get("/queue")

    def interrupt(self) -> None:
        status, body = self.post("/interrupt", {})
        if status != 200:
            raise ComfyHostError(f"POST /interrupt -> HTTP {status}: {body}")

    def free(self, unload_models: bool = True, free_memory: bool = True) -> None:
        status, body = self.post("/free", {"unload_models": unload_models,
                                           "free_memory": free_memory})
        if status != 200:
            raise ComfyHostError(f"POST /free -> HTTP {status}: {body}")

    def queue(self, graph: Mapping[str, Any], client_id: str | None = None,
              prompt_id: str | None = None, extra_data: Mapping | None = None) -> str:
        """POST /prompt; returns the prompt_id. Raises PromptError on HTTP 400."""
        payload: dict[str, Any] = {"prompt": graph, "client_id": client_id or self.client_id}
        if prompt_id:
            payload["prompt_id"] = prompt_id
        if extra_data:
            payload["extra_data"] = dict(extra_data)
        status, body = self.post("/prompt", payload, timeout=max(self.timeout, 120))
        if status == 400:
            raise PromptError(body if isinstance(body, Mapping) else {"error": body}, status)
        if status != 200 or not isinstance(body, Mapping) or "prompt_id" not in body:
            raise ComfyHostError(f"POST /prompt -> HTTP {status}: {str(body)[:1000]}")
        return str(body["prompt_id"])

    def view(self, filename: str, subfolder: str = "", type: str = "output") -> bytes:
        q = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": type})
        status, data = _http("GET", f"{self.url}/view?{q}", timeout=self.timeout, raw=True)
        if status != 200:
            raise ComfyHostError(f"GET /view {filename} -> HTTP {status}")
        return data

    def view_image(self, ref: Mapping[str, Any]):
        from PIL import Image
        data = self.view(ref["filename"], ref.get("subfolder", ""), ref.get("type", "output"))
        img = Image.open(io.BytesIO(data))
        img.load()
        return img

    def upload_image(self, path: str | os.PathLike, subfolder: str = "",
                     overwrite: bool = True, type: str = "input") -> dict:
        """POST /upload/image (multipart); returns {"name", "subfolder", "type"}."""
        path = Path(path)
        boundary = uuid.uuid4().hex
        parts = []

        def field_(name, value):
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                         f"{value}\r\n".encode())
        field_("overwrite", "true" if overwrite else "false")
        field_("type", type)
        if subfolder:
            field_("subfolder", subfolder)
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
                     f'filename="{path.name}"\r\nContent-Type: application/octet-stream\r\n\r\n'
                     .encode() + path.read_bytes() + b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        req = urllib.request.Request(
            self.url + "/upload/image", data=b"".join(parts), method="POST",
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            return json.loads(resp.read())

    # -- running
    def _ws_url(self, client_id: str) -> str:
        u = urllib.parse.urlsplit(self.url)
        scheme = "wss" if u.scheme == "https" else "ws"
        return f"{scheme}://{u.netloc}/ws?clientId={urllib.parse.quote(client_id)}"

    def connect_ws(self, client_id: str | None = None, timeout: float = 30.0):
        """Open the event websocket for ``client_id`` (default: this client's id). Prompts
        queued with the same client_id report their events (progress, executed, execution_*)
        on it. Returns a ``websocket.WebSocket``."""
        import websocket  # websocket-client

        return websocket.create_connection(self._ws_url(client_id or self.client_id),
                                           timeout=timeout)

    def run(self, graph: Mapping[str, Any], timeout: float = 600,
            raise_on_error: bool = True, prompt_id: str | None = None) -> RunResult:
        """Queue ``graph`` and follow it to the end over the websocket.

        The websocket is opened before queueing so no event is missed. Returns a RunResult;
        raises PromptError (validation), ExecutionError (a node raised), PromptInterrupted
        (interrupted), RunTimeoutError (nothing terminal within ``timeout`` seconds).
        """
        import websocket  # websocket-client

        client_id = uuid.uuid4().hex
        deadline = time.monotonic() + timeout
        ws = self.connect_ws(client_id, timeout=min(30, timeout))
        events: list[tuple[str, dict]] = []
        terminal: tuple[str, dict] | None = None
        try:
            pid = self.queue(graph, client_id=client_id, prompt_id=prompt_id)
            # Follow until a terminal event; then until the worker's closing
            # {"executing": {"node": None}} (sent after history is stored), briefly.
            done_deadline = None
            while True:
                now = time.monotonic()
                limit = done_deadline if done_deadline is not None else deadline
                if now >= limit:
                    if terminal is None:
                        raise RunTimeoutError(
                            f"prompt {pid}: no terminal event within {timeout} s; events so far: "
                            f"{[t for t, _ in events][-20:]}")
                    break
                ws.settimeout(max(0.05, min(5.0, limit - now)))
                try:
                    opcode, payload = ws.recv_data()
                except websocket.WebSocketTimeoutException:
                    continue
                except websocket.WebSocketConnectionClosedException as e:
                    if terminal is not None:
                        break
                    raise ComfyHostError(f"websocket closed before prompt {pid} finished") from e
                if opcode != websocket.ABNF.OPCODE_TEXT:
                    continue  # binary preview frames
                try:
                    msg = json.loads(payload)
                except ValueError:
                    continue
                mtype, data = msg.get("type"), msg.get("data") or {}
                events.append((mtype, data))
                if data.get("prompt_id") not in (None, pid):
                    continue
                if mtype in TERMINAL_EVENTS and data.get("prompt_id") == pid and terminal is None:
                    terminal = (mtype, data)
                    done_deadline = min(deadline, time.monotonic() + 10)
                elif (terminal is not None and mtype == "executing"
                      and data.get("node") is None and data.get("prompt_id") == pid):
                    break
        finally:
            try:
                ws.close()
            except Exception:
                pass

        hist = self._wait_history(pid, until=max(time.monotonic() + 5, deadline))
        outputs = dict(hist.get("outputs") or {})
        if not outputs:  # fall back to the executed events
            for t, d in events:
                if t == "executed" and d.get("prompt_id") == pid and d.get("output"):
                    outputs[str(d.get("node"))] = d["output"]
        result = RunResult(pid, events, hist, outputs, client=self)
        if raise_on_error and terminal is not None:
            if terminal[0] == "execution_error":
                raise ExecutionError(terminal[1], events)
            if terminal[0] == "execution_interrupted":
                raise PromptInterrupted(terminal[1])
        return result

    def _wait_history(self, prompt_id: str, until: float) -> dict:
        while True:
            h = self.history(prompt_id)
            if h:
                return h
            if time.monotonic() >= until:
                return {}
            time.sleep(0.05)
