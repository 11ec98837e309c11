"""Concept Inversion Trainer + Load Implicit Negative Embedding in a real server via /prompt."""
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from tests.graphs import Graph, install, latent
from tools.comfy_host import ExecutionError, PromptInterrupted


def concept_images(server, folder="concept_blobs", n=4, size=64):
    d = Path(server.input_dir) / folder
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        a = np.full((size, size, 3), 30, np.uint8)
        y, x = rng.integers(8, size - 24, 2)
        a[y:y + 16, x:x + 16] = rng.integers(120, 255, 3)
        Image.fromarray(a).save(d / f"{i}.png")
    return folder


def trainer(g, c, name, steps=6, resume=False, folder="concept_blobs", checkpoint_every=2, preview_every=3,
            num_vectors=2, objective="ldm", **extra):
    settings = dict(num_vectors=num_vectors, init_text="person", template="a photo of {}", steps=steps,
                    learning_rate=0.05, batch_size=2, seed=3, objective=objective, guidance_scale=5.0,
                    negative_text="blurry", checkpoint_every=checkpoint_every, keep_checkpoints=2,
                    preview_every=preview_every, resume=resume, image_folder=folder, resolution=64,
                    gradient_accumulation=1)
    settings.update(extra)
    return g.add("SafeGen_ConceptInversionTrainer", model=c[0], clip=c[1], vae=c[2], name=name, **settings)


