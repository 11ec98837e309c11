"""Shared ComfyUI glue: text encoding with in-memory embeddings, trainable forward passes,
the noise prediction of a MODEL, progress/preview reporting.

Nothing here is method-specific; the science is in ``safegen_core``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time

import numpy as np
import torch

import comfy.model_management as mm
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths

log = logging.getLogger("safegen")

# Text that stands for an in-memory embedding in a prompt, resolved by our tokenizer hook.
MARKER = "safegen_ine_vectors"


def encoders_of(clip) -> dict[str, object]:
    """{'l': SDTokenizer, 'g': …} — the per-encoder tokenizers of a CLIP (SD1: l; SDXL: g and l)."""
    tok = clip.tokenizer
    out = {}
    for key, attr in (("l", "clip_l"), ("g", "clip_g")):
        t = getattr(tok, attr, None)
        if t is not None and hasattr(t, "_try_get_embedding"):
            out[key] = t
    if not out:
        raise ValueError(f"unsupported CLIP type {type(tok).__name__}: SafeGen supports SD1.x and SDXL text encoders")
    return out


def embedding_widths(clip) -> dict[str, int]:
    return {k: int(t.embedding_size) for k, t in encoders_of(clip).items()}


@contextlib.contextmanager
def embedding_in_tokenizer(clip, vectors: dict[str, torch.Tensor]):
    """While active, ``embedding:safegen_ine_vectors`` in a prompt resolves to ``vectors``.

    ComfyUI's own tokenizer then does the rest (chunking, padding, ``(embedding:x:1.3)``
    weights), so conditioning equals what stock ``embedding:NAME`` gives for the same vectors.
    Gradients flow from the conditioning back into ``vectors``.
    """
    toks = encoders_of(clip)
    saved = {}
    try:
        for enc, t in toks.items():
            orig = t._try_get_embedding
            vec = vectors.get(enc)

            def hook(name, _orig=orig, _vec=vec):
                first = name.split()[0] if name.split() else name
                if first.strip(",") == MARKER and _vec is not None:
                    return _vec, " ".join(name.split()[1:])
                return _orig(name)
            saved[enc] = orig
            t._try_get_embedding = hook
            if t.embedding_directory is None:
                t.embedding_directory = folder_paths.get_folder_paths("embeddings")
        yield f"embedding:{MARKER}"
    finally:
        for enc, t in toks.items():
            if "_try_get_embedding" in t.__dict__:
                del t._try_get_embedding


def prompt_with_embedding(text: str, strength: float = 1.0) -> str:
    """Place the embedding where ``{}`` is in ``text`` (prepended when there is none)."""
    ref = f"embedding:{MARKER}" if strength == 1.0 else f"(embedding:{MARKER}:{strength:g})"
    text = text or "{}"
    if "{}" not in text:
        text = "{}, " + text if text.strip() else "{}"
    return text.replace("{}", f" {ref} ").strip()


def encode(clip, text: str, vectors: dict[str, torch.Tensor] | None = None):
    """[[cond, {"pooled_output": …}]] like CLIPTextEncode; with ``vectors`` resolvable in ``text``."""
    if vectors is None:
        tokens = clip.tokenize(text)
    else:
        with embedding_in_tokenizer(clip, vectors):
            tokens = clip.tokenize(text)
    return clip.encode_from_tokens_scheduled(tokens)


def encode_for_training(clip, text: str, vectors: dict[str, torch.Tensor]):
    """(cond, pooled) with autograd from ``vectors`` (inside :func:`trainable`)."""
    with embedding_in_tokenizer(clip, vectors):
        tokens = clip.tokenize(text)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return cond, pooled


# --------------------------------------------------------------------------- training mode
def _out_of_place_clip_layer(layer):
    # comfy.clip_model.CLIPLayer.forward adds in place (x += …), which autograd cannot differentiate.
    def forward(x, mask=None, optimized_attention=None):
        x = x + layer.self_attn(layer.layer_norm1(x), mask, optimized_attention)
        return x + layer.mlp(layer.layer_norm2(x))
    return forward


def _alias(t: torch.Tensor) -> torch.Tensor:
    """A normal tensor sharing ``t``'s memory (no copy): autograd refuses inference tensors."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(
        t.untyped_storage(), t.storage_offset(), t.size(), t.stride())


