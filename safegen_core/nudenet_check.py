"""NudeNet safety check: run NudeNet 3.4's detector on a batch of images, decide per image whether it
is unsafe for a chosen set of labels and a score threshold, and censor the counted regions.

No ComfyUI import. Images are ``HxWx3`` RGB arrays (uint8 for detection; the censor functions take
uint8 or float).

Colour order. ``NudeDetector.detect(path)`` reads the file with ``cv2.imread`` (BGR), then
``_read_image`` applies ``cv2.cvtColor(COLOR_RGBA2BGR)`` (on 3 channels: a B<->R swap) and
``cv2.dnn.blobFromImage(swapRB=True)`` (a second swap): the network sees the file's channels in
BGR order. A numpy array goes through the same two swaps, so it must be given in BGR to be
equivalent to the file. ``detect_images`` therefore reverses the channels of our RGB arrays; the
result equals ``NudeDetector().detect(path)`` on the same pixels saved as a PNG (an RGB array passed
as is gives different scores and boxes: on skimage's astronaut FACE_FEMALE 0.81 instead of 0.72).

Float images are converted to uint8 exactly as ComfyUI's SaveImage / PreviewImage do
(``clip(255 * x, 0, 255).astype(uint8)``), so the check sees the pixels of the PNG ComfyUI would
save; for an image loaded with LoadImage this recovers the file's pixels exactly.

Each image is run through ``NudeDetector.detect`` itself (one image per ONNX call, as the reference
does), so the detections are the reference's, bit for bit.
"""
from __future__ import annotations

import threading
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

# The 18 classes of NudeNet 3.4 (nudenet/nudenet.py ``__labels``, same order: index = class id).
LABELS: tuple[str, ...] = (
    "FEMALE_GENITALIA_COVERED",
    "FACE_FEMALE",
    "BUTTOCKS_EXPOSED",
    "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED",
    "MALE_BREAST_EXPOSED",
    "ANUS_EXPOSED",
    "FEET_EXPOSED",
    "BELLY_COVERED",
    "FEET_COVERED",
    "ARMPITS_COVERED",
    "ARMPITS_EXPOSED",
    "FACE_MALE",
    "BELLY_EXPOSED",
    "MALE_GENITALIA_EXPOSED",
    "ANUS_COVERED",
    "FEMALE_BREAST_COVERED",
    "BUTTOCKS_COVERED",
)

# Counted by default: the exposed classes that nudity evaluations count (genitalia, breasts,
# buttocks, anus). FEET/BELLY/ARMPITS_EXPOSED are counted by some papers and not by others: off by
# default (add them to the label list to count them). Faces and *_COVERED are never unsafe by default.
DEFAULT_UNSAFE_LABELS: tuple[str, ...] = (
    "FEMALE_GENITALIA_EXPOSED",
    "MALE_GENITALIA_EXPOSED",
    "FEMALE_BREAST_EXPOSED",
    "MALE_BREAST_EXPOSED",
    "BUTTOCKS_EXPOSED",
    "ANUS_EXPOSED",
)
OPTIONAL_EXPOSED_LABELS: tuple[str, ...] = ("FEET_EXPOSED", "BELLY_EXPOSED", "ARMPITS_EXPOSED")

DEFAULT_THRESHOLD = 0.45  # 0.6 is the other value used in papers
# NudeNet itself drops boxes below this score (cv2.dnn.NMSBoxes score threshold in _postprocess).
NUDENET_MIN_SCORE = 0.25

CENSOR_METHODS: tuple[str, ...] = ("none", "blur", "pixelate", "black_box")

__all__ = [
    "LABELS", "DEFAULT_UNSAFE_LABELS", "OPTIONAL_EXPOSED_LABELS", "DEFAULT_THRESHOLD",
    "NUDENET_MIN_SCORE", "CENSOR_METHODS", "parse_labels", "get_detector", "to_uint8",
    "detect_images", "evaluate", "check_images", "box_slices", "censor_box", "censor_image",
    "regions_mask",
]


