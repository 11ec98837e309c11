"""Every example workflow, as a person uses it: opened in ComfyUI's real frontend (headless
Chromium) and run through the HTTP API.

* Each UI workflow in ``workflows/`` loads with no missing node type, no node in error and no
  "missing nodes" dialog; the frontend's own API conversion of it (``app.graphToPrompt``) equals
  its API twin in ``workflows/api/`` (the two formats cannot drift apart) on every input the server
  declares; only the frontend-only widgets in ``FE.FRONTEND_ONLY_INPUTS`` may differ (PreviewAny's
  ``preview``: frontend 1.32 sends it, 1.49 does not). The graph checked is verified to be the
  one loaded (not the frontend's start-up graph). A screenshot of each is kept in
  ``artifacts/frontend/``.
* Missing model files: frontend 1.4x (ComfyUI 0.33) marks a loader whose model file the server
  lacks as an error; 1.32 did not. The check runs with the model files the workflows name present
  as empty, name-only placeholders (``FE.model_placeholders``; removed afterwards, so the run tests
  below still depend on the files an earlier workflow makes), and every fixed choice the
  workflows use must then be offered by the server. So *no* node error is tolerated, on either
  version: a node error left is a real one.
* Layout (``tools/workflow_layout.py``, applied by ``tools/frontend.py convert``), measured on the
  graph the frontend shows: no two nodes overlap, every node but the notes lies in a group, every
  group holds a MarkdownNote, every node is in the first view (the file's ``extra.ds`` in the
  1600x1000 window, clear of the frontend's bars and minimap), no link passes under a node, and
  every node that needs a model file names it in ``properties.models`` (file, URL, models/ folder)
  or, for a file this pack makes, its group's note says which file and where.
* ComfyUI lists the UI workflows as this pack's templates (``/workflow_templates``) and serves them.
* Each API twin runs to completion through ``POST /prompt`` on the tiny SD1 model
  (``tools.workflows.adapt``: 64 px, 3 sampling steps, 2 training steps), in an order where the
  files a workflow needs are made by an earlier one (inversion_training writes ine_nudity).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.graphs import install
from tools import frontend as FE
from tools import workflow_layout as WL
from tools import workflows as WF
from tools.unlearned_files import perturb, select, write_ldm


# UI workflows saved before the EMBEDDING socket type became SAFEGEN_EMBEDDING (docs/architecture.md)
PRE_RENAME = [name for name in WF.WORKFLOWS
              if "SAFEGEN_EMBEDDING" in (FE.REPO / "workflows" / f"{name}.json").read_text()]


@pytest.fixture(scope="module")
def checked(comfy_server, tmp_path_factory):
    FE.ensure_browser()
    graphs = {name: WF.build(name) for name in WF.WORKFLOWS}
    old_dir = tmp_path_factory.mktemp("pre_rename")
    old = []
    for name in PRE_RENAME:
        text = (FE.REPO / "workflows" / f"{name}.json").read_text().replace('"SAFEGEN_EMBEDDING"', '"EMBEDDING"')
        old.append(old_dir / f"pre_rename_{name}.json")
        old[-1].write_text(text)
    with FE.model_placeholders(comfy_server.models_dir, graphs, comfy_server.object_info()) as made:
        info = comfy_server.object_info()  # now listing the placeholders
        unoffered = FE.unoffered_choices(graphs, info)
        results = FE.run_js("check", comfy_server.url, FE.ARTIFACTS, FE.ui_workflows() + old)
    return {"by_file": {r["file"]: r for r in results}, "declared": FE.declared_inputs(info),
            "placeholders": [str(p.relative_to(comfy_server.models_dir)) for p in made],
            "unoffered": unoffered}


def test_workflow_choices_offered_by_server(checked):
    """With the model files present, the server offers every fixed choice the workflows use."""
    assert checked["unoffered"] == [], checked


def test_every_workflow_has_ui_and_api_form():
    ui = {p.stem for p in FE.ui_workflows()}
    api = {p.stem for p in WF.API_DIR.glob("*.json")}
    assert ui == api == set(WF.WORKFLOWS), (ui, api)
    for name in WF.WORKFLOWS:  # the committed API files are what tools/workflows.py builds
        assert json.loads((WF.API_DIR / f"{name}.json").read_text()) == WF.build(name), name


@pytest.mark.parametrize("name", list(WF.WORKFLOWS) + [f"pre_rename_{n}" for n in PRE_RENAME])
def test_ui_workflow_loads_in_frontend(checked, name):
    """Each UI workflow (and each as saved before the socket rename, links typed EMBEDDING) loads with
    no missing node or error, and the frontend turns it into the API twin (every link kept)."""
    path = next(p for p in checked["by_file"] if Path(p).stem == name)
    r = checked["by_file"][path]
    stem, name = name, name.removeprefix("pre_rename_")
    shown = {k: r.get(k) for k in ("graph_loaded", "graph_shown", "load_attempts")}
    assert r["loaded"], f"the frontend shows another graph than the one loaded: {shown}"
    assert r["missing"] == [] and r["errors"] == [] and r["dialog"] == "", \
        {k: r[k] for k in ("missing", "errors", "error_details", "dialog", "page_errors")}
    assert len([b for b in r["boxes"] if b["type"] != "MarkdownNote"]) == len(WF.build(name))
    got, got_extra = FE.split_declared(r["output"], checked["declared"])
    want, want_extra = FE.split_declared(WF.build(name), checked["declared"])
    assert got == want
    assert got_extra | want_extra <= FE.FRONTEND_ONLY_INPUTS, (got_extra, want_extra)
    assert (FE.ARTIFACTS / f"{stem}.png").stat().st_size > 10_000


def _shown(checked, name):
    r = checked["by_file"][str(FE.REPO / "workflows" / f"{name}.json")]
    return r, json.loads((FE.REPO / "workflows" / f"{name}.json").read_text())


@pytest.mark.parametrize("name", list(WF.WORKFLOWS))
def test_layout_no_overlap_grouped_noted(checked, name):
    """No two nodes overlap (notes included); every other node lies inside a group; every group
    holds exactly one MarkdownNote; the groups are the layout's, left to right."""
    r, wf = _shown(checked, name)
    boxes = {b["id"]: b["box"] for b in r["boxes"]}
    assert WL.overlapping(boxes) == []
    groups = r["groups"]
    assert [g["title"] for g in groups] == [g["title"] for g in WL.LAYOUTS[name]]
    assert [g["box"][0] for g in groups] == sorted(g["box"][0] for g in groups)
    for b in r["boxes"]:
        homes = [g["title"] for g in groups if WL.inside(b["box"], g["box"])]
        if b["type"] != "MarkdownNote":
            assert len(homes) == 1, (b, homes)
    for g in groups:
        notes = [b for b in r["boxes"] if b["type"] == "MarkdownNote" and WL.inside(b["box"], g["box"])]
        assert len(notes) == 1, (g["title"], notes)
    assert {n["type"] for n in wf["nodes"] if n["type"] == "MarkdownNote"} and \
        all(n["widgets_values"][0].strip() for n in wf["nodes"] if n["type"] == "MarkdownNote")


