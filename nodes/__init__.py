"""Graph glue: each module adapts one part of `safegen_core` to ComfyUI's V3 node API.

Node IDs carry the permanent prefix ``SafeGen_`` (saved workflows reference them).
A module that fails to import is logged and skipped, so one broken optional dependency
does not remove the whole pack.
"""
from __future__ import annotations

import importlib
import logging

from comfy_api.latest import ComfyExtension, io

log = logging.getLogger("safegen")

NODE_PREFIX = "SafeGen_"
CATEGORY = "SafeGen"
_MODULES = ("unet_loader", "inversion", "guidance", "safe_text_encoder", "safety_check", "erasers")


def _collect() -> list[type[io.ComfyNode]]:
    nodes: list[type[io.ComfyNode]] = []
    for name in _MODULES:
        try:
            mod = importlib.import_module(f".{name}", __name__)
        except Exception:  # keep the rest of the pack usable
            log.exception("SafeGen: could not import nodes.%s; its nodes are unavailable", name)
            continue
        nodes.extend(getattr(mod, "NODES", ()))
    return nodes


class SafeGenExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return _collect()


async def comfy_entrypoint() -> SafeGenExtension:
    return SafeGenExtension()