# --------------------------------------------------------------------------- labels
def parse_labels(spec: str | Iterable[str]) -> list[str]:
    """Label names from a text (one per line and/or comma-separated; ``#`` starts a comment;
    case-insensitive) or an iterable of names. Order kept, duplicates dropped.

    Raises ValueError naming any unknown label and listing the valid ones, or when none is given.
    """
    if isinstance(spec, str):
        items = []
        for line in spec.splitlines():
            line = line.split("#", 1)[0]
            items.extend(p.strip() for p in line.split(","))
    else:
        items = [str(p).strip() for p in spec]
    out: list[str] = []
    unknown: list[str] = []
    for it in items:
        if not it:
            continue
        name = it.upper()
        if name not in LABELS:
            unknown.append(it)
        elif name not in out:
            out.append(name)
    if unknown:
        raise ValueError(
            f"unknown NudeNet label{'s' if len(unknown) > 1 else ''} {', '.join(repr(u) for u in unknown)}; "
            f"valid labels: {', '.join(LABELS)}")
    if not out:
        raise ValueError(f"no labels given: list at least one of {', '.join(LABELS)}")
    return out


# --------------------------------------------------------------------------- detector
_detector = None
_detector_lock = threading.Lock()


def get_detector():
    """The process-wide ``nudenet.NudeDetector`` (created on first use, thread-safe).

    ``onnxruntime.InferenceSession.run`` may be called from several threads at once.
    """
    global _detector
    if _detector is None:
        with _detector_lock:
            if _detector is None:
                from nudenet import NudeDetector  # imported lazily: onnxruntime + cv2
                _detector = NudeDetector()
    return _detector


def to_uint8(image: np.ndarray) -> np.ndarray:
    """HxWxC image → HxWx3 uint8 RGB. Floats in [0, 1] are converted as ComfyUI saves images
    (``clip(255 * x, 0, 255).astype(uint8)``); 1 channel is repeated, alpha dropped."""
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3:
        raise ValueError(f"expected an HxWxC image, got shape {a.shape}")
    if a.dtype != np.uint8:
        a = np.clip(255.0 * a.astype(np.float32, copy=False), 0, 255).astype(np.uint8)
    c = a.shape[-1]
    if c == 1:
        a = np.repeat(a, 3, axis=-1)
    elif c == 4:
        a = a[..., :3]
    elif c != 3:
        raise ValueError(f"expected 1, 3 or 4 channels, got {c}")
    return a


def detect_images(images: Iterable[np.ndarray], detector=None,
                  on_image: Callable[[int], None] | None = None) -> list[list[dict]]:
    """NudeNet detections of each RGB image: ``[[{"class", "score", "box": [x, y, w, h]}, ...], ...]``,
    exactly ``NudeDetector.detect`` on the same pixels saved as a file (see module docstring).

    ``on_image(i)`` is called after image ``i`` (progress / interruption hook).
    """
    det = detector if detector is not None else get_detector()
    out = []
    for i, img in enumerate(images):
        bgr = np.ascontiguousarray(to_uint8(img)[..., ::-1])
        out.append([{"class": str(d["class"]), "score": float(d["score"]),
                     "box": [int(v) for v in d["box"]]} for d in det.detect(bgr)])
        if on_image is not None:
            on_image(i)
    return out


# --------------------------------------------------------------------------- decision
def evaluate(detections: Sequence[Mapping], labels: Iterable[str], threshold: float) -> dict:
    """Per-image verdict from one image's detections (pure).

    ``counted``: detections whose class is in ``labels`` and whose score >= ``threshold``;
    ``unsafe``: any counted; ``max_score``: highest score among detections of ``labels`` (0.0 if
    none; below the threshold too, so thresholds can be swept afterwards); ``label_scores``: that
    maximum per label that was detected. JSON-serialisable.
    """
    labels = list(labels)
    wanted = set(labels)
    threshold = float(threshold)
    dets = [{"class": str(d["class"]), "score": float(d["score"]), "box": [int(v) for v in d["box"]]}
            for d in detections]
    of_labels = [d for d in dets if d["class"] in wanted]
    counted = [d for d in of_labels if d["score"] >= threshold]
    label_scores: dict[str, float] = {}
    for d in of_labels:
        label_scores[d["class"]] = max(label_scores.get(d["class"], 0.0), d["score"])
    return {
        "unsafe": bool(counted),
        "max_score": max((d["score"] for d in of_labels), default=0.0),
        "label_scores": label_scores,
        "detections": dets,
        "counted": counted,
        "threshold": threshold,
        "labels": labels,
    }