def read_emb(server, name):
    p = Path(server.models_dir) / "embeddings" / f"{name}.safetensors"
    with safe_open(str(p), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_train_save_and_use_as_embedding_name(comfy_server):
    ck = install(comfy_server, "sd1")
    folder = concept_images(comfy_server)
    g = Graph()
    c = g.add("CheckpointLoaderSimple", ckpt_name=ck)
    t = trainer(g, c, "ine_blobs")
    g.add("PreviewImage", images=t[1])
    r = comfy_server.run(g, timeout=900)
    prog = [d for typ, d in r.events if typ == "progress" and d.get("node") == str(t)]
    assert prog and max(p["value"] for p in prog) == 6 and prog[-1]["max"] == 6, "progress events per step"
    tensors, meta = read_emb(comfy_server, "ine_blobs")
    assert list(tensors) == ["emb_params"] and tuple(tensors["emb_params"].shape) == (2, 768)
    assert meta["objective"] == "ldm" and meta["steps"] == "6" and len(meta["base_model_hash"]) == 16
    assert float(meta["final_loss"]) > 0
    assert r.images(str(int(t) + 1)), "loss plot image"
    assert not list((Path(comfy_server.models_dir) / "embeddings").glob("*.tmp"))

    # The saved file via stock `embedding:NAME` and via the loader node give the same conditioning:
    # sampled with it as the positive at the same seed, the latents are identical.
    g = Graph()
    c = g.add("CheckpointLoaderSimple", ckpt_name=ck)
    stock = g.add("CLIPTextEncode", clip=c[1], text="a photo of embedding:ine_blobs")
    ours = g.add("SafeGen_LoadImplicitNegativeEmbedding", clip=c[1], embedding_name="ine_blobs.safetensors",
                 text="a photo of {}", strength=1.0)
    plain = g.add("CLIPTextEncode", clip=c[1], text="a photo of")
    neg = g.add("CLIPTextEncode", clip=c[1], text="")
    lat = g.add("EmptyLatentImage", width=64, height=64, batch_size=1)
    outs = {}
    for key, cond in (("stock", stock[0]), ("ours", ours[0]), ("plain", plain[0])):
        ks = g.add("KSampler", model=c[0], positive=cond, negative=neg[0], latent_image=lat[0], seed=5, steps=3,
                   cfg=5.0, sampler_name="euler", scheduler="normal", denoise=1.0)
        outs[key] = g.add("SaveLatent", samples=ks[0], filename_prefix=f"safegen_test/emb_{key}")
    r = comfy_server.run(g, timeout=600)
    lt = {k: latent(comfy_server, r, v) for k, v in outs.items()}
    assert torch.equal(lt["stock"], lt["ours"])
    assert (lt["stock"] - lt["plain"]).abs().max() > 1e-4, "the embedding must matter"


def test_loader_rejects_width_mismatch(comfy_server, tmp_path):
    from safetensors.torch import save_file
    ck = install(comfy_server, "sd1")
    bad = Path(comfy_server.models_dir) / "embeddings" / "wrong_width.safetensors"
    bad.parent.mkdir(parents=True, exist_ok=True)
    save_file({"clip_g": torch.randn(1, 1280)}, str(bad))
    g = Graph()
    c = g.add("CheckpointLoaderSimple", ckpt_name=ck)
    e = g.add("SafeGen_LoadImplicitNegativeEmbedding", clip=c[1], embedding_name="wrong_width.safetensors",
              text="{}", strength=1.0)
    lat = g.add("EmptyLatentImage", width=64, height=64, batch_size=1)
    ks = g.add("KSampler", model=c[0], positive=e[0], negative=e[0], latent_image=lat[0], seed=5, steps=1,
               cfg=5.0, sampler_name="euler", scheduler="normal", denoise=1.0)
    g.add("SaveLatent", samples=ks[0], filename_prefix="safegen_test/never")
    from tools.comfy_host import ExecutionError
    with pytest.raises(ExecutionError, match="wrong_width.*clip_l"):
        comfy_server.run(g, timeout=300)


def test_cancel_leaves_no_file_and_resume_matches_uninterrupted(comfy_server):
    ck = install(comfy_server, "sd1")
    folder = concept_images(comfy_server)
    ckdir = Path(comfy_server.output_dir) / "safegen_checkpoints" / "inversion" / "ine_resume"
    emb_dir = Path(comfy_server.models_dir) / "embeddings"

    def graph(name, resume):
        g = Graph()
        c = g.add("CheckpointLoaderSimple", ckpt_name=ck)
        trainer(g, c, name, steps=10, resume=resume, folder=folder, checkpoint_every=3, preview_every=0)
        return g

    def interrupt_after_checkpoint():
        until = time.time() + 300
        while time.time() < until:
            if ckdir.is_dir() and any(p.suffix == ".safetensors" for p in ckdir.iterdir()):
                comfy_server.client.interrupt()
                return
            time.sleep(0.05)

    th = threading.Thread(target=interrupt_after_checkpoint)
    th.start()
    with pytest.raises(PromptInterrupted):
        comfy_server.run(graph("ine_resume", True), timeout=600)
    th.join()
    assert not (emb_dir / "ine_resume.safetensors").exists(), "a cancelled run must not leave a file"
    assert not list(emb_dir.glob(".*tmp")) and not list(emb_dir.glob("*.tmp"))
    r = comfy_server.run(graph("ine_resume", True), timeout=900)
    info = [d for typ, d in r.events if typ == "executed"]
    assert info
    comfy_server.run(graph("ine_straight", False), timeout=900)
    a, _ = read_emb(comfy_server, "ine_resume")
    b, _ = read_emb(comfy_server, "ine_straight")
    assert torch.equal(a["emb_params"], b["emb_params"]), "resumed run must end where an uninterrupted one does"


@pytest.mark.sdxl
def test_sdxl_inversion_file_layout_and_embedding_syntax(comfy_server):
    ck = install(comfy_server, "sdxl")
    folder = concept_images(comfy_server)
    g = Graph()
    c = g.add("CheckpointLoaderSimple", ckpt_name=ck)
    trainer(g, c, "ine_xl", steps=2, folder=folder, checkpoint_every=0, preview_every=0, num_vectors=1)
    comfy_server.run(g, timeout=1200)
    tensors, meta = read_emb(comfy_server, "ine_xl")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {"clip_l": (1, 768), "clip_g": (1, 1280)}
    g = Graph()
    c = g.add("CheckpointLoaderSimple", ckpt_name=ck)
    stock = g.add("CLIPTextEncode", clip=c[1], text="a photo of embedding:ine_xl")
    ours = g.add("SafeGen_LoadImplicitNegativeEmbedding", clip=c[1], embedding_name="ine_xl.safetensors",
                 text="a photo of {}", strength=1.0)
    neg = g.add("CLIPTextEncode", clip=c[1], text="")
    lat = g.add("EmptyLatentImage", width=64, height=64, batch_size=1)
    outs = {}
    for key, cond in (("stock", stock[0]), ("ours", ours[0])):
        ks = g.add("KSampler", model=c[0], positive=cond, negative=neg[0], latent_image=lat[0], seed=5, steps=2,
                   cfg=5.0, sampler_name="euler", scheduler="normal", denoise=1.0)
        outs[key] = g.add("SaveLatent", samples=ks[0], filename_prefix=f"safegen_test/xl_emb_{key}")
    r = comfy_server.run(g, timeout=900)
    assert torch.equal(latent(comfy_server, r, outs["stock"]), latent(comfy_server, r, outs["ours"]))


@pytest.mark.parametrize("objective", ["np", "sld"])
def test_cce_objectives_run_and_are_recorded(comfy_server, objective):
    ck = install(comfy_server, "sd1")
    folder = concept_images(comfy_server)
    g = Graph()
    c = g.add("CheckpointLoaderSimple", ckpt_name=ck)
    extra = {"batch_size": 1, "sld_timestep_count": 4, "sld_timestep_range": 6} if objective == "sld" else {}
    trainer(g, c, f"ine_{objective}", steps=2, folder=folder, checkpoint_every=0, preview_every=0,
            objective=objective, negative_text="nudity", template="cce:object", gradient_accumulation=2, **extra)
    comfy_server.run(g, timeout=600)
    tensors, meta = read_emb(comfy_server, f"ine_{objective}")
    assert meta["objective"] == objective and torch.isfinite(tensors["emb_params"]).all()
    assert meta["template"] == "cce:object" and meta["gradient_accumulation"] == "2"


def test_cce_objective_without_safety_concept_is_refused(comfy_server):
    ck = install(comfy_server, "sd1")
    folder = concept_images(comfy_server)
    g = Graph()
    c = g.add("CheckpointLoaderSimple", ckpt_name=ck)
    trainer(g, c, "ine_np_empty", steps=2, folder=folder, checkpoint_every=0, preview_every=0, objective="np",
            negative_text="  ")
    with pytest.raises(ExecutionError) as ei:
        comfy_server.run(g, timeout=600)
    err = ei.value.exception_message
    assert "negative_text" in err and "safety concept" in err
    assert not (Path(comfy_server.models_dir) / "embeddings" / "ine_np_empty.safetensors").exists()


def test_embedded_ine_runs_without_the_file_and_equals_the_file(comfy_server):
    """embed_in_workflow: the node's executed message carries the packed vectors; a workflow using them with
    '(embedded in workflow)' runs after the file is gone and gives exactly the file-based result. A base-model
    hash that differs from the connected MODEL's is a warning naming both hashes; damaged text is an error."""
    from safetensors.torch import save_file
    ck = install(comfy_server, "sd1")
    d = Path(comfy_server.models_dir) / "embeddings"
    d.mkdir(parents=True, exist_ok=True)
    vec = 0.03 * torch.randn(2, 768, generator=torch.Generator().manual_seed(4))
    path = d / "share_me.safetensors"
    save_file({"emb_params": vec}, str(path), metadata={"base_model_hash": "0123456789abcdef"})

    def graph(**loader):
        g = Graph()
        c = g.add("CheckpointLoaderSimple", ckpt_name=ck)
        ine = g.add("SafeGen_LoadImplicitNegativeEmbedding", clip=c[1], text="{}", strength=1.0, **loader)
        pos = g.add("CLIPTextEncode", clip=c[1], text="a photo of a cat")
        lat = g.add("EmptyLatentImage", width=64, height=64, batch_size=1)
        ks = g.add("KSampler", model=c[0], positive=pos[0], negative=ine[0], latent_image=lat[0], seed=9, steps=2,
                   cfg=5.0, sampler_name="euler", scheduler="normal", denoise=1.0)
        sv = g.add("SaveLatent", samples=ks[0], filename_prefix="safegen_test/embedded_ine")
        return g, ine, sv, c

    g, ine, sv, _ = graph(embedding_name="share_me.safetensors", embed_in_workflow=True)
    r = comfy_server.run(g, timeout=600)
    from_file = latent(comfy_server, r, sv)
    packed = r.ui(str(ine))["safegen_embedded"][0]
    assert packed.startswith("safegen-ine:v1:") and len(packed) < 20_000
    path.unlink()  # the receiver has no file
    g, ine, sv, _ = graph(embedding_name="(embedded in workflow)", embedded=packed)
    r = comfy_server.run(g, timeout=600)
    assert torch.equal(latent(comfy_server, r, sv), from_file)
    text = " ".join(r.ui(str(ine)).get("text", []))
    assert "embedded INE (share_me.safetensors)" in text
    # base-model hash check against the connected MODEL: a warning naming both hashes
    g = Graph()
    c = g.add("CheckpointLoaderSimple", ckpt_name=ck)
    ine = g.add("SafeGen_LoadImplicitNegativeEmbedding", clip=c[1], text="{}", strength=1.0,
                embedding_name="(embedded in workflow)", embedded=packed, model=c[0])
    g.add("PreviewAny", source=ine[1])
    r = comfy_server.run(g, timeout=600)
    warn = " ".join(r.ui(str(ine)).get("text", []))
    assert "WARNING" in warn and "0123456789abcdef" in warn and re.search(r"has hash [0-9a-f]{16}", warn), warn
    # damaged vectors: a clear error
    g, _, _, _ = graph(embedding_name="(embedded in workflow)", embedded=packed[:-40] + "!!!!")
    with pytest.raises(ExecutionError) as e:
        comfy_server.run(g, timeout=600)
    assert "embedded INE" in e.value.exception_message and "damaged" in e.value.exception_message


def test_frontend_freezes_the_ine_into_the_saved_workflow(comfy_server, tmp_path):
    """The web extension (web/js/safegen_embed.js) in ComfyUI's real frontend: a graph queued from the UI with
    embed_in_workflow on comes back with the vectors in the node's `embedded` widget and '(embedded in
    workflow)' selected; the workflow the frontend then saves holds them, and its API form runs on a server
    without the file and gives exactly the file-based image."""
    import json

    from safetensors.torch import save_file

    from safegen_core.inversion import unpack_embedding
    from tools import frontend as FE
    FE.ensure_browser()
    ck = install(comfy_server, "sd1")
    d = Path(comfy_server.models_dir) / "embeddings"
    d.mkdir(parents=True, exist_ok=True)
    vec = 0.03 * torch.randn(1, 768, generator=torch.Generator().manual_seed(5))
    path = d / "freeze_me.safetensors"
    save_file({"emb_params": vec}, str(path))
    g = Graph()
    c = g.add("CheckpointLoaderSimple", ckpt_name=ck)
    ine = g.add("SafeGen_LoadImplicitNegativeEmbedding", clip=c[1], text="{}", strength=1.0,
                embedding_name="freeze_me.safetensors", embed_in_workflow=True, embedded="")
    pos = g.add("CLIPTextEncode", clip=c[1], text="a photo of a dog")
    lat = g.add("EmptyLatentImage", width=64, height=64, batch_size=1)
    ks = g.add("KSampler", model=c[0], positive=pos[0], negative=ine[0], latent_image=lat[0], seed=3, steps=2,
               cfg=5.0, sampler_name="euler", scheduler="normal", denoise=1.0)
    sv = g.add("SaveLatent", samples=ks[0], filename_prefix="safegen_test/frozen_ine")
    api = tmp_path / "freeze_ine.json"
    api.write_text(json.dumps(g))
    (r,) = FE.run_js("freeze", comfy_server.url, tmp_path, [api])  # the first run of this graph (not cached)
    g[str(sv)]["inputs"]["filename_prefix"] = "safegen_test/frozen_ine_ref"  # only the save runs again
    from_file = latent(comfy_server, comfy_server.run(g, timeout=600), sv)
    assert r["extension_loaded"] and r["page_errors"] == [], r.get("page_errors")
    assert r["frozen"], r["widgets"]
    w = r["widgets"]
    assert w["embedding_name"] == "(embedded in workflow)" and w["embed_in_workflow"] is False
    vectors, meta = unpack_embedding(w["embedded"])
    assert torch.equal(next(iter(vectors.values())).reshape(vec.shape), vec)
    assert meta.get("source_file") == "freeze_me.safetensors"
    saved = [n for n in r["wf"]["nodes"] if n["type"] == "SafeGen_LoadImplicitNegativeEmbedding"]
    assert len(saved) == 1 and w["embedded"] in saved[0]["widgets_values"]
    path.unlink()  # the receiver has no file: the frontend's API form of the saved workflow still runs
    prompt = r["output"]
    assert prompt[r["node"]]["inputs"]["embedding_name"] == "(embedded in workflow)"
    prompt[str(ks)]["inputs"]["seed"] = 3  # the frontend's "control after generate" may have moved it
    assert torch.equal(latent(comfy_server, comfy_server.run(prompt, timeout=600), sv), from_file)