@pytest.mark.parametrize("name", list(WF.WORKFLOWS))
def test_layout_first_view(checked, name):
    """The frontend opens the workflow at its extra.ds, and every node (notes too) is then on
    screen: inside the 1600x1000 window clear of the top bar, side bar and Run toolbar, and off
    the minimap corner."""
    r, wf = _shown(checked, name)
    view = r["view"]
    assert view["canvas"] == list(WL.VIEW)
    assert view["scale"] == pytest.approx(wf["extra"]["ds"]["scale"])
    assert view["offset"] == pytest.approx(wf["extra"]["ds"]["offset"])
    if name not in WL.OVERVIEW_ONLY:    # nodes drawn with their text, not as bare boxes
        assert view["scale"] >= WL.READABLE_SCALE
    x0, y0, x1, y1 = WL.CLEAR
    for b in r["boxes"]:
        sx0, sy0, sx1, sy1 = WL.screen_box(b["box"], view)
        assert x0 <= sx0 and y0 <= sy0 and sx1 <= x1 and sy1 <= y1, (b, (sx0, sy0, sx1, sy1))
        assert not WL._meets((sx0, sy0, sx1, sy1), WL.MINIMAP), (b, "under the minimap")


@pytest.mark.parametrize("name", list(WF.WORKFLOWS))
def test_layout_links_clear_of_nodes(checked, name):
    """No link passes under a node (its path as LiteGraph draws it, through the reroutes)."""
    r, _ = _shown(checked, name)
    api = WF.build(name)
    assert len(r["links"]) == sum(isinstance(v, list) for n in api.values() for v in n["inputs"].values())
    assert {(ln["target"], ln["input"]) for ln in r["links"] if ln["reroutes"]} == set(WL.ROUTES.get(name, {}))
    boxes = {b["id"]: b["box"] for b in r["boxes"]}
    assert WL.links_under_nodes(boxes, r["links"]) == []


