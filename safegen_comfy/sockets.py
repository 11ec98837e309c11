"""SafeGen's custom socket types, defined once (V3 ``io.Custom``).

``SAFEGEN_EMBEDDING`` carries ``{"name", "vectors": {"l"|"g": [n, width]}, "metadata"}``; until
SafeGen 0.x it was called ``EMBEDDING`` — see docs/architecture.md for saved workflows.
"""
from __future__ import annotations

from comfy_api.latest import io

EMBEDDING_TYPE = "SAFEGEN_EMBEDDING"
Embedding = io.Custom(EMBEDDING_TYPE)
SafetyResults = io.Custom("SAFEGEN_SAFETY")
