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


PALETTE = [(66, 114, 196), (221, 132, 82), (85, 168, 104), (196, 78, 82), (129, 114, 179),
           (147, 120, 96), (218, 139, 195), (140, 140, 140), (204, 185, 116), (100, 181, 205)]


def bar_chart(groups, series, title: str = "", ylabel: str = "", ymax: float | None = None,
              width: int | None = None, height: int = 360, value_fmt: str = "{:.2f}") -> np.ndarray:
    """Grouped bar chart as an RGB uint8 array [H, W, 3] (PIL only).

    ``groups``: x-axis group labels; ``series``: {name: [value per group]} (None/NaN = no bar),
    one colour per series, with a legend. ``ymax`` fixes the top of the axis (e.g. 1.0 for
    rates); each bar is labelled with its value.
    """
    from PIL import Image, ImageDraw

    groups = [str(g) for g in groups]
    names = list(series)
    ng, ns = max(1, len(groups)), max(1, len(names))
    bar_w = max(6, min(28, 160 // ns))
    group_w = bar_w * ns + 18
    left, right, top = 56, 16, 30 + 16 * ((len(names) + 2) // 3)
    bottom = 64
    if width is None:
        width = max(360, left + right + group_w * ng)
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text((left, 6), title, fill="black")
    vals = [v for n in names for v in series[n] if v is not None and np.isfinite(v)]
    hi = float(ymax) if ymax is not None else (max(vals) * 1.1 if vals and max(vals) > 0 else 1.0)
    pw, ph = width - left - right, height - top - bottom
    d.rectangle([left, top, left + pw, top + ph], outline=(160, 160, 160))
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = top + ph - frac * ph
        d.line([(left - 3, y), (left + pw, y)], fill=(225, 225, 225) if 0 < frac < 1 else (160, 160, 160))
        d.text((4, y - 6), f"{frac * hi:.3g}", fill="black")
    if ylabel:
        d.text((4, top - 16), ylabel, fill="black")
    gw = pw / ng
    for gi, g in enumerate(groups):
        x0 = left + gi * gw + (gw - bar_w * ns) / 2
        for si, n in enumerate(names):
            v = series[n][gi] if gi < len(series[n]) else None
            if v is None or not np.isfinite(v):
                continue
            h = max(0.0, min(1.0, v / hi)) * ph
            xa = x0 + si * bar_w
            d.rectangle([xa, top + ph - h, xa + bar_w - 2, top + ph], fill=PALETTE[si % len(PALETTE)])
            if bar_w >= 14:
                d.text((xa, top + ph - h - 12), value_fmt.format(v), fill="black")
        label = g if len(g) <= max(4, int(gw / 6)) else g[:max(3, int(gw / 6) - 1)] + "."
        d.text((left + gi * gw + 2, top + ph + 6), label, fill="black")
    for si, n in enumerate(names):  # legend, three per line
        lx, ly = left + (si % 3) * (pw // 3), 22 + 16 * (si // 3)
        d.rectangle([lx, ly + 2, lx + 10, ly + 12], fill=PALETTE[si % len(PALETTE)])
        d.text((lx + 14, ly), str(n)[:40], fill="black")
    return np.asarray(img)