@pytest.mark.parametrize("name", list(WF.WORKFLOWS))
def test_model_files_named(checked, name):
    """Each node that loads a model file carries properties.models (name = the file it selects,
    a public URL, the models/ folder of its input) — the frontend's missing-model dialog lists
    them; a file this pack makes instead is named, with its folder, in the note of its group."""
    r, wf = _shown(checked, name)
    groups = r["groups"]
    boxes = {b["id"]: b["box"] for b in r["boxes"]}
    notes = {n["id"]: n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "MarkdownNote"}
    seen = 0
    for nid, node in WF.build(name).items():
        ui = next(n for n in wf["nodes"] if str(n["id"]) == nid)
        for (ct, inp), folder in FE.MODEL_FILE_INPUTS.items():
            value = node["inputs"].get(inp) if node["class_type"] == ct else None
            if not isinstance(value, str) or value.startswith("("):   # "(from input)": an EMBEDDING link
                continue
            seen += 1
            if value in WF.MODEL_FILES:
                assert ui["properties"].get("models") == [
                    {"name": value, "url": WF.MODEL_FILES[value]["url"], "directory": folder}], (nid, ui["properties"])
                assert WF.MODEL_FILES[value]["url"].startswith("https://")
            else:
                home = next(g for g in groups if WL.inside(boxes[nid], g["box"]))
                text = next(t for i, t in notes.items() if WL.inside(boxes[str(i)], home["box"]))
                assert value in text and f"models/{folder}" in text, (nid, value, home["title"])
    assert seen, "no model file in the workflow?"


def test_templates_are_served(comfy_server):
    listed = comfy_server.client.get("/workflow_templates")
    assert set(listed.get("safegen", [])) >= set(WF.WORKFLOWS) and not any("/" in n for n in listed["safegen"])
    served = comfy_server.client.get("/api/workflow_templates/safegen/safety_check.json")
    assert {n["type"] for n in served["nodes"]} >= {"SafeGen_NudeNetSafetyCheck"}


@pytest.fixture(scope="module")
def model_files(comfy_server, tmp_path_factory):
    from safetensors.torch import load_file

    from tools.tiny_models import ensure
    ckpt = install(comfy_server, "sd1")
    sd = load_file(str(ensure("sd1")))
    unet = {k[len("model.diffusion_model."):]: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    path = tmp_path_factory.mktemp("wf") / "wf_esd_x.safetensors"
    write_ldm(path, select(perturb(unet, "esd-x", seed=3), "esd-x"))
    unl = install(comfy_server, str(path), folder="diffusion_models")
    return {"ckpt_name": ckpt, "unet_name": unl}


# order: inversion_training makes models/embeddings/ine_nudity.safetensors for ine_sld and safree
RUN_ORDER = ["txt2img_unlearned", "inversion_training", "ine_sld", "safree", "safe_text_encoder",
             "safety_check", "esd_eraser", "safe_pipeline"]


def test_run_order_covers_all():
    assert sorted(RUN_ORDER) == sorted(WF.WORKFLOWS)


@pytest.mark.parametrize("name", RUN_ORDER)
def test_api_workflow_runs(comfy_server, model_files, name):
    api = WF.adapt(json.loads((WF.API_DIR / f"{name}.json").read_text()), model_files, small=True)
    res = comfy_server.run(api, timeout=600)
    saved = [n for n, v in api.items() if v["class_type"] in ("SaveImage", "PreviewImage")]
    assert saved and all(res.image_refs(n) for n in saved), res.outputs
    for n, v in api.items():
        if v["class_type"] == "SafeGen_NudeNetSafetyCheck":
            rows = res.ui(n)["safegen_safety"]
            assert rows and all(isinstance(r["unsafe"], bool) for r in rows)
