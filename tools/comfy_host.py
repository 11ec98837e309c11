"""Run and drive a real ComfyUI server (tests, demo, benchmarks).

Dependency-light on purpose: stdlib + ``websocket-client`` (PIL only for
``RunResult.images``). It never imports ``comfy``: ComfyUI runs in its own process
(``main.py --base-directory DIR``), with this repository linked in as
``custom_nodes/safegen``.

    from tools.comfy_host import ComfyServer
    with ComfyServer("/tmp/host") as srv:
        res = srv.run({"1": {"class_type": "EmptyImage", "inputs": {...}}, ...})
        img = res.images()[0]

Defaults: ComfyUI at ``<repo>/.comfyui`` (env ``SAFEGEN_COMFYUI``), interpreter
``<repo>/.venv/bin/python`` (env ``SAFEGEN_PYTHON``). When that interpreter has no working
torchvision, the import-only placeholder in ``tools/torchvision_stub`` is put on the
server's PYTHONPATH (never otherwise).
"""
from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping

REPO_ROOT = Path(__file__).resolve().parent.parent
TORCHVISION_STUB_DIR = REPO_ROOT / "tools" / "torchvision_stub"
MODEL_SUBDIRS = ("checkpoints", "diffusion_models", "unet", "embeddings", "loras",
                 "text_encoders", "clip", "vae")
PACK_LINK_NAME = "safegen"
TERMINAL_EVENTS = ("execution_success", "execution_error", "execution_interrupted")

__all__ = [
    "free_port", "find_working_torchvision", "ComfyServer", "ComfyClient", "RunResult",
    "ComfyHostError", "ServerStartError", "PromptError", "ExecutionError",
    "RunTimeoutError", "PromptInterrupted", "REPO_ROOT", "TORCHVISION_STUB_DIR",
]


# --------------------------------------------------------------------------- errors
class ComfyHostError(RuntimeError):
    """Base class for harness errors."""


class ServerStartError(ComfyHostError):
    """The server did not become ready (died, or timed out). Message holds the log tail."""


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


# --------------------------------------------------------------------------- helpers
def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_PROBE = (
    "import sys, torch, torchvision, torchvision.ops, torchvision.transforms.functional\n"
    "if getattr(torchvision, '__placeholder__', False) or not getattr(torchvision, '__version__', None):\n"
    "    sys.exit(3)\n"
    "keep = torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)\n"
    "assert keep.shape == (1,), keep\n"
)


