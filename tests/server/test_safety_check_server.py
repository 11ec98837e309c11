"""NudeNet Safety Check in a real ComfyUI server via /prompt.

Three real photographs (tests/nudenet_images.py: astronaut, astronaut mirrored, retina; 512x512)
are uploaded with /upload/image, loaded with core LoadImage and batched with core ImageBatch
(same size: no resampling). The node's per-image results, read from the UI key "safegen_safety"
in /history and in the websocket "executed" message, must equal nudenet's NudeDetector().detect
called in the test process on the same PNG files (classes and boxes exact, scores within 1e-4),
with at least one detection in the batch. The preview images (fetched via /view) must differ from
the inputs only inside the counted boxes. The report STRING, the any_unsafe BOOLEAN and the
SAFEGEN_SAFETY output are read through core "Preview as Text" (PreviewAny), the MASK output through
MaskToImage + PreviewImage.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from safegen_core import nudenet_check as NC
from tests import nudenet_images as NI
from tests.graphs import Graph
from tools.comfy_host import PromptError

SCORE_TOL = 1e-4
NODE = "SafeGen_NudeNetSafetyCheck"


@pytest.fixture(scope="module")
def uploaded(comfy_server, tmp_path_factory):
    """(names in the server's input dir, reference detections, uint8 RGB arrays)."""
    from nudenet import NudeDetector
    paths = NI.write_pngs(tmp_path_factory.mktemp("nn_server_imgs"))
    names = [comfy_server.upload_image(p)["name"] for p in paths]
    det = NudeDetector()
    ref = [det.detect(str(p)) for p in paths]
    return names, ref, [NI.read_rgb(p) for p in paths]


def _graph(names, **check_inputs):
    g = Graph()
    loads = [g.add("LoadImage", image=n) for n in names]
    batch = g.add("ImageBatch", image1=loads[0][0], image2=loads[1][0])
    batch = g.add("ImageBatch", image1=batch[0], image2=loads[2][0])
    chk = g.add(NODE, images=batch[0], **check_inputs)
    flag = g.add("PreviewAny", source=chk[1])
    rep = g.add("PreviewAny", source=chk[2])
    return g, chk, flag, rep


def _add_mask_and_results_previews(g, chk):
    mask_img = g.add("MaskToImage", mask=chk[3])
    return g.add("PreviewImage", images=mask_img[0]), g.add("PreviewAny", source=chk[4])


def _same_detections(got, ref):
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g["class"] == r["class"]
        assert g["box"] == r["box"]
        assert abs(g["score"] - r["score"]) <= SCORE_TOL, (g, r)


def _check_preview(res, chk, arrays, results, method):
    previews = [np.array(im.convert("RGB")) for im in res.images(chk)]
    assert len(previews) == len(arrays)
    for prev, orig, r in zip(previews, arrays, results):
        inside = NC.regions_mask(orig.shape, [d["box"] for d in r["counted"]]).astype(bool)
        assert np.array_equal(prev[~inside], orig[~inside])  # outside the counted boxes: unchanged
        assert r["censored"] == bool(inside.any())
        if inside.any():
            changed = np.any(prev != orig, axis=-1)[inside].mean()
            assert changed > 0.9, changed
            if method == "black_box":
                assert not prev[inside].any()
    return previews


def test_check_equals_nudedetector_and_censors_boxes(comfy_server, uploaded, record_property):
    names, ref, arrays = uploaded
    assert sum(len(r) for r in ref) >= 1, ref  # equality below is not vacuous
    g, chk, flag, rep = _graph(names, threshold=0.45, labels="FACE_FEMALE", censor="black_box")
    mask_prev, res_prev = _add_mask_and_results_previews(g, chk)
    res = comfy_server.run(g, timeout=300)

    results = res.ui(chk)["safegen_safety"]
    assert len(results) == 3
    for r, rd in zip(results, ref):
        _same_detections(r["detections"], rd)
        counted = [d for d in rd if d["class"] == "FACE_FEMALE" and d["score"] >= 0.45]
        _same_detections(r["counted"], counted)
        assert r["unsafe"] == bool(counted)
        assert r["threshold"] == 0.45 and r["labels"] == ["FACE_FEMALE"]
    assert [r["index"] for r in results] == [0, 1, 2]
    assert [r["unsafe"] for r in results] == [True, True, False]
    record_property("face_scores", [r["max_score"] for r in results])

    # the same list in the websocket "executed" message as in /history
    executed = [d for t, d in res.events if t == "executed" and str(d.get("node")) == chk]
    assert executed and executed[-1]["output"]["safegen_safety"] == results
    assert len(res.ui(chk)["images"]) == 3 and res.ui(chk)["images"][0]["type"] == "temp"

    # outputs: any_unsafe and the JSON report
    assert res.ui(flag)["text"] == ["True"]
    assert json.loads(res.ui(rep)["text"][0]) == results
    assert json.loads(res.ui(res_prev)["text"][0]) == results  # the SAFEGEN_SAFETY output

    _check_preview(res, chk, arrays, results, "black_box")
    # the MASK output: 1 inside the counted boxes
    masks = [np.array(im.convert("L")) for im in res.images(mask_prev)]
    assert len(masks) == 3
    for m, r in zip(masks, results):
        want = NC.regions_mask(m.shape, [d["box"] for d in r["counted"]]) * 255
        assert np.array_equal(m, want.astype(np.uint8))
    assert masks[0].any() and not masks[2].any()


def test_threshold_default_labels_and_bad_label(comfy_server, uploaded):
    names, ref, arrays = uploaded
    # between the two measured face scores (0.7203, 0.7387): only the mirrored image counts
    g, chk, flag, _ = _graph(names, threshold=0.73, labels="face_female", censor="pixelate")
    res = comfy_server.run(g, timeout=300)
    results = res.ui(chk)["safegen_safety"]
    assert [r["unsafe"] for r in results] == [False, True, False]
    assert results[0]["counted"] == [] and abs(results[0]["max_score"] - ref[0][0]["score"]) <= SCORE_TOL
    assert res.ui(flag)["text"] == ["True"]
    previews = _check_preview(res, chk, arrays, results, "pixelate")
    assert np.array_equal(previews[0], arrays[0])

    # default labels (exposed body parts): a face is not unsafe, nothing is censored
    g, chk, flag, _ = _graph(names, threshold=0.45, labels="\n".join(NC.DEFAULT_UNSAFE_LABELS), censor="blur")
    res = comfy_server.run(g, timeout=300)
    results = res.ui(chk)["safegen_safety"]
    assert [r["unsafe"] for r in results] == [False, False, False]
    for r, rd in zip(results, ref):
        _same_detections(r["detections"], rd)
    assert res.ui(flag)["text"] == ["False"]
    for prev, orig in zip(_check_preview(res, chk, arrays, results, "blur"), arrays):
        assert np.array_equal(prev, orig)

    # an unknown label is rejected at validation, naming it and the valid labels
    g, *_ = _graph(names, threshold=0.45, labels="FACE_FEMALE\nEXPOSED_BREAST_F", censor="none")
    with pytest.raises(PromptError) as ei:
        comfy_server.run(g, timeout=60)
    msg = " ".join(ei.value.messages())
    assert "EXPOSED_BREAST_F" in msg and "FEMALE_BREAST_EXPOSED" in msg, msg
