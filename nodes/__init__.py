"""Node schemas: one module per method family, each declaring its nodes and calling the runtime layer
(``safegen_comfy``) once per node. No node module imports another.

Node IDs carry the permanent prefix ``SafeGen_`` (saved workflows reference them). A module that
fails to import is logged and skipped, so one broken optional dependency does not remove the
rest of the pack. At import the ComfyUI internals the pack relies on are checked once
(``safegen_comfy.compat``): a missing one is ONE warning naming the nodes affected and the
ComfyUI version, not a traceback at the first prompt.
"""
from __future__ import annotations

import importlib
import logging

from comfy_api.latest import ComfyExtension, io

log = logging.getLogger("safegen")

MODULES = ("unlearned_loader", "inversion", "sld", "safree", "safe_text_encoder", "esd", "dark_miner",
           "nudenet_check")


def collect(modules=MODULES) -> list[type[io.ComfyNode]]:
    nodes: list[type[io.ComfyNode]] = []
    for name in modules:
        try:
            mod = importlib.import_module(f".{name}", __name__)
        except Exception:  # keep the rest of the pack usable
            log.exception("SafeGen: could not import nodes.%s; its nodes are unavailable", name)
            continue
        nodes.extend(getattr(mod, "NODES", ()))
    return nodes


def check_comfyui() -> list[str]:
    try:
        from ..safegen_comfy import compat
    except Exception:  # noqa: BLE001 - reported by collect() too
        log.exception("SafeGen: the runtime layer could not be imported")
        return ["safegen_comfy"]
    return compat.warn_if_incompatible()


class SafeGenExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        check_comfyui()
        return collect()


async def comfy_entrypoint() -> SafeGenExtension:
    return SafeGenExtension()
