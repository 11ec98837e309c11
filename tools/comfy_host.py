"""Run and drive a real ComfyUI server (tests, demo, benchmarks).

Dependency-light on purpose: stdlib + ``websocket-client`` (PIL only for
``RunResult.images``). The HTTP/websocket client (``ComfyClient``, ``RunResult``, the error
classes) lives in ``safegen_batch/client.py`` (the one implementation, shared with the batch
runner) and is re-exported here. It never imports ``comfy``: ComfyUI runs in its own process
(``main.py --base-directory DIR``), with this repository linked in as
``custom_nodes/safegen``.

    from tools.comfy_host import ComfyServer
    with ComfyServer("/tmp/host") as srv:
        res = srv.run({"1": {"class_type": "EmptyImage", "inputs": {...}}, ...})
        img = res.images()[0]

Defaults: ComfyUI at ``<repo>/.comfyui`` (env ``SAFEGEN_COMFYUI``; located by
``tools.tiny_models.comfyui_dir``, the one helper), interpreter ``<repo>/.venv/bin/python``
(env ``SAFEGEN_PYTHON``). For each package in ``tools.tiny_models.PLACEHOLDER_STUBS``
(torchvision, torchaudio) that the interpreter cannot import in working order, the
import-only placeholder in ``tools/<name>_stub`` is put on the server's PYTHONPATH (never
otherwise).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python tools/comfy_host.py` puts tools/ first, not the repo
    sys.path.insert(0, str(REPO_ROOT))

# re-exported: one client implementation (ComfyServer below uses ComfyClient and _http)
from safegen_batch.client import (  # noqa: E402, F401
    TERMINAL_EVENTS, ComfyClient, ComfyHostError, ExecutionError, PromptError, PromptInterrupted,
    RunResult, RunTimeoutError, _http, _node_sort_key)

from tools.tiny_models import PLACEHOLDER_STUBS, comfyui_dir  # noqa: E402  one locator, one stub list

TORCHVISION_STUB_DIR = PLACEHOLDER_STUBS["torchvision"]
TORCHAUDIO_STUB_DIR = PLACEHOLDER_STUBS["torchaudio"]
MODEL_SUBDIRS = ("checkpoints", "diffusion_models", "unet", "embeddings", "loras",
                 "text_encoders", "clip", "vae")
PACK_LINK_NAME = "safegen"

__all__ = [
    "free_port", "find_working", "find_working_torchvision", "ComfyServer", "ComfyClient", "RunResult",
    "ComfyHostError", "ServerStartError", "PromptError", "ExecutionError",
    "RunTimeoutError", "PromptInterrupted", "REPO_ROOT", "TORCHVISION_STUB_DIR",
    "TORCHAUDIO_STUB_DIR", "PLACEHOLDER_STUBS",
]


# --------------------------------------------------------------------------- errors
class ServerStartError(ComfyHostError):
    """The server did not become ready (died, or timed out). Message holds the log tail."""


# --------------------------------------------------------------------------- helpers
def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Per placeholder: a probe that exits 0 only when the *real* package imports and its compiled
# ops run (PyPI's CUDA-linked wheels fail here beside torch+cpu).
_PROBES = {
    "torchvision": (
        "import sys, torch, torchvision, torchvision.ops, torchvision.transforms.functional\n"
        "if getattr(torchvision, '__placeholder__', False) or not getattr(torchvision, '__version__', None):\n"
        "    sys.exit(3)\n"
        "keep = torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)\n"
        "assert keep.shape == (1,), keep\n"
    ),
    "torchaudio": (
        "import sys, torch, torchaudio, torchaudio.functional\n"
        "if getattr(torchaudio, '__placeholder__', False) or not getattr(torchaudio, '__version__', None):\n"
        "    sys.exit(3)\n"
        "y = torchaudio.functional.resample(torch.zeros(1, 16), 2, 1)\n"
        "assert y.shape == (1, 8), y.shape\n"
    ),
}
_PROBE = _PROBES["torchvision"]  # kept for callers of the old name


def _without_stubs(pythonpath: str) -> list[str]:
    stubs = {p.resolve() for p in PLACEHOLDER_STUBS.values()}
    return [p for p in pythonpath.split(os.pathsep) if p and Path(p).resolve() not in stubs]


@lru_cache(maxsize=None)
def find_working(package: str, python: str | os.PathLike | None = None) -> bool:
    """True when ``python`` imports a *real* ``package`` (a key of PLACEHOLDER_STUBS) whose
    compiled ops run.

    Runs in a subprocess with the placeholders' directories removed from PYTHONPATH, so a
    placeholder never counts as working. Cached per (package, interpreter).
    """
    python = str(python or _default_python())
    env = dict(os.environ)
    pp = _without_stubs(env.get("PYTHONPATH", ""))
    if pp:
        env["PYTHONPATH"] = os.pathsep.join(pp)
    else:
        env.pop("PYTHONPATH", None)
    try:
        r = subprocess.run([python, "-c", _PROBES[package]], env=env, cwd=str(Path(python).parent),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def find_working_torchvision(python: str | os.PathLike | None = None) -> bool:
    """``find_working("torchvision", python)``."""
    return find_working("torchvision", str(python) if python else None)


def _default_python() -> Path:
    return Path(os.environ.get("SAFEGEN_PYTHON") or REPO_ROOT / ".venv" / "bin" / "python")


def _default_comfy_dir() -> Path:
    return comfyui_dir()


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
                 *, torchvision_stub: bool | None = None, torchaudio_stub: bool | None = None,
                 link_pack: bool = True):
        self.base_dir = Path(base_dir).resolve()
        self.port = int(port) if port else free_port()
        self.comfy_dir = Path(comfy_dir or _default_comfy_dir()).resolve()
        self.python = Path(python or _default_python())
        self.extra_args = list(extra_args)
        self.extra_env = dict(env or {})
        self.log_path = Path(log_path) if log_path else self.base_dir / "comfyui.log"
        # per placeholder: None = auto (only if the interpreter has no working real package)
        self.stubs: dict[str, bool | None] = {"torchvision": torchvision_stub,
                                              "torchaudio": torchaudio_stub}
        self.link_pack = link_pack
        self.proc: subprocess.Popen | None = None
        self._log_fh = None
        self.client = ComfyClient(self.url)
        self.startup_seconds: float | None = None
        self.used_stubs: dict[str, bool] = {}

    # -- properties
    @property
    def torchvision_stub(self) -> bool | None:
        return self.stubs["torchvision"]

    @torchvision_stub.setter
    def torchvision_stub(self, value: bool | None) -> None:
        self.stubs["torchvision"] = value

    @property
    def used_torchvision_stub(self) -> bool | None:
        return self.used_stubs.get("torchvision")

    @property
    def used_torchaudio_stub(self) -> bool | None:
        return self.used_stubs.get("torchaudio")

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
        pp = _without_stubs(env.get("PYTHONPATH", ""))
        self.used_stubs = {}
        for name, stub_dir in PLACEHOLDER_STUBS.items():
            use_stub = self.stubs.get(name)
            if use_stub is None:
                use_stub = stub_dir.is_dir() and not find_working(name, str(self.python))
            if use_stub:
                if not (stub_dir / name).is_dir():
                    raise ServerStartError(f"{name} placeholder missing: {stub_dir}")
                pp.insert(0, str(stub_dir))
            self.used_stubs[name] = bool(use_stub)
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
          f"placeholders={srv.used_stubs}); Ctrl-C stops it", flush=True)  # noqa: T201
    try:
        while srv.is_running():
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()
