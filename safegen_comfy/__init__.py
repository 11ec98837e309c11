"""The runtime layer: runs SafeGen's methods (``safegen_core``) on ComfyUI objects.

One module per method (``inversion``, ``esd``, ``dark_miner``, ``sld``, ``safree``, ``safetext``,
``unlearned``, ``nudenet``), shared plumbing (``common``, ``text``, ``training``), the socket types
(``sockets``) and the ComfyUI-compatibility seam (``compat``), the only module that touches
ComfyUI internals. Imported only inside a ComfyUI process. See docs/architecture.md.
"""
