"""SafeGen batch runner: prompt lists through one or more ComfyUI servers, and a safety report.

    python -m safegen_batch run --workflow wf_api.json --prompts i2p.csv \\
        --server http://127.0.0.1:8188 [--server ...] --out runs/esd --method esd
    python -m safegen_batch report runs/*/results.jsonl --out report/

Comfy-free: stdlib + ``websocket-client`` + pillow + numpy, all declared in the pack's
requirements.txt / pyproject.toml (so ``pip install -r requirements.txt`` is enough to run it);
it talks to ComfyUI only over its HTTP/websocket API (``safegen_batch.client``, the
repository's one client implementation).

Modules: ``client`` (ComfyClient, errors), ``prompts`` (CSV/TXT rows, column choice, stable
keys), ``workflow`` (API-format workflow, how row fields map into node inputs), ``preflight``
(row values against the server's /object_info limits), ``results`` (the
append-only JSONL), ``runner`` (balanced workers, restart, progress bar), ``report``
(ASR/DSR tables, chart, image grid), ``cli`` (argument parsing; ``main``).
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
