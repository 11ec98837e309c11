"""Real photographs for the NudeNet safety-check tests, from scikit-image's bundled sample data
(public domain, in the wheel, no download).

NudeNet finds FACE_FEMALE in the astronaut photo (measured with nudenet 3.4.2: score 0.7203,
box [173, 82, 102, 98]; mirrored: 0.7387, [236, 81, 100, 100]) and nothing in the retina image,
so a batch of the three has detections (the equality tests are not vacuous) and one clean image.
All three are 512x512 RGB, so ComfyUI's ImageBatch concatenates them without resampling.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

NAMES = ("sg_nn_astronaut.png", "sg_nn_astronaut_mirrored.png", "sg_nn_retina.png")
FACE_SCORES = (0.7203, 0.7387, None)  # measured FACE_FEMALE score per image (None: no detection)


def sample_arrays() -> list[np.ndarray]:
    """[astronaut, astronaut mirrored left-right, retina resized to 512x512], uint8 RGB."""
    from skimage import data  # dev dependency (requirements-dev.txt)
    astro = np.ascontiguousarray(data.astronaut()[..., :3])
    retina = np.asarray(Image.fromarray(data.retina()[..., :3]).resize((512, 512), Image.LANCZOS))
    return [astro, np.ascontiguousarray(astro[:, ::-1]), np.ascontiguousarray(retina)]


def write_pngs(folder: str | Path) -> list[Path]:
    """The sample images as PNG files in ``folder`` (RGB, 8 bit); returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, arr in zip(NAMES, sample_arrays()):
        p = folder / name
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


def read_rgb(path: str | Path) -> np.ndarray:
    """A PNG as ComfyUI's LoadImage reads it (PIL, converted to RGB), uint8."""
    with Image.open(path) as im:
        return np.array(im.convert("RGB"))
