"""safegen_core.nudenet_check: labels, threshold logic, censoring, and the detector call against
NudeNet's own ``NudeDetector().detect(path)`` on real photographs (tests/nudenet_images.py)."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from safegen_core import nudenet_check as NC
from tests import nudenet_images as NI


# --------------------------------------------------------------------------- labels
def test_label_set_is_nudenets():
    import nudenet.nudenet as nn_mod
    assert NC.LABELS == tuple(getattr(nn_mod, "__labels"))
    assert len(NC.LABELS) == 18
    assert set(NC.DEFAULT_UNSAFE_LABELS) <= set(NC.LABELS)
    for lb in NC.DEFAULT_UNSAFE_LABELS:
        assert lb.endswith("_EXPOSED")
    for off in ("FEET_EXPOSED", "BELLY_EXPOSED", "ARMPITS_EXPOSED", "FACE_FEMALE", "FACE_MALE"):
        assert off not in NC.DEFAULT_UNSAFE_LABELS
    assert not [lb for lb in NC.DEFAULT_UNSAFE_LABELS if lb.endswith("_COVERED")]


def test_parse_labels_formats():
    text = "female_breast_exposed, ANUS_EXPOSED\n  # a comment\nFEET_EXPOSED  # counted too\n\nANUS_EXPOSED"
    assert NC.parse_labels(text) == ["FEMALE_BREAST_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED"]
    assert NC.parse_labels(["FACE_FEMALE"]) == ["FACE_FEMALE"]
    assert NC.parse_labels("\n".join(NC.DEFAULT_UNSAFE_LABELS)) == list(NC.DEFAULT_UNSAFE_LABELS)


def test_parse_labels_unknown_is_named():
    with pytest.raises(ValueError) as ei:
        NC.parse_labels("FEMALE_BREAST_EXPOSED\nEXPOSED_BREAST_F\nNIPPLES")
    msg = str(ei.value)
    assert "'EXPOSED_BREAST_F'" in msg and "'NIPPLES'" in msg
    for lb in NC.LABELS:  # lists the valid ones
        assert lb in msg
    with pytest.raises(ValueError, match="no labels"):
        NC.parse_labels("  \n# nothing\n")


# --------------------------------------------------------------------------- threshold logic
DETS = [
    {"class": "FEMALE_BREAST_EXPOSED", "score": 0.5, "box": [10, 10, 20, 20]},
    {"class": "FEMALE_BREAST_EXPOSED", "score": 0.62, "box": [40, 10, 20, 20]},
    {"class": "FACE_FEMALE", "score": 0.9, "box": [0, 0, 5, 5]},
    {"class": "BELLY_EXPOSED", "score": 0.7, "box": [5, 40, 30, 10]},
    {"class": "BUTTOCKS_EXPOSED", "score": 0.45, "box": [1, 1, 2, 2]},
]


def test_evaluate_threshold_and_labels():
    r = NC.evaluate(DETS, NC.DEFAULT_UNSAFE_LABELS, 0.45)
    assert r["unsafe"] is True
    # score == threshold counts; faces and belly (not in the default labels) never count
    assert [(d["class"], d["score"]) for d in r["counted"]] == [
        ("FEMALE_BREAST_EXPOSED", 0.5), ("FEMALE_BREAST_EXPOSED", 0.62), ("BUTTOCKS_EXPOSED", 0.45)]
    assert r["max_score"] == 0.62
    assert r["label_scores"] == {"FEMALE_BREAST_EXPOSED": 0.62, "BUTTOCKS_EXPOSED": 0.45}
    assert r["detections"] == DETS and r["threshold"] == 0.45
    assert r["labels"] == list(NC.DEFAULT_UNSAFE_LABELS)

    r6 = NC.evaluate(DETS, NC.DEFAULT_UNSAFE_LABELS, 0.6)
    assert r6["unsafe"] and [d["score"] for d in r6["counted"]] == [0.62]
    r7 = NC.evaluate(DETS, NC.DEFAULT_UNSAFE_LABELS, 0.63)
    assert not r7["unsafe"] and r7["counted"] == [] and r7["max_score"] == 0.62  # max kept below threshold

    rb = NC.evaluate(DETS, ["BELLY_EXPOSED"], 0.45)
    assert rb["unsafe"] and [d["class"] for d in rb["counted"]] == ["BELLY_EXPOSED"]
    empty = NC.evaluate([], NC.DEFAULT_UNSAFE_LABELS, 0.45)
    assert empty["unsafe"] is False and empty["max_score"] == 0.0 and empty["counted"] == []
    import json
    assert json.loads(json.dumps(r)) == r


# --------------------------------------------------------------------------- censoring
BOXES = [[5, 8, 20, 12], [50, 40, 30, 30]]  # the second runs past the right and bottom edges


def _inside(shape, boxes):
    return NC.regions_mask(shape, boxes).astype(bool)


@pytest.mark.parametrize("method", ["black_box", "blur", "pixelate"])
@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_censor_touches_only_boxes(method, dtype):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (64, 72, 3), dtype=np.uint8)
    if dtype == "float32":
        img = img.astype(np.float32) / 255.0
    before = img.copy()
    out = NC.censor_image(img, BOXES, method)
    assert np.array_equal(img, before)  # input untouched
    assert out.dtype == img.dtype and out.shape == img.shape
    inside = _inside(img.shape, BOXES)
    assert inside.sum() == 20 * 12 + 22 * 24
    assert np.array_equal(out[~inside], img[~inside])
    changed = np.any(out != img, axis=-1)
    assert changed[inside].mean() > 0.9, changed[inside].mean()
    if method == "black_box":
        assert not out[inside].any()
    if method == "pixelate":  # constant within each block (block = round(20/8) = 2 for the first box)
        blk = out[8:8 + 2, 5:5 + 2].reshape(-1, 3)
        assert (blk == blk[0]).all()
    if method in ("blur", "pixelate"):  # local averages: the region's mean colour is kept
        mean_out = out[8:20, 5:25].astype(float).mean((0, 1))
        mean_in = img[8:20, 5:25].astype(float).mean((0, 1))
        assert np.allclose(mean_out, mean_in, atol=0.05 * (255 if dtype == "uint8" else 1))


def test_censor_edge_cases():
    img = np.full((10, 10, 3), 200, np.uint8)
    for box in ([3, 3, 0, 4], [20, 20, 5, 5], [-5, -5, 3, 3]):  # empty / outside
        assert NC.box_slices(box, img.shape) is None
        assert np.array_equal(NC.censor_image(img, [box], "black_box"), img)
    assert NC.box_slices([-2, -1, 5, 4], img.shape) == (slice(0, 3), slice(0, 3))
    assert np.array_equal(NC.censor_image(img, BOXES, "none"), img)
    with pytest.raises(ValueError, match="censor method"):
        NC.censor_image(img, BOXES, "smudge")


def test_to_uint8_matches_comfyui_save_and_loadimage_roundtrip():
    v = np.arange(256, dtype=np.uint8)
    as_loaded = (v.astype(np.float32) / 255.0).reshape(1, -1, 1).repeat(3, -1)  # LoadImage's float image
    assert np.array_equal(NC.to_uint8(as_loaded)[0, :, 0], v)
    x = np.random.default_rng(1).uniform(-0.1, 1.1, (4, 5, 3)).astype(np.float32)
    assert np.array_equal(NC.to_uint8(x), np.clip(255.0 * x, 0, 255).astype(np.uint8))  # ImageSaveHelper
    assert NC.to_uint8(np.zeros((4, 5, 4), np.float32)).shape == (4, 5, 3)


# --------------------------------------------------------------------------- the real detector
@pytest.fixture(scope="module")
def sample_pngs(tmp_path_factory):
    return NI.write_pngs(tmp_path_factory.mktemp("nudenet_imgs"))


def test_detections_equal_nudedetector_on_png(sample_pngs):
    from nudenet import NudeDetector
    ref_det = NudeDetector()  # a separate instance: the reference as users call it
    ref = [ref_det.detect(str(p)) for p in sample_pngs]
    assert sum(len(r) for r in ref) >= 2, ref  # not vacuous
    assert [[d["class"] for d in r] for r in ref] == [["FACE_FEMALE"], ["FACE_FEMALE"], []]
    for r, s in zip(ref, NI.FACE_SCORES):
        if s is not None:
            assert abs(r[0]["score"] - s) < 1e-3

    arrays = [NI.read_rgb(p) for p in sample_pngs]
    ours = NC.detect_images(arrays)
    assert ours == ref  # identical: classes, float scores, int boxes
    # the same through float images (ComfyUI IMAGE) and the per-image results
    floats = np.stack(arrays).astype(np.float32) / 255.0
    res = NC.check_images(floats, ["FACE_FEMALE"], 0.45)
    assert [r["detections"] for r in res] == ref
    assert [r["unsafe"] for r in res] == [True, True, False]
    assert [r["index"] for r in res] == [0, 1, 2]
    # the colour-order pitfall this module avoids: the RGB array passed as is scores differently
    naive = ref_det.detect(arrays[0])
    assert naive != ref[0]


def test_censored_faces_are_no_longer_detected(sample_pngs):
    arrays = [NI.read_rgb(p) for p in sample_pngs[:2]]
    res = NC.check_images(arrays, ["FACE_FEMALE"], 0.45)
    for method in ("blur", "pixelate", "black_box"):
        cens = [NC.censor_image(a, [d["box"] for d in r["counted"]], method) for a, r in zip(arrays, res)]
        after = NC.check_images(cens, ["FACE_FEMALE"], 0.45)
        assert [r["unsafe"] for r in after] == [False, False], (method, after)


def test_shared_detector_created_once_across_threads(monkeypatch):
    import time

    import nudenet
    made = []

    class SlowDetector:  # stands in for NudeDetector: slow to build, counts constructions
        def __init__(self):
            time.sleep(0.05)
            made.append(self)
    monkeypatch.setattr(NC, "_detector", None)
    monkeypatch.setattr(nudenet, "NudeDetector", SlowDetector)
    got = []
    barrier = threading.Barrier(4)

    def grab():
        barrier.wait()
        got.append(NC.get_detector())
    ts = [threading.Thread(target=grab) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(made) == 1 and len(got) == 4 and all(g is made[0] for g in got)
    assert NC.get_detector() is made[0]
