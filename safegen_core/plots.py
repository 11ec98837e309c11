"""Small PIL-only charts (no matplotlib dependency): loss curves for training nodes."""
from __future__ import annotations

import numpy as np


def line_plot(values, title: str = "loss", width: int = 512, height: int = 320, smooth: int = 0) -> np.ndarray:
    """Render a line chart of ``values`` as an RGB uint8 array [H, W, 3].

    With ``smooth`` > 1 a moving average is drawn over the raw curve.
    """
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 56, 12, 28, 30
    d.text((left, 8), title, fill="black")
    d.rectangle([left, top, width - right, height - bottom], outline=(160, 160, 160))
    vals = np.asarray([float(v) for v in values], dtype=np.float64)
    if vals.size == 0:
        d.text((left + 10, top + 10), "no data", fill="black")
        return np.asarray(img)
    lo, hi = float(np.nanmin(vals)), float(np.nanmax(vals))
    if hi - lo < 1e-12:
        hi = lo + 1e-12
    pw, ph = width - right - left, height - bottom - top

    def pts(v):
        xs = left + (np.arange(v.size) / max(1, v.size - 1)) * pw
        ys = top + (1 - (v - lo) / (hi - lo)) * ph
        return list(zip(xs.tolist(), ys.tolist()))

    if vals.size > 1:
        d.line(pts(vals), fill=(120, 160, 230), width=1)
        if smooth > 1 and vals.size > smooth:
            k = np.ones(smooth) / smooth
            sm = np.convolve(vals, k, mode="valid")
            sm = np.concatenate([np.full(smooth - 1, sm[0]), sm])
            d.line(pts(sm), fill=(200, 40, 40), width=2)
    else:
        x, y = pts(vals)[0]
        d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(200, 40, 40))
    for frac, v in ((0, hi), (1, lo)):
        d.text((4, top + frac * ph - 6), f"{v:.4g}", fill="black")
    d.text((left, height - bottom + 6), "step 1", fill="black")
    d.text((width - right - 60, height - bottom + 6), f"step {vals.size}", fill="black")
    return np.asarray(img)
