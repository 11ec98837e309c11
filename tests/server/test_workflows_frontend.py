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
    assert r["n_nodes"] == len(WF.build(name))
    got, got_extra = FE.split_declared(r["output"], checked["declared"])
    want, want_extra = FE.split_declared(WF.build(name), checked["declared"])
    assert got == want
    assert got_extra | want_extra <= FE.FRONTEND_ONLY_INPUTS, (got_extra, want_extra)
    assert (FE.ARTIFACTS / f"{stem}.png").stat().st_size > 10_000


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
