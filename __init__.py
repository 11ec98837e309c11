"""SafeGen: safe text-to-image generation nodes for ComfyUI (V3 node schema).

ComfyUI imports this package from custom_nodes/ and calls `comfy_entrypoint()`.
Importing it outside ComfyUI (e.g. for the comfy-free `safegen_core` math) is harmless.
"""
try:  # pragma: no cover - only inside a ComfyUI host
    from comfy_api.latest import ComfyExtension  # noqa: F401
    _IN_COMFY = True
except ImportError:
    _IN_COMFY = False

if _IN_COMFY:
    from .nodes import comfy_entrypoint  # noqa: F401

WEB_DIRECTORY = "./web/js"  # the embed_in_workflow helper of Load Implicit Negative Embedding