@lru_cache(maxsize=None)
def find_working_torchvision(python: str | os.PathLike | None = None) -> bool:
    """True when ``python`` imports a *real* torchvision whose compiled ops run.

    Runs in a subprocess with the placeholder's directory removed from PYTHONPATH, so the
    placeholder itself never counts as working. Cached per interpreter.
    """
    python = str(python or _default_python())
    env = dict(os.environ)
    pp = [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
          if p and Path(p).resolve() != TORCHVISION_STUB_DIR.resolve()]
    if pp:
        env["PYTHONPATH"] = os.pathsep.join(pp)
    else:
        env.pop("PYTHONPATH", None)
    try:
        r = subprocess.run([python, "-c", _PROBE], env=env, cwd=str(Path(python).parent),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def _default_python() -> Path:
    return Path(os.environ.get("SAFEGEN_PYTHON") or REPO_ROOT / ".venv" / "bin" / "python")


def _default_comfy_dir() -> Path:
    return Path(os.environ.get("SAFEGEN_COMFYUI") or REPO_ROOT / ".comfyui")


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
        ws = websocket.create_connection(self._ws_url(client_id), timeout=min(30, timeout))
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


# --------------------------------------------------------------------------- server
class ComfyServer:
    """A ComfyUI server process in its own base directory (context manager).

    Client methods (``object_info``, ``queue``, ``run``, ``history``, ``interrupt``, ``free``,
    ``upload_image``, ``view``...) are delegated to ``self.client`` (a ComfyClient).
    """

    def __init__(self, base_dir: str | os.PathLike, port: int | None = None,
                 comfy_dir: str | os.PathLike | None = None,
                 python: str | os.PathLike | None = None, extra_args: Iterable[str] = (),
                 env: Mapping[str, str] | None = None, log_path: str | os.PathLike | None = None,
                 *, torchvision_stub: bool | None = None, link_pack: bool = True):
        self.base_dir = Path(base_dir).resolve()
        self.port = int(port) if port else free_port()
        self.comfy_dir = Path(comfy_dir or _default_comfy_dir()).resolve()
        self.python = Path(python or _default_python())
        self.extra_args = list(extra_args)
        self.extra_env = dict(env or {})
        self.log_path = Path(log_path) if log_path else self.base_dir / "comfyui.log"
        self.torchvision_stub = torchvision_stub  # None: auto (only if no working torchvision)
        self.link_pack = link_pack
        self.proc: subprocess.Popen | None = None
        self._log_fh = None
        self.client = ComfyClient(self.url)
        self.startup_seconds: float | None = None
        self.used_torchvision_stub: bool | None = None

    # -- properties
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def models_dir(self) -> Path:
        return self.base_dir / "models"

    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    @property
    def custom_nodes_dir(self) -> Path:
        return self.base_dir / "custom_nodes"

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def rss_bytes(self) -> int | None:
        """Resident set size of the server process (Linux /proc), or None."""
        if not self.pid:
            return None
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    # -- lifecycle
    def prepare(self) -> None:
        """Create the base directory layout (idempotent)."""
        b = self.base_dir
        for sub in MODEL_SUBDIRS:
            (b / "models" / sub).mkdir(parents=True, exist_ok=True)
        for sub in ("input", "output", "temp", "user/default", "custom_nodes"):
            (b / sub).mkdir(parents=True, exist_ok=True)
        settings = b / "user" / "default" / "comfy.settings.json"
        data = {}
        if settings.exists():
            try:
                data = json.loads(settings.read_text())
            except ValueError:
                data = {}
        if data.get("Comfy.TutorialCompleted") is not True:
            data["Comfy.TutorialCompleted"] = True
            settings.write_text(json.dumps(data, indent=2))
        if self.link_pack:
            link = b / "custom_nodes" / PACK_LINK_NAME
            if link.is_symlink() and Path(os.readlink(link)) != REPO_ROOT:
                link.unlink()
            if not link.exists() and not link.is_symlink():
                link.symlink_to(REPO_ROOT, target_is_directory=True)

    def command(self) -> list[str]:
        cmd = [str(self.python), "main.py", "--base-directory", str(self.base_dir),
               "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--disable-api-nodes", "--preview-method", "none"]
        if not any(a.startswith("--database-url") for a in self.extra_args):
            # the default DB lives inside the ComfyUI tree: shared by concurrent servers
            cmd += ["--database-url", f"sqlite:///{self.base_dir / 'user' / 'comfyui.db'}"]
        return cmd + self.extra_args

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.extra_env)
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
        use_stub = self.torchvision_stub
        if use_stub is None:
            use_stub = TORCHVISION_STUB_DIR.is_dir() and not find_working_torchvision(str(self.python))
        pp = [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
              if p and Path(p).resolve() != TORCHVISION_STUB_DIR.resolve()]
        if use_stub:
            if not (TORCHVISION_STUB_DIR / "torchvision").is_dir():
                raise ServerStartError(f"torchvision placeholder missing: {TORCHVISION_STUB_DIR}")
            pp.insert(0, str(TORCHVISION_STUB_DIR))
        self.used_torchvision_stub = bool(use_stub)
        if pp:
            env["PYTHONPATH"] = os.pathsep.join(pp)
        else:
            env.pop("PYTHONPATH", None)
        return env

    def start(self, timeout: float = 120) -> "ComfyServer":
        if self.is_running():
            return self
        if not (self.comfy_dir / "main.py").is_file():
            raise ServerStartError(f"no ComfyUI at {self.comfy_dir} (run tools/provision.sh)")
        if not self.python.exists():
            raise ServerStartError(f"no python at {self.python} (run tools/provision.sh)")
        self.prepare()
        env = self._environment()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_fh = open(self.log_path, "ab")
        self._log_fh.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} "
                           f"{' '.join(self.command())}\n".encode())
        self._log_fh.flush()
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.command(), cwd=str(self.comfy_dir), env=env,
                                     stdin=subprocess.DEVNULL, stdout=self._log_fh,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = t0 + timeout
        while True:
            rc = self.proc.poll()
            if rc is not None:
                self._close_log()
                raise ServerStartError(
                    f"ComfyUI exited with code {rc} during start-up (log {self.log_path}):\n"
                    f"{self.log_tail(80)}")
            try:
                status, _ = _http("GET", self.url + "/system_stats", timeout=2)
                if status == 200:
                    break
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() >= deadline:
                tail = self.log_tail(80)
                self.stop()
                raise ServerStartError(
                    f"ComfyUI not ready on {self.url} within {timeout} s (log {self.log_path}):\n{tail}")
            time.sleep(0.2)
        self.startup_seconds = time.monotonic() - t0
        return self

    def stop(self, timeout: float = 10) -> int | None:
        """SIGTERM the server's process group, wait up to ``timeout`` s, then SIGKILL."""
        proc, self.proc = self.proc, None
        rc = None
        if proc is not None:
            if proc.poll() is None:
                self._signal(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self._signal(proc.pid, signal.SIGKILL)
                    try:
                        proc.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        pass
            rc = proc.returncode
            self.proc = None
            self._last_proc = proc
        self._close_log()
        return rc

    @staticmethod
    def _signal(pid: int, sig: int) -> None:
        # The server was started with start_new_session=True: its pgid is its pid.
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def _close_log(self) -> None:
        if self._log_fh is not None:
            try:
                self._log_fh.close()
            finally:
                self._log_fh = None

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __del__(self):  # last resort; never rely on it
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.stop(timeout=5)
        except Exception:
            pass

    # -- pack helpers
    def loaded_node_ids(self, prefix: str = "SafeGen_") -> list[str]:
        return sorted(k for k in self.client.object_info() if k.startswith(prefix))

    def import_failures(self) -> list[str]:
        """Log lines where ComfyUI reported custom-node import failures (any pack)."""
        return [ln for ln in self.log_text().splitlines()
                if "Cannot import" in ln or "(IMPORT FAILED)" in ln]

    def pack_import_error(self, name: str = PACK_LINK_NAME) -> str | None:
        """The traceback + 'Cannot import' message logged for custom_nodes/<name>, or None."""
        lines = self.log_text().splitlines()
        target = os.sep + os.path.join("custom_nodes", name)
        for i, ln in enumerate(lines):
            if "Cannot import" in ln and (target + " " in ln or ln.rstrip().endswith(target)
                                          or target + os.sep in ln):
                j = i
                while j > 0 and i - j < 200 and not lines[j].startswith("Traceback"):
                    j -= 1
                return "\n".join(lines[j:i + 1])
        return None

    # -- client delegation
    def __getattr__(self, name: str):
        # only called when normal lookup fails: forward client methods
        if name in ("client", "proc") or name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.client, name)


if __name__ == "__main__":  # manual use: python tools/comfy_host.py BASE_DIR [PORT]
    base = sys.argv[1] if len(sys.argv) > 1 else str(REPO_ROOT / ".cache" / "host")
    srv = ComfyServer(base, port=int(sys.argv[2]) if len(sys.argv) > 2 else None)
    srv.start()
    print(f"ComfyUI ready at {srv.url} (pid {srv.pid}, {srv.startup_seconds:.1f} s, "
          f"stub={srv.used_torchvision_stub}); Ctrl-C stops it", flush=True)  # noqa: T201
    try:
        while srv.is_running():
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()