@contextlib.contextmanager
def trainable(*patchers):
    """Let autograd run through loaded ComfyUI models (ModelPatchers) inside a prompt.

    Prompts run under ``torch.inference_mode()`` and weights loaded there are inference tensors,
    which autograd cannot save for backward. After loading (patches applied), each inference
    parameter/buffer is swapped for a normal tensor that *shares its memory* (no copy, no
    per-step cost); CLIP layers get an out-of-place forward. Weights stay frozen
    (``requires_grad=False``). Everything is restored in ``finally``.
    """
    swaps, overrides, frozen = [], [], []
    with torch.inference_mode(False):
        try:
            mm.load_models_gpu(list(patchers), force_full_load=True)
            for p in patchers:
                for mod in p.model.modules():
                    for kind in ("_parameters", "_buffers"):
                        table = mod.__dict__.get(kind, {})
                        for n, t in list(table.items()):
                            if t is None:
                                continue
                            if not t.is_inference():
                                if kind == "_parameters" and t.requires_grad:
                                    frozen.append(t)  # never train the model's own weights
                                    t.requires_grad_(False)
                                continue
                            a = _alias(t)
                            if kind == "_parameters":
                                a = torch.nn.Parameter(a, requires_grad=False)
                            table[n] = a
                            swaps.append((table, n, t, a))
                    if type(mod).__name__ == "CLIPLayer":
                        mod.forward = _out_of_place_clip_layer(mod)
                        overrides.append(mod)
            yield
        finally:
            for mod in overrides:
                mod.__dict__.pop("forward", None)
            for table, n, orig, a in swaps:
                if table.get(n) is a:  # ComfyUI may have re-patched meanwhile: keep its tensor then
                    table[n] = orig
            for t in frozen:
                t.requires_grad_(True)


class DeltaHooks:
    """Train weight *deltas* of a loaded ComfyUI model without touching its weights: while active
    (inside :func:`trainable`), each tensor named in ``deltas`` (a key relative to ``root``, e.g.
    ``input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight`` under a UNet, or
    ``clip_l.transformer.text_model.encoder.layers.11.mlp.fc1.weight`` under a CLIP's model)
    computes as ``w + delta`` when ``enabled`` and as ``w`` (the frozen original) otherwise.

    Uses ComfyUI's per-module weight_function/bias_function lists (the hook that
    ``ModelPatcher.add_weight_wrapper`` installs); the lists in place before are restored on exit.
    One implementation for the erasers (UNet) and the Safe Text Encoder Trainer (CLIP)."""

    def __init__(self, root: torch.nn.Module, deltas: dict[str, torch.Tensor]):
        self.root, self.deltas = root, deltas
        self.enabled = True
        self._saved = []

    def _hook(self, d):
        def f(w):
            return w + d.to(w.device, w.dtype) if self.enabled else w
        return f

    def __enter__(self):
        try:
            for key, d in self.deltas.items():
                path, attr = key.rsplit(".", 1)
                mod = self.root.get_submodule(path)
                lst = "weight_function" if attr == "weight" else "bias_function"
                if not hasattr(mod, lst):
                    raise ValueError(f"{key}: module {type(mod).__name__} is not a ComfyUI op (no {lst})")
                hook = self._hook(d)
                self._saved.append((mod, lst, mod.__dict__.get(lst, None), hook))
                setattr(mod, lst, list(getattr(mod, lst)) + [hook])
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def check(self) -> None:
        """Raise if ComfyUI re-loaded the model meanwhile and dropped the hook entries (it resets
        the lists when it re-patches a model in low-VRAM mode): training would silently stop."""
        lost = [lst for mod, lst, _, hook in self._saved if hook not in getattr(mod, lst, [])]
        if lost:
            raise RuntimeError(f"{len(lost)} training hook(s) were removed by a model reload; free memory "
                               f"(or use --highvram) and run again")

    def __exit__(self, *exc):
        for mod, lst, prev, _ in reversed(self._saved):
            if prev is None:
                mod.__dict__.pop(lst, None)
            else:
                setattr(mod, lst, prev)
        self._saved = []
        self.enabled = True


def checkpoint_dir(kind: str, name: str) -> str:
    """Where a trainer keeps resumable checkpoints: output/safegen_checkpoints/<kind>/<name>
    (not under models/, whose loaders would list them)."""
    return os.path.join(folder_paths.get_output_directory(), "safegen_checkpoints", kind, name)


