"""Every example workflow, as a person uses it: opened in ComfyUI's real frontend (headless
Chromium) and run through the HTTP API.

* Each UI workflow in ``workflows/`` loads with no missing node type, no node in error and no
  "missing nodes" dialog; the frontend's own API conversion of it (``app.graphToPrompt``) equals
  its API twin in ``workflows/api/`` (the two formats cannot drift apart). A screenshot of each is
  kept in ``artifacts/frontend/``.
* ComfyUI lists the UI workflows as this pack's templates (``/workflow_templates``) and serves them.
* Each API twin runs to completion through ``POST /prompt`` on the tiny SD1 model
  (``tools.workflows.adapt``: 64 px, 3 sampling steps, 2 training steps), in an order where the
  files a workflow needs are made by an earlier one (inversion_training writes ine_nudity).
"""
from __future__ import annotations

import json

import pytest

from tests.graphs import install
from tools import frontend as FE
from tools import workflows as WF
from tools.unlearned_files import perturb, select, write_ldm


@pytest.fixture(scope="module")
def checked(comfy_server):
    FE.ensure_browser()
    return {r["file"]: r for r in FE.run_js("check", comfy_server.url, FE.ARTIFACTS, FE.ui_workflows())}


def test_every_workflow_has_ui_and_api_form():
    ui = {p.stem for p in FE.ui_workflows()}
    api = {p.stem for p in WF.API_DIR.glob("*.json")}
    assert ui == api == set(WF.WORKFLOWS), (ui, api)
    for name in WF.WORKFLOWS:  # the committed API files are what tools/workflows.py builds
        assert json.loads((WF.API_DIR / f"{name}.json").read_text()) == WF.build(name), name


@pytest.mark.parametrize("name", list(WF.WORKFLOWS))
def test_ui_workflow_loads_in_frontend(checked, name):
    path = str(FE.REPO / "workflows" / f"{name}.json")
    r = checked[path]
    assert r["missing"] == [] and r["errors"] == [] and r["dialog"] == "", r
    assert r["n_nodes"] == len(WF.build(name))
    got = FE.normalise_api(r["output"])
    want = FE.normalise_api(WF.build(name))
    assert got == want
    assert (FE.ARTIFACTS / f"{name}.png").stat().st_size > 10_000


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