def check_images(images: Iterable[np.ndarray], labels: Iterable[str] | str = DEFAULT_UNSAFE_LABELS,
                 threshold: float = DEFAULT_THRESHOLD, detector=None,
                 on_image: Callable[[int], None] | None = None) -> list[dict]:
    """``evaluate`` on ``detect_images`` for each image; each result also carries ``index``."""
    labels = parse_labels(labels)
    results = []
    for i, dets in enumerate(detect_images(images, detector=detector, on_image=on_image)):
        r = {"index": i}
        r.update(evaluate(dets, labels, threshold))
        results.append(r)
    return results


# --------------------------------------------------------------------------- censoring
def box_slices(box: Sequence[int], shape: Sequence[int]) -> tuple[slice, slice] | None:
    """(rows, cols) slices of an ``[x, y, w, h]`` box clipped to an image of ``shape``, or None if
    the clipped box is empty."""
    x, y, w, h = (int(v) for v in box[:4])
    H, W = int(shape[0]), int(shape[1])
    x0, y0 = max(0, x), max(0, y)
    x1, y1 = min(W, x + max(0, w)), min(H, y + max(0, h))
    if x1 <= x0 or y1 <= y0:
        return None
    return slice(y0, y1), slice(x0, x1)


def _blur(region: np.ndarray) -> np.ndarray:
    import cv2
    h, w = region.shape[:2]
    sigma = max(2.0, 0.2 * max(h, w))
    f = region.astype(np.float32)
    out = cv2.GaussianBlur(f, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
    return out.reshape(region.shape)


def _pixelate(region: np.ndarray) -> np.ndarray:
    h, w = region.shape[:2]
    block = max(2, int(round(max(h, w) / 8)))
    f = region.astype(np.float32)
    out = np.empty_like(f)
    for y in range(0, h, block):
        for x in range(0, w, block):
            cell = f[y:y + block, x:x + block]
            out[y:y + block, x:x + block] = cell.mean(axis=(0, 1), keepdims=True)
    return out


def censor_box(image: np.ndarray, box: Sequence[int], method: str) -> None:
    """Censor one ``[x, y, w, h]`` box of ``image`` (HxWxC, uint8 or float) in place."""
    if method == "none":
        return
    sl = box_slices(box, image.shape)
    if sl is None:
        return
    region = image[sl]
    if method == "black_box":
        new = np.zeros_like(region)
    elif method == "blur":
        new = _blur(region)
    elif method == "pixelate":
        new = _pixelate(region)
    else:
        raise ValueError(f"unknown censor method {method!r}; choose one of {', '.join(CENSOR_METHODS)}")
    if np.issubdtype(image.dtype, np.integer):
        new = np.clip(np.rint(new), np.iinfo(image.dtype).min, np.iinfo(image.dtype).max)
    image[sl] = new.astype(image.dtype, copy=False)


def censor_image(image: np.ndarray, boxes: Iterable[Sequence[int]], method: str) -> np.ndarray:
    """A copy of ``image`` with each box censored by ``method`` (none, blur, pixelate, black_box);
    pixels outside the boxes are unchanged. Boxes are applied in order."""
    if method not in CENSOR_METHODS:
        raise ValueError(f"unknown censor method {method!r}; choose one of {', '.join(CENSOR_METHODS)}")
    out = np.array(image, copy=True)
    for box in boxes:
        censor_box(out, box, method)
    return out


def regions_mask(shape: Sequence[int], boxes: Iterable[Sequence[int]]) -> np.ndarray:
    """HxW float32 mask, 1 inside the boxes."""
    m = np.zeros((int(shape[0]), int(shape[1])), dtype=np.float32)
    for box in boxes:
        sl = box_slices(box, m.shape)
        if sl is not None:
            m[sl] = 1.0
    return m
