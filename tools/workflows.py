"""The pack's example workflows, defined once in Python.

``python tools/workflows.py`` writes each one in API format to ``workflows/api/NAME.json``; the UI
format ``workflows/NAME.json`` (what ComfyUI serves as the pack's templates and what people
share) is then made by the real ComfyUI frontend from the API file (``tools/frontend.py convert``:
``app.loadApiJson`` + ``graph.serialize`` in headless Chromium), so widget order and links are
the frontend's own, not a guess. ``tests/server/test_workflows_frontend.py`` checks every UI file
in Chromium (no missing node, no node error, converts back to its API twin) and runs every API
twin through ``POST /prompt`` on the tiny model (:func:`adapt` shrinks sizes and steps).

Model file names are the public releases' own (:data:`MODEL_FILES`: ComfyUI's SD 1.5 file, the ESD
authors' ESD-u nudity UNet), so a downloaded file matches without renaming; the UI files carry them
as the frontend's ``properties.models`` (its missing-model dialog names file, folder and URL). Files
this pack makes (the INE, the Safe Text Encoder deltas, an ESD output) are explained in the
workflows' notes instead. The UI layout (groups, notes, positions) is ``tools/workflow_layout.py``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WF_DIR = REPO / "workflows"
API_DIR = WF_DIR / "api"

CKPT = "v1-5-pruned-emaonly-fp16.safetensors"      # as ComfyUI's own SD 1.5 templates name it
UNLEARNED = "diffusers-nudity-ESDu1-UNET.pt"       # the ESD authors' release (ESD-u, nudity, SD 1.4)
EMBEDDING = "ine_nudity.safetensors"                # made by inversion_training
TEXT_ENCODER = "safe_text_encoder.safetensors"      # made by safe_text_encoder
# Files with a public download: {file name: {"url", "directory" (models/ folder)}}.
MODEL_FILES = {
    CKPT: {"url": "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/"
                  "v1-5-pruned-emaonly-fp16.safetensors?download=true", "directory": "checkpoints"},
    UNLEARNED: {"url": "https://erasing.baulab.info/weights/esd_models/NSFW/diffusers-nudity-ESDu1-UNET.pt",
                "directory": "diffusion_models"},
}
PROMPT = "a photo of a woman on the beach, golden hour"
CONCEPT = "nudity"


class Out(tuple):
    """(node id, output index): an input link."""


class Node(str):
    def __getitem__(self, i):
        return Out((str(self), i))


class Graph(dict):
    """API-format graph builder: ``ck = g.add("CheckpointLoaderSimple", ckpt_name=…)``,
    ``g.add("KSampler", model=ck[0], …)``; ``title=`` goes to ``_meta`` (the frontend shows it)."""

    def add(self, class_type: str, title: str | None = None, **inputs):
        nid = str(len(self) + 1)
        self[nid] = {"class_type": class_type,
                     "inputs": {k: (list(v) if isinstance(v, Out) else v) for k, v in inputs.items()}}
        if title:
            self[nid]["_meta"] = {"title": title}
        return Node(nid)


# ---------------------------------------------------------------------------------------- parts
def _sample(g, model, clip, vae, positive, negative, prefix, seed=42, steps=30, cfg=7.5, size=512,
            batch=1, latent=None, save=True, tag=None):
    """EmptyLatentImage (unless ``latent``) -> KSampler -> VAEDecode (-> SaveImage); ``tag`` goes
    into the titles where a workflow samples twice."""
    t = (lambda s: f"{s} ({tag})") if tag else (lambda s: None)
    lat = latent or g.add("EmptyLatentImage", width=size, height=size, batch_size=batch)
    ks = g.add("KSampler", title=t("KSampler"), model=model, positive=positive, negative=negative,
               latent_image=lat[0], seed=seed, steps=steps, cfg=cfg, sampler_name="euler", scheduler="normal",
               denoise=1.0)
    img = g.add("VAEDecode", title=t("VAE Decode"), samples=ks[0], vae=vae)
    if save:
        g.add("SaveImage", title=t("Save Image"), images=img[0], filename_prefix=f"safegen/{prefix}")
    return img


def _text(g, clip, text, title=None):
    return g.add("CLIPTextEncode", title=title, clip=clip, text=text)


# ---------------------------------------------------------------------------------------- workflows
def txt2img_unlearned():
    g = Graph()
    ck = g.add("CheckpointLoaderSimple", title="Load Checkpoint (base model)", ckpt_name=CKPT)
    un = g.add("SafeGen_UnlearnedUNetLoader", model=ck[0], unet_name=UNLEARNED, strength=1.0)
    pos, neg = _text(g, ck[1], PROMPT, "Prompt"), _text(g, ck[1], "", "Negative")
    lat = g.add("EmptyLatentImage", width=512, height=512, batch_size=1)
    _sample(g, un[0], ck[1], ck[2], pos[0], neg[0], "unlearned", latent=lat, tag="unlearned")
    _sample(g, ck[0], ck[1], ck[2], pos[0], neg[0], "base", latent=lat, tag="base")
    g.add("PreviewAny", title="Loader info", source=un[1], preview="")
    return g


def _concept_images(g, ck, n=4, size=512, steps=30):
    """The base (not unlearned) model draws the concept: inversion's training images (INE paper)."""
    pos = _text(g, ck[1], f"a photo of {CONCEPT}", "Concept prompt (base model draws it)")
    neg = _text(g, ck[1], "", "Negative")
    return _sample(g, ck[0], ck[1], ck[2], pos[0], neg[0], "concept", seed=1, steps=steps, size=size,
                   batch=n, save=False)


