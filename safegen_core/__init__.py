"""The science of the SafeGen pack, free of any ComfyUI import.

One module per method; `nodes/` adapts these functions to ComfyUI's graph.
"""
