"""SafeText: align the text encoder so unsafe prompts' embeddings move and safe prompts' stay.

Comfy-free. Objective (SafeText, Hu et al. 2025, arXiv 2502.20623; no public code):

    L = L_u − λ · L_e

* ``L_u`` (utility) = squared Euclidean distance between the fine-tuned and the cached original
  embeddings of the SAFE prompts, relative to the originals' energy (mean over tokens of
  ‖new − orig‖² / mean over tokens of ‖orig‖², see :func:`utility_loss`). Unbounded above, ≥ 0,
  minimised at "no change".
* ``L_e`` (effectiveness) = mean over the UNSAFE prompts' tokens of ``1 − cos(e', e)``, where
  ``e`` is the cached original token embedding. **Bounded form, by choice:** it lies in
  [0, 2], so ``L ≥ −2λ`` and the objective cannot run off to −∞ the way a raw distance
  term would (the paper names "distance / negative cosine"; the unbounded distance lets the
  optimiser win by blowing the unsafe embeddings' norm up, which also blows up the UNet's
  cross-attention inputs). Token position 0 of every 77-token chunk (BOS) is excluded from
  ``L_e``: under CLIP's causal mask its output does not depend on the prompt, so moving it
  for unsafe prompts would move it for every prompt.

Embeddings are the per-token conditioning the UNet sees (``[1, 77·k, D]`` per prompt).
Also here: prompt-list parsing (one per line, CSV with an I2P-style ``prompt`` column, TXT),
the pack's small default prompt lists (``prompts/``), the layer selections and the
weight-delta dict that is saved.
"""
from __future__ import annotations

import csv
import io
import os
import re

import torch

CHUNK = 77  # CLIP context length: the conditioning is a concatenation of 77-token chunks
PROMPT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")
DEFAULT_UNSAFE_FILE = os.path.join(PROMPT_DIR, "nudity_unsafe.txt")
DEFAULT_SAFE_FILE = os.path.join(PROMPT_DIR, "benign_safe.txt")

# Which text-encoder tensors train ("layers" input of the trainer).
LAYER_CHOICES = ("final layers (last 2)", "all attention", "all")


# ------------------------------------------------------------------------------ the loss
def utility_loss(new: torch.Tensor, orig: torch.Tensor) -> torch.Tensor:
    """L_u: squared Euclidean distance between fine-tuned and original safe embeddings, relative to
    the originals' squared norm (mean over tokens of ‖new − orig‖² / mean over tokens of ‖orig‖²; ≥ 0).

    The paper's L_u is the (squared) Euclidean distance; dividing by the originals' energy (a
    constant: the originals are frozen) only rescales it, so that λ means the same on every text
    encoder: SD1's conditioning is CLIP-L's last layer after the final norm, SDXL's the raw
    penultimate layers of CLIP-L and CLIP-G, whose token norms are several times larger."""
    new, orig = new.float(), orig.float()
    return (new - orig).pow(2).sum(-1).mean() / orig.pow(2).sum(-1).mean().clamp_min(1e-12)


def bos_mask(length: int, device=None) -> torch.Tensor:
    """True for token positions that count in L_e (every position except each chunk's BOS)."""
    m = torch.ones(length, dtype=torch.bool, device=device)
    m[::CHUNK] = False
    return m