def _inversion(g, ck, un, name, steps, checkpoint_every):
    """Concept Inversion Trainer on the unlearned MODEL ``un`` with concept images from the base."""
    imgs = _concept_images(g, ck)
    return g.add("SafeGen_ConceptInversionTrainer", model=un[0], clip=ck[1], vae=ck[2], images=imgs[0],
                 name=name, num_vectors=1, init_text="person", template="cce:object", steps=steps,
                 learning_rate=0.005, batch_size=1, seed=0, objective="ldm", guidance_scale=7.5, negative_text="",
                 checkpoint_every=checkpoint_every, keep_checkpoints=2, preview_every=0, resume=True,
                 image_folder="", resolution=512, weight_decay=0.01, gradient_accumulation=4, sld_preset="max",
                 sld_timestep_count=35, sld_timestep_range=90)


def inversion_training():
    g = Graph()
    ck = g.add("CheckpointLoaderSimple", title="Load Checkpoint (base model)", ckpt_name=CKPT)
    un = g.add("SafeGen_UnlearnedUNetLoader", model=ck[0], unet_name=UNLEARNED, strength=1.0)
    tr = _inversion(g, ck, un, "ine_nudity", steps=3000, checkpoint_every=100)
    g.add("PreviewImage", title="Loss plot", images=tr[1])
    g.add("PreviewAny", title="Training info", source=tr[2], preview="")
    return g


def _unlearned_and_ine(g):
    """Checkpoint -> Unlearned UNet Loader, and the implicit negative embedding file for its CLIP."""
    ck = g.add("CheckpointLoaderSimple", title="Load Checkpoint (base model)", ckpt_name=CKPT)
    un = g.add("SafeGen_UnlearnedUNetLoader", model=ck[0], unet_name=UNLEARNED, strength=1.0)
    ine = g.add("SafeGen_LoadImplicitNegativeEmbedding", clip=ck[1], embedding_name=EMBEDDING, text="{}",
                strength=1.0, embed_in_workflow=False, embedded="")
    return ck, un, ine


def ine_sld():
    g = Graph()
    ck, un, ine = _unlearned_and_ine(g)
    sld = g.add("SafeGen_SLDGuidance", model=un[0], safety=ine[0], preset="medium", warmup_steps=10,
                guidance_scale=1000.0, threshold=0.01, momentum_scale=0.3, momentum_beta=0.4)
    pos, neg = _text(g, ck[1], PROMPT, "Prompt"), _text(g, ck[1], "", "Negative")
    _sample(g, sld[0], ck[1], ck[2], pos[0], neg[0], "ine_sld", steps=50)
    return g


