"""Shared fixtures for tests that drive a real ComfyUI server (tools/comfy_host.py).

``comfy_server`` (session scope): ONE ComfyServer for the whole test session, in a fresh
temporary base directory, with this repository linked as ``custom_nodes/safegen``.
Drop model files into ``comfy_server.models_dir / "checkpoints"`` (etc.) at any time: ComfyUI
re-lists a model folder whenever the folder's mtime changed, so a new file is visible to
``/object_info`` and to prompt validation without a restart. Use a *new file name* for new
content: an overwritten file keeps its name, and ComfyUI's output cache may then return the
previously loaded model for an identical loader node.

Every test in tests/server/ is marked ``server``. When a test that used the server fails,
the server log tail is attached to its report ("comfyui log" section).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tools.comfy_host import ComfyServer, ServerStartError

LOG_TAIL_LINES = 80
_SERVER_KEY = pytest.StashKey[ComfyServer]()


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent.resolve()
    for item in items:
        try:
            p = Path(str(item.fspath)).resolve()
        except OSError:
            continue
        if here in p.parents:
            item.add_marker(pytest.mark.server)


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory, request):
    """A running ComfyServer shared by the session (stopped at the end)."""
    base = tmp_path_factory.mktemp("comfy_host")
    timeout = float(os.environ.get("SAFEGEN_SERVER_START_TIMEOUT", "180"))
    srv = ComfyServer(base)
    request.config.stash[_SERVER_KEY] = srv
    try:
        srv.start(timeout=timeout)
    except ServerStartError as e:
        pytest.fail(f"ComfyUI server did not start:\n{e}", pytrace=False)
    # What the pack registered (not asserted here: the nodes are still being written).
    try:
        srv.safegen_node_ids = srv.loaded_node_ids("SafeGen_")
    except Exception as e:  # noqa: BLE001 - informational only
        srv.safegen_node_ids = [f"<object_info failed: {e}>"]
    srv.idle_rss_bytes = srv.rss_bytes()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and "comfy_server" in getattr(item, "fixturenames", ()):
        srv = item.config.stash.get(_SERVER_KEY, None)
        if srv is not None:
            rep.sections.append(
                (f"comfyui log (last {LOG_TAIL_LINES} lines of {srv.log_path})",
                 srv.log_tail(LOG_TAIL_LINES)))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    srv = config.stash.get(_SERVER_KEY, None)
    if srv is None:
        return
    tr = terminalreporter
    tr.section("comfyui host")
    if srv.startup_seconds is not None:
        rss = getattr(srv, "idle_rss_bytes", None)
        tr.write_line(f"url {srv.url}  start-up {srv.startup_seconds:.1f} s  idle RSS "
                      f"{rss / 2**20:.0f} MiB" if rss else f"url {srv.url}  start-up "
                      f"{srv.startup_seconds:.1f} s")
        tr.write_line("import-only placeholders used: "
                      + (", ".join(f"{k}={v}" for k, v in srv.used_stubs.items()) or "-"))
        ids = getattr(srv, "safegen_node_ids", [])
        tr.write_line(f"SafeGen nodes loaded ({len(ids)}): {', '.join(ids) or '-'}")
    err = srv.pack_import_error()
    if err:
        tr.write_line("safegen pack FAILED to import:")
        tr.write_line(err)
    if exitstatus != 0:
        tr.write_line(f"server log: {srv.log_path}")