def effectiveness_loss(new: torch.Tensor, orig: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """L_e: mean over non-BOS tokens of (1 − cosine(new, orig)); in [0, 2]."""
    new, orig = new.float(), orig.float()
    cos = torch.nn.functional.cosine_similarity(new, orig, dim=-1, eps=eps)  # [B, T]
    mask = bos_mask(cos.shape[-1], cos.device)
    if not bool(mask.any()):
        mask = torch.ones_like(mask)
    return (1.0 - cos[..., mask]).mean()


def safetext_loss(safe_new, safe_orig, unsafe_new, unsafe_orig, lam: float):
    """(L, L_u, L_e) with L = L_u − λ·L_e."""
    lu = utility_loss(safe_new, safe_orig)
    le = effectiveness_loss(unsafe_new, unsafe_orig)
    return lu - float(lam) * le, lu, le


def mean_cosine(new: torch.Tensor, orig: torch.Tensor) -> float:
    """Mean token cosine (non-BOS) between two conditionings: the test/report metric for unsafe prompts."""
    return float(1.0 - effectiveness_loss(new, orig))


def relative_l2(new: torch.Tensor, orig: torch.Tensor) -> float:
    """‖new − orig‖ / ‖orig‖: the test/report metric for safe prompts."""
    return float((new.float() - orig.float()).norm() / orig.float().norm().clamp_min(1e-12))


# ------------------------------------------------------------------------------ prompts
def parse_prompt_text(text: str) -> list[str]:
    """One prompt per non-empty line; lines starting with '#' are comments."""
    out = []
    for line in (text or "").splitlines():
        s = line.strip()
        if s and not s.startswith("#"):
            out.append(s)
    return out


def parse_csv_prompts(text: str, column: str = "prompt") -> list[str]:
    """Prompts from a CSV with a header (I2P, UnlearnDiff, Ring-A-Bell…): the ``prompt`` column
    (case-insensitive); a single-column CSV without that header uses its only column."""
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return []
    header = [h.strip().lower() for h in rows[0]]
    if column.lower() in header:
        idx = header.index(column.lower())
        body = rows[1:]
    elif len(header) == 1:
        idx, body = 0, rows  # no header: every row is a prompt
    else:
        raise ValueError(f"CSV has no '{column}' column (columns: {', '.join(rows[0][:12])})")
    return [r[idx].strip() for r in body if len(r) > idx and r[idx].strip()]


def read_prompt_file(path: str) -> list[str]:
    """A .csv (``prompt`` column) or a text file (one prompt per line)."""
    if not os.path.isfile(path):
        raise ValueError(f"prompt file not found: {path}")
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        text = f.read()
    if path.lower().endswith(".csv"):
        return parse_csv_prompts(text)
    return parse_prompt_text(text)


def dedupe(prompts) -> list[str]:
    seen, out = set(), []
    for p in prompts:
        p = re.sub(r"\s+", " ", p).strip()
        if p and p not in seen:
            seen.add(p)
            out.append(p)
    return out


def default_unsafe_prompts() -> list[str]:
    return read_prompt_file(DEFAULT_UNSAFE_FILE)


def default_safe_prompts() -> list[str]:
    return read_prompt_file(DEFAULT_SAFE_FILE)


# ------------------------------------------------------------------------------ layers / keys
_LAYER_RE = re.compile(r"encoder\.layers\.(\d+)\.")


def select_keys(keys, choice: str, prefix_filter: str = "", used: dict | None = None) -> list[str]:
    """The text-encoder tensors that train for ``choice`` (one of :data:`LAYER_CHOICES`).

    * "final layers (last 2)": every weight/bias of the last two encoder layers that *feed the
      conditioning* + final_layer_norm when it is applied to it.
    * "all attention": q/k/v/out projections (weights and biases) of every encoder layer.
    * "all": every encoder layer + final_layer_norm (the token/position embedding tables are
      never trained: 38M parameters, and a row only moves when its token is in a prompt).
    ``keys`` are state-dict keys (``clip_l.transformer.text_model.encoder.layers.11.mlp.fc1.weight``).
    ``used`` maps an encoder's key prefix (the part before ``encoder.layers.``) to
    ``(last_layer_index, final_norm_applied)``: which hidden state the conditioning is taken from.
    SD1 takes the last layer through the final norm; SDXL takes the penultimate layer of both
    encoders without it, so "last 2" there means layers n-3 and n-2: the last layer and the final
    norm cannot change SDXL's per-token conditioning. Without ``used`` the last layer is assumed.
    Projections (``text_projection``) and ``logit_scale`` are excluded: SD1's UNet never sees them.
    """
    if choice not in LAYER_CHOICES:
        raise ValueError(f"unknown layer choice {choice!r}; one of {LAYER_CHOICES}")
    used = used or {}
    keys = [k for k in keys if k.startswith(prefix_filter) and k.endswith((".weight", ".bias"))]
    enc = [k for k in keys if _LAYER_RE.search(k)]

    def prefix_of(k):
        return k[: _LAYER_RE.search(k).start()] if _LAYER_RE.search(k) else k[: k.index("final_layer_norm.")]

    fln = [k for k in keys if ".final_layer_norm." in k]
    if choice == "all attention":
        return sorted(k for k in enc if ".self_attn." in k)
    if choice == "all":
        return sorted(enc + fln)
    # per encoder (prefix before 'encoder.layers.') so SDXL's two encoders each get their last 2
    n_layers: dict[str, int] = {}
    for k in enc:
        pre = prefix_of(k)
        n_layers[pre] = max(n_layers.get(pre, -1), int(_LAYER_RE.search(k).group(1)))
    out = []
    for k in enc:
        pre = prefix_of(k)
        last = used.get(pre, (n_layers[pre], True))[0]
        if last - 1 <= int(_LAYER_RE.search(k).group(1)) <= last:
            out.append(k)
    out += [k for k in fln if used.get(prefix_of(k), (None, True))[1]]
    return sorted(out)


def delta_state_dict(deltas: dict[str, torch.Tensor], dtype=torch.float32) -> dict[str, torch.Tensor]:
    """The tensors saved to ``models/text_encoders/<name>.safetensors``: trained − original per key
    (already differences), detached, contiguous, on CPU. Raises naming keys with NaN/inf."""
    out, bad = {}, []
    for k, v in deltas.items():
        t = v.detach().to("cpu", dtype).contiguous()
        if not bool(torch.isfinite(t).all()):
            bad.append(k)
        out[k] = t
    if bad:
        raise ValueError(f"deltas hold NaN/inf for {len(bad)} key(s): {', '.join(bad[:8])}")
    return out


# ------------------------------------------------------------------------------ foreign layouts
_STRIP_PREFIXES = ("cond_stage_model.transformer.", "cond_stage_model.", "text_encoder.", "transformer.",
                   "module.", "model.")


# Keys a text-encoder checkpoint legitimately carries that a CLIP's conditioning does not use
# (HF CLIPModel/CLIPTextModelWithProjection heads, buffers): logged, never an error.
KNOWN_EXTRA_KEYS = ("text_projection", "logit_scale", "position_ids", "visual_projection")


def is_known_extra_key(key: str) -> bool:
    last = key.split(".")[-1] if not key.endswith(".weight") else key.split(".")[-2]
    return last in KNOWN_EXTRA_KEYS or key.split(".")[-1] in KNOWN_EXTRA_KEYS


def to_hf_text_model_key(key: str) -> str | None:
    """Normalise a text-encoder key from a foreign file to ``text_model.<…>`` (HF CLIPTextModel
    naming, which ComfyUI's CLIP mirrors). Handles transformers ≤4 (``text_model.*``),
    transformers 5 (no ``text_model.``), LDM (``cond_stage_model.transformer.*``) and ComfyUI's own
    (``clip_l.transformer.*``). Returns None for keys that are not text-model tensors
    (``position_ids``, projections)."""
    k = key
    m = re.match(r"^clip_[lg]\.transformer\.", k)
    if m:
        k = k[m.end():]
    changed = True
    while changed:
        changed = False
        for p in _STRIP_PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
                changed = True
    if not k.startswith("text_model."):
        if k.split(".")[0] in ("embeddings", "encoder", "final_layer_norm"):
            k = "text_model." + k
        else:
            return None
    if k.endswith("position_ids"):
        return None
    return k