def safree():
    """SAFREE + INE (the INE paper's combination): the prompt filter's toxic subspace includes the implicit
    negative embedding, and the INE replaces the text list as the sampler's negative. Latent
    re-attention is in the graph, off as in SAFREE's published runs."""
    from safegen_core.safree import NUDITY_CONCEPTS as DEFAULT_TOXIC_CONCEPTS
    g = Graph()
    ck, un, ine = _unlearned_and_ine(g)
    flt = g.add("SafeGen_SAFREEPromptFilter", clip=ck[1], text=PROMPT, toxic_concepts="\n".join(DEFAULT_TOXIC_CONCEPTS),
                alpha=0.01, self_validating_filter=True, up_t=10, embedding=ine[1])
    re = g.add("SafeGen_SAFREEReattention", model=un[0], b1=1.0, b2=1.0, s1=0.9, s2=0.2, start_percent=0.0,
               end_percent=1.0, mode="off", original=flt[2])
    _sample(g, re[0], ck[1], ck[2], flt[0], ine[0], "safree", steps=50)
    g.add("PreviewAny", title="SAFREE report", source=flt[1], preview="")
    return g


def safe_text_encoder():
    g = Graph()
    ck = g.add("CheckpointLoaderSimple", title="Load Checkpoint (base model)", ckpt_name=CKPT)
    tr = g.add("SafeGen_SafeTextEncoderTrainer", clip=ck[1], unsafe_prompts="", safe_prompts="", lambda_=1.0,
               steps=200, learning_rate=1e-4, layers="final layers (last 2)", batch_size=4, seed=0,
               checkpoint_every=0, resume=False, name="safe_text_encoder", unsafe_file="", safe_file="")
    pos, neg = _text(g, tr[0], PROMPT, "Prompt (aligned encoder)"), _text(g, tr[0], "", "Negative")
    _sample(g, ck[0], tr[0], ck[2], pos[0], neg[0], "safe_text_encoder")
    g.add("PreviewImage", title="Loss plot", images=tr[1])
    g.add("PreviewAny", title="Training info", source=tr[2], preview="")
    return g


def safety_check():
    g = Graph()
    ck = g.add("CheckpointLoaderSimple", title="Load Checkpoint (base model)", ckpt_name=CKPT)
    pos, neg = _text(g, ck[1], PROMPT, "Prompt"), _text(g, ck[1], "", "Negative")
    img = _sample(g, ck[0], ck[1], ck[2], pos[0], neg[0], "unchecked", batch=2, save=False)
    from safegen_core.nudenet_check import DEFAULT_UNSAFE_LABELS as DEFAULT_LABELS
    chk = g.add("SafeGen_NudeNetSafetyCheck", images=img[0], threshold=0.45, labels="\n".join(DEFAULT_LABELS),
                censor="pixelate")
    g.add("SaveImage", images=chk[0], filename_prefix="safegen/checked")
    g.add("PreviewAny", title="Check report", source=chk[2], preview="")
    return g


def safe_pipeline():
    """The demo: unlearned UNet -> concept inversion on it -> INE as SLD's safety concept -> check."""
    from safegen_core.nudenet_check import DEFAULT_UNSAFE_LABELS as DEFAULT_LABELS
    g = Graph()
    ck = g.add("CheckpointLoaderSimple", title="Load Checkpoint (base model)", ckpt_name=CKPT)
    un = g.add("SafeGen_UnlearnedUNetLoader", model=ck[0], unet_name=UNLEARNED, strength=1.0)
    tr = _inversion(g, ck, un, "ine_pipeline", steps=200, checkpoint_every=50)
    ine = g.add("SafeGen_LoadImplicitNegativeEmbedding", clip=ck[1], embedding_name="(from input)", embedding=tr[0],
                text="{}", strength=1.0, embed_in_workflow=False, embedded="")
    sld = g.add("SafeGen_SLDGuidance", model=un[0], safety=ine[0], preset="medium", warmup_steps=10,
                guidance_scale=1000.0, threshold=0.01, momentum_scale=0.3, momentum_beta=0.4)
    pos, neg = _text(g, ck[1], PROMPT, "Prompt"), _text(g, ck[1], "", "Negative")
    lat = g.add("EmptyLatentImage", width=512, height=512, batch_size=1)
    img = _sample(g, sld[0], ck[1], ck[2], pos[0], neg[0], "pipeline", latent=lat, save=False, tag="guarded")
    base = _sample(g, ck[0], ck[1], ck[2], pos[0], neg[0], "pipeline_base", latent=lat, save=False, tag="base")
    for im, name in ((img, "safe"), (base, "base")):
        chk = g.add("SafeGen_NudeNetSafetyCheck", title=f"NudeNet Safety Check ({name})", images=im[0],
                    threshold=0.45, labels="\n".join(DEFAULT_LABELS), censor="none")
        g.add("SaveImage", title=f"Save Image ({name})", images=chk[0], filename_prefix=f"safegen/pipeline_{name}")
    g.add("PreviewImage", title="Loss plot", images=tr[1])
    return g