def input_path(rel: str, label: str) -> str:
    """``rel`` resolved under ComfyUI's input directory; refuses paths that leave it."""
    base = os.path.realpath(folder_paths.get_input_directory())
    path = os.path.realpath(os.path.join(base, rel.strip()))
    if path != base and not path.startswith(base + os.sep):
        raise ValueError(f"{label} '{rel}' must be under ComfyUI's input directory ({base})")
    return path


def weights_fingerprint(state_dict: dict) -> str:
    """Content hash of weights (key, shape, sum, abs-sum per tensor): cheap, changes with any edit."""
    import hashlib
    h = hashlib.sha256()
    for k, v in sorted(state_dict.items()):
        v = v.detach().float()
        h.update(f"{k}{tuple(v.shape)}{float(v.sum()):.6e}{float(v.abs().sum()):.6e}".encode())
    return h.hexdigest()[:16]


def model_sigmas(model) -> torch.Tensor:
    """k-diffusion σ of each training timestep of the model (ascending)."""
    return model.get_model_object("model_sampling").sigmas.detach().float().cpu()


def predict_eps(model, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor,
                pooled: torch.Tensor | None, width: int, height: int) -> torch.Tensor:
    """ε prediction of the MODEL at noisy x = x0 + σ·ε (k-diffusion convention).

    Uses ``BaseModel.apply_model`` so input scaling, timestep mapping, model type (ε/v) and the
    SDXL size/pooled ``y`` conditioning are ComfyUI's own.
    """
    bm = model.model
    b = x.shape[0]
    ctx = cond.expand(b, -1, -1) if cond.shape[0] == 1 else cond
    kwargs = {}
    if bm.adm_channels:  # SDXL-style models take a pooled + size vector
        pooled_b = pooled.expand(b, -1) if pooled.shape[0] == 1 else pooled
        kwargs["y"] = bm.encode_adm(pooled_output=pooled_b, width=width * 8, height=height * 8,
                                    target_width=width * 8, target_height=height * 8,
                                    prompt_type="positive").to(x)
    den = bm.apply_model(x, sigma.to(x), c_crossattn=ctx, **kwargs)
    return (x - den) / sigma.to(x).view(-1, *([1] * (x.ndim - 1)))


def sample_preview(model, vae, positive, negative, seed: int, steps: int = 8, cfg: float = 5.0,
                   width: int = 512, height: int = 512):
    """One image with ComfyUI's sampler (euler/normal), decoded: [1,H,W,3] float in 0..1."""
    latent = torch.zeros([1, 4, height // 8, width // 8])
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    noise = comfy.sample.prepare_noise(latent, seed)
    out = comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative, latent,
                              seed=seed, disable_pbar=True)
    return vae.decode(out)


def loss_plot_image(losses, title: str) -> torch.Tensor:
    """A training-loss chart as a ComfyUI IMAGE [1,H,W,3] in 0..1."""
    from ..safegen_core.plots import line_plot
    return torch.from_numpy(line_plot(losses, title, smooth=10).copy()).float()[None] / 255.0


def image_to_pil(img: torch.Tensor):
    from PIL import Image
    arr = (img[0].detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr)


class Progress:
    """ProgressBar, the step's loss as the node's progress text (at most ~4×/s), an optional preview."""

    def __init__(self, total: int, label: str = "loss"):
        self.bar = comfy.utils.ProgressBar(total)
        self.total, self.label = total, label
        self.preview = None
        self._last_text = 0.0

    def step(self, step: int, loss: float | None = None):
        mm.throw_exception_if_processing_interrupted()
        prev = ("JPEG", self.preview, 512) if self.preview is not None else None
        self.bar.update_absolute(step, self.total, prev)
        self.preview = None
        now = time.monotonic()
        if loss is not None and (now - self._last_text > 0.25 or step == self.total):
            self._last_text = now
            _progress_text(f"step {step}/{self.total}  {self.label} {loss:.5f}")


def _progress_text(text: str) -> None:
    """Show text on the running node in the UI (no-op outside a server)."""
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer
        ctx = get_executing_context()
        if ctx is not None and PromptServer.instance is not None:
            PromptServer.instance.send_progress_text(text, ctx.node_id)
    except Exception:  # never let UI feedback break training
        log.debug("progress text not sent", exc_info=True)
