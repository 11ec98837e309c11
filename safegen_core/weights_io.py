"""Safe reading and atomic writing of weight files (no ComfyUI import).

Reading: safetensors, or ``.pt/.ckpt/.bin`` through ``torch.load(weights_only=True)`` only;
a pickle that needs arbitrary code is refused with a message naming the file.
Writing: safetensors with string metadata, written to a temporary file in the same folder
and renamed into place, so a crash or a cancel never leaves a half-written file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

SAFETENSORS_EXT = (".safetensors", ".sft")
PICKLE_EXT = (".pt", ".pth", ".ckpt", ".bin")
# Keys under which training scripts nest their state dicts (Lightning, DES, plain torch.save).
NESTED_STATE_KEYS = ("state_dict", "model_state_dict", "module", "model")


class WeightFileError(ValueError):
    """A weight file that cannot be used; the message names the file and the offending keys."""


@dataclass
class WeightFile:
    path: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    fmt: str = "safetensors"  # or "pickle"


def _short(path: str) -> str:
    return os.path.basename(path) or path


def list_keys(keys, limit: int = 8) -> str:
    """'a, b, c … (+N more)' for error messages."""
    keys = list(keys)
    head = ", ".join(str(k) for k in keys[:limit])
    return head + (f" … (+{len(keys) - limit} more)" if len(keys) > limit else "")


def exception_text(e: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message`` (just the type when the message is empty)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:limit]}" if lines else type(e).__name__


def read_weight_object(path: str, lazy: bool = False) -> tuple[object, dict, str]:
    """(object, metadata, format) of a weight file, read safely: safetensors → a dict of tensors (of
    shapes with ``lazy``); ``.pt/.pth/.ckpt/.bin`` → whatever ``torch.load(weights_only=True)`` gives
    (a pickle that needs code to load is refused, its code never runs). Errors name the file."""
    name = _short(path)
    if not os.path.isfile(path):
        raise WeightFileError(f"{name}: file not found ({path})")
    low = path.lower()
    if low.endswith(SAFETENSORS_EXT):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                if lazy:
                    tensors = {k: torch.Size(f.get_slice(k).get_shape()) for k in f.keys()}
                else:
                    tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types
            raise WeightFileError(
                f"{name}: not a readable safetensors file (truncated or corrupt?): {exception_text(e)}") from e
        return tensors, meta, "safetensors"
    if low.endswith(PICKLE_EXT):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise WeightFileError(
                f"{name}: refused to load. Pickle files are only read with torch.load(weights_only=True) "
                f"and this one is not a plain tensor file ({exception_text(e)}). "
                f"Convert it to .safetensors in a trusted environment.") from e
        return obj, {}, "pickle"
    raise WeightFileError(f"{name}: unsupported extension; expected one of {', '.join(SAFETENSORS_EXT + PICKLE_EXT)}")


def read_weight_file(path: str, lazy: bool = False) -> WeightFile:
    """Read a state dict from ``path`` safely (see :func:`read_weight_object`); a torch.save'd object
    is unwrapped to its tensor dict (:func:`unwrap_state_dict`).

    ``lazy=True`` for safetensors returns a dict of shapes (``torch.Size``) instead of tensors,
    read from the header only.
    """
    obj, meta, fmt = read_weight_object(path, lazy)
    if fmt == "pickle":
        obj = unwrap_state_dict(obj, _short(path))
    elif not obj:
        raise WeightFileError(f"{_short(path)}: holds no tensors")
    return WeightFile(path, obj, meta, fmt)


def unwrap_state_dict(obj, name: str = "<state dict>") -> dict[str, torch.Tensor]:
    """Find the tensor dict inside a torch.save'd object (nested under state_dict, model_state_dict…)."""
    for _ in range(4):
        if isinstance(obj, dict):
            for k in NESTED_STATE_KEYS:
                if k in obj and isinstance(obj[k], dict):
                    obj = obj[k]
                    break
            else:
                break
    if not isinstance(obj, dict):
        raise WeightFileError(f"{name}: expected a dict of tensors, found {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightFileError(f"{name}: holds no tensors (top-level keys: {list_keys(obj.keys())})")
    return tensors


def is_finite(t: torch.Tensor) -> bool:
    """All values finite; for every floating dtype (float8 types lack ``isfinite``: checked in float32,
    in chunks)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    try:
        return bool(torch.isfinite(t).all())
    except (NotImplementedError, RuntimeError):
        flat = t.reshape(-1)
        step = 1 << 22
        return all(bool(torch.isfinite(flat[i:i + step].float()).all()) for i in range(0, flat.numel(), step))


def check_weight_tensors(tensors: dict, name: str, what: str = "weights") -> None:
    """Weights must be floating point: an integer/bool/complex tensor is refused naming key and dtype.
    ``tensors`` may map to tensors or (lazy) to dtypes."""
    bad = []
    for k, t in tensors.items():
        dt = t.dtype if isinstance(t, torch.Tensor) else t
        if isinstance(dt, torch.dtype) and not dt.is_floating_point:
            bad.append(f"{k} ({str(dt).replace('torch.', '')})")
    if bad:
        raise WeightFileError(f"{name}: {len(bad)} tensor(s) are not floating point, {what} must be: "
                              f"{list_keys(bad)}")


def check_finite(tensors: dict[str, torch.Tensor], name: str) -> None:
    """Raise naming the keys that are not floating point or hold NaN or inf values."""
    check_weight_tensors(tensors, name)
    bad = [k for k, t in tensors.items() if not is_finite(t)]
    if bad:
        raise WeightFileError(f"{name}: {len(bad)} tensor(s) hold NaN or inf values: {list_keys(bad)}")


def check_finite_file(path: str) -> None:
    """:func:`check_finite` for a safetensors file, one tensor in memory at a time."""
    from safetensors import safe_open

    bad, dtypes = [], {}
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                dtypes[k] = t.dtype
                if not is_finite(t):
                    bad.append(k)
                del t
    except WeightFileError:
        raise
    except Exception as e:
        raise WeightFileError(f"{_short(path)}: a tensor could not be read (truncated or corrupt?): "
                              f"{exception_text(e)}") from e
    check_weight_tensors(dtypes, _short(path))
    if bad:
        raise WeightFileError(f"{_short(path)}: {len(bad)} tensor(s) hold NaN or inf values: {list_keys(bad)}")


def weights_fingerprint(state_dict: dict) -> str:
    """Cheap content hash of weights (key, shape, sum, abs-sum per tensor): changes with any edit.
    For settings fingerprints of whole models (a full hash of a UNet costs seconds)."""
    h = hashlib.sha256()
    for k, v in sorted(state_dict.items()):
        v = v.detach().float()
        h.update(f"{k}{tuple(v.shape)}{float(v.sum()):.6e}{float(v.abs().sum()):.6e}".encode())
    return h.hexdigest()[:16]


def content_hash(obj) -> str:
    """Exact hash of a tensor, a string, or a (nested) list/dict of them: equal content, equal hash."""
    h = hashlib.sha256()

    def feed(o):
        if isinstance(o, torch.Tensor):
            t = o.detach().float().cpu().contiguous()
            h.update(f"T{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes())
        elif isinstance(o, dict):
            for k in sorted(o):
                h.update(f"K{k}".encode())
                feed(o[k])
        elif isinstance(o, (list, tuple)):
            h.update(f"L{len(o)}".encode())
            for x in o:
                feed(x)
        else:
            h.update(f"S{o}".encode())
    feed(obj)
    return h.hexdigest()[:16]


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str,
                            metadata: dict | None = None) -> str:
    """Save to ``path`` via a temporary file in the same folder and ``os.replace``.

    Metadata values that are not strings are JSON-encoded (safetensors stores str→str).
    """
    from safetensors.torch import save_file

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    meta = {str(k): (v if isinstance(v, str) else json.dumps(v)) for k, v in (metadata or {}).items()}
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file(clean, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    log.info("saved %s (%d tensors)", path, len(clean))
    return path


def sanitize_name(name: str, default: str = "unnamed") -> str:
    """A file-name stem safe on every OS: letters, digits, '-', '_', '.'; no path parts."""
    name = os.path.basename(str(name).strip().replace("\\", "/"))
    for ext in SAFETENSORS_EXT + PICKLE_EXT:
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
    out = "".join(c if (c.isalnum() or c in "-_.") else "_" for c in name).strip("._")
    return out[:120] or default