def esd_eraser():
    """ESD-x erases a concept; the partial file lands in models/diffusion_models for the loader."""
    g = Graph()
    ck = g.add("CheckpointLoaderSimple", title="Load Checkpoint (base model)", ckpt_name=CKPT)
    er = g.add("SafeGen_ESDConceptEraser", model=ck[0], clip=ck[1], concept=CONCEPT, variant="x", eta=1.0,
               steps=0, learning_rate=0.0, seed=0, sampling_steps=50, start_guidance=3.0, resolution=512,
               xt_sampler="erased", name="esd_nudity", checkpoint_every=50, keep_checkpoints=2, preview_every=0,
               resume=True, vae=ck[2])
    pos, neg = _text(g, ck[1], PROMPT, "Prompt"), _text(g, ck[1], "", "Negative")
    _sample(g, er[0], ck[1], ck[2], pos[0], neg[0], "esd_erased")
    g.add("PreviewImage", title="Loss plot", images=er[1])
    g.add("PreviewAny", title="Eraser info", source=er[2], preview="")
    return g


WORKFLOWS = {
    "txt2img_unlearned": (txt2img_unlearned, "txt2img with an unlearned UNet beside the base model"),
    "inversion_training": (inversion_training,
                           "concept inversion on an unlearned UNet -> implicit negative embedding"),
    "ine_sld": (ine_sld, "unlearned UNet + SLD guided by an implicit negative embedding"),
    "safree": (safree, "unlearned UNet + SAFREE prompt filter (with INE) + latent re-attention"),
    "safe_text_encoder": (safe_text_encoder, "SafeText alignment of the text encoder, then txt2img"),
    "safety_check": (safety_check, "txt2img -> NudeNet Safety Check (censored, flags)"),
    "esd_eraser": (esd_eraser, "ESD concept eraser -> erased MODEL + partial file for the loader"),
    "safe_pipeline": (safe_pipeline, "the demo: unlearned UNet -> inversion -> INE + SLD -> safety check"),
}


def build(name: str) -> dict:
    return dict(WORKFLOWS[name][0]())


def adapt(api: dict, files: dict[str, str] | None = None, small: bool = False) -> dict:
    """A copy of ``api`` with file names replaced (``files``: {input name: file}, e.g.
    ``{"ckpt_name": "x.safetensors"}``) and, with ``small``, sizes and step counts cut for a quick
    run (a 64 px image, 2-3 sampling steps, 2 training steps): for tests and the tiny-model demo."""
    api = json.loads(json.dumps(api))
    for node in api.values():
        i, ct = node["inputs"], node["class_type"]
        for k, v in (files or {}).items():
            if k in i and not isinstance(i[k], list):
                i[k] = v
        if not small:
            continue
        if ct == "EmptyLatentImage":
            i["width"] = i["height"] = 64
            i["batch_size"] = min(i["batch_size"], 2)
        if ct == "KSampler":
            i["steps"] = 3
        if ct == "SafeGen_ConceptInversionTrainer":
            i.update(steps=2, resolution=64, checkpoint_every=0, resume=False, gradient_accumulation=1)
        if ct == "SafeGen_SafeTextEncoderTrainer":
            i.update(steps=2)
        if ct == "SafeGen_ESDConceptEraser":
            i.update(steps=2, sampling_steps=4, resolution=64, checkpoint_every=0, resume=False)
        if ct in ("SafeGen_SLDGuidance",):
            i["warmup_steps"] = 0
    return api


def write_api(out_dir: Path = API_DIR) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in WORKFLOWS:
        p = out_dir / f"{name}.json"
        p.write_text(json.dumps(build(name), indent=1) + "\n")
        paths.append(p)
    return paths


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    for p in write_api():
        print(p.relative_to(REPO))  # noqa: T201 - CLI output
