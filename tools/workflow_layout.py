"""How each example workflow looks in ComfyUI: stages as titled, coloured groups laid out left to
right, a MarkdownNote per group (what the stage does, which file goes where, which settings
matter), every node placed and sized. Data, applied by ``tools/frontend.py convert`` after the
frontend's ``app.loadApiJson`` (``tools/frontend/frontend.js``), so widgets and links stay the
frontend's own and only geometry, groups and notes come from here.

A layout is a row of groups (:data:`LAYOUTS`); a group is columns of nodes (API node ids from
``tools.workflows.Graph``), each column a width and its items top to bottom: a node id, or
``(id, {"y": offset, "h": height, "w": width})`` to place a node at ``offset`` below the body top
(aligning it with the link that feeds it) or size it. :func:`resolve` turns that into absolute
``pos``/``size`` per node, group ``bounding`` boxes, note nodes and the view (``extra.ds``) that
shows all of it in :data:`VIEW`. Long links (the checkpoint's MODEL/CLIP/VAE) run in a free band
between the notes and the first row of nodes; nodes fed by them sit at that band's height.
"""
from __future__ import annotations

from tools.workflows import CKPT, CONCEPT, EMBEDDING, MODEL_FILES, UNLEARNED

# ----------------------------------------------------------------------------------- geometry
TITLE = 30          # node title bar (LiteGraph.NODE_TITLE_HEIGHT); a node's box is pos.y - TITLE .. pos.y + h
GROUP_HEAD = 56     # group title bar (font 24) + space above the first box
GROUP_FONT = 24
PAD = 20            # group inner padding (sides, bottom)
VGAP = 24           # between boxes in a column
HGAP = 40           # between columns
GROUP_GAP = 40      # between groups

# The first view: the 1600x1000 window the frontend tests use, minus the frontend's own chrome
# (top bar and tabs, side bar, the Run toolbar, the minimap and zoom buttons bottom right).
# Screen px = (graph + ds.offset) * ds.scale; every node must land in CLEAR and outside MINIMAP.
VIEW = (1600, 1000)
CLEAR = (72, 136, 1588, 988)           # x0, y0, x1, y1
MINIMAP = (1330, 730, 1600, 1000)      # bottom-right corner the minimap and zoom buttons cover
MAX_SCALE = 0.8
# Below this zoom frontend 1.32 draws nodes without their text (LiteGraph.Canvas.MinFontSizeForLOD
# 8 px / 14 px node text = 0.571): every workflow but the big demo opens at least this large.
READABLE_SCALE = 0.58
OVERVIEW_ONLY = {"safe_pipeline"}      # 22 nodes in five stages: opens as an overview

# group colours (LiteGraph's groupcolor palette), one per kind of stage
C_MODEL = "#3f789e"     # pale blue: loaders
C_TRAIN = "#a1309b"     # purple: training (inversion, ESD, SafeText)
C_PROMPT = "#b58b2a"    # yellow: prompts, latent
C_SAFETY = "#b06634"    # brown: safety guidance / filters
C_SAMPLE = "#88A"       # blue: sampling
C_CHECK = "#A88"        # red: check and results

# body height of each node type (at least the frontend's computeSize; convert keeps the larger)
HEIGHT = {
    "CheckpointLoaderSimple": 98, "SafeGen_UnlearnedUNetLoader": 102, "CLIPTextEncode": 110,
    "EmptyLatentImage": 106, "KSampler": 262, "VAEDecode": 46, "SaveImage": 330, "PreviewImage": 300,
    "PreviewAny": 110, "SafeGen_ConceptInversionTrainer": 706, "SafeGen_LoadImplicitNegativeEmbedding": 254,
    "SafeGen_SLDGuidance": 198, "SafeGen_NudeNetSafetyCheck": 216, "SafeGen_SafeTextEncoderTrainer": 470,
    "SafeGen_SAFREEPromptFilter": 254, "SafeGen_SAFREEReattention": 222, "SafeGen_ESDConceptEraser": 458,
}


def _url(name: str) -> str:
    return MODEL_FILES[name]["url"]


# ----------------------------------------------------------------------------------- notes
# Markdown, rendered by the MarkdownNote node. Files: where each goes and where to get it.
N_CKPT = f"""**Base model (SD 1.5).** Gives CLIP, VAE and the reference UNet.

- `{CKPT}` → `models/checkpoints` ([download]({_url(CKPT)})). Any SD 1.x checkpoint works."""

N_UNLEARNED = f"""**Unlearned UNet Loader** applies concept-erased weights to the base as patches.

- `{UNLEARNED}` → `models/diffusion_models`: the ESD authors' ESD-u *nudity* UNet ([weights]({_url(UNLEARNED)}), \
index: https://erasing.baulab.info/weights/esd_models/), or a file you made with the `esd_eraser` workflow \
(`esd_nudity.safetensors`). UCE/RECE files and LoRA-style adapters load too.
- **strength**: 1 = the unlearned model, 0 = the base."""

N_MODELS = N_CKPT + "\n\n" + N_UNLEARNED

N_PROMPT = """**Prompt.** The text to draw and the negative prompt, encoded with the base CLIP; the empty latent \
sets size (512 for SD 1.5) and batch."""

N_COMPARE = """**Sample twice** with the same prompts, latent and seed: top with the **unlearned** UNet, bottom \
with the **base** for comparison. Images go to `output/safegen/`. The info box shows what the loader \
applied (format, tensors replaced)."""

N_CONCEPT_IMAGES = f"""**Concept images.** The *base* model draws the concept ("a photo of {CONCEPT}", batch 4) — \
the training images of the inversion (as in the INE paper). Or leave **images** unconnected and \
set the trainer's **image_folder** to a folder of your own under `input/`."""

N_INVERSION = f"""**Concept inversion** learns an *implicit negative embedding* (INE): a token vector that makes the \
*unlearned* model draw the concept again.

- Saves `models/embeddings/<name>.safetensors` (here `{EMBEDDING}`), which **Load Implicit Negative \
Embedding** reads in `ine_sld` and `safree`.
- **steps** 3000 and **learning_rate** 0.005 as in the INE paper; **checkpoint_every** + **resume** \
continue an interrupted run. The loss plot and info show progress."""

N_INE = f"""**Implicit negative embedding.** Loads `{EMBEDDING}` from `models/embeddings` — made by the \
`inversion_training` workflow (there is no download; train it first).

**text**: `{{}}` marks where the embedding goes; **strength** is its token weight."""

N_SLD = """**SLD** (Safe Latent Diffusion) steers each sampling step away from the safety concept — here \
the INE, so the unlearned model is pushed away from what it still knows.

**preset**: weak / medium / strong / max (paper settings); the numbers below it apply with *custom*."""

N_SAMPLE = """**Sample** with the guarded model. 50 steps: SLD's warm-up counts in steps. Images go to \
`output/safegen/`."""

N_SAMPLE_SAFREE = """**Sample** with the filtered prompt (positive) and the INE (negative) on the unlearned model. \
Images go to `output/safegen/`."""

N_SAFREE = """**SAFREE** filters the prompt: tokens close to the toxic subspace (the concept list **plus** the \
INE) are projected away; **alpha** sets how close counts. The INE also replaces the text list as the \
negative. **Latent re-attention** is in the graph, **mode** off as in SAFREE's published runs.

The report box lists the flagged tokens."""

N_SAFETEXT = """**Safe Text Encoder** (SafeText) fine-tunes the text encoder so *unsafe* prompts move away from \
their originals while *safe* prompts stay.

- Empty prompt lists = the pack's defaults; or one per line, or `unsafe_file`/`safe_file` under `input/`.
- Saves `models/text_encoders/<name>.safetensors` (weight differences); load it later with the \
**Safe Text Encoder** node. **steps**, **lambda_** and **layers** matter most."""

N_SAMPLE_ALIGNED = """**Sample** with the aligned CLIP (the trainer's output) and the base UNet. Images go to \
`output/safegen/`."""

N_SAMPLE_PLAIN = """**Sample** with the base model (batch 2). The images go to the check, not to disk."""

N_CHECK = """**NudeNet Safety Check** detects exposed body parts in each image.

- **threshold** 0.45 as in the papers; **labels**: which detections make an image unsafe.
- **censor**: pixelate / blur / black box the counted regions (none = report only).
- The detector downloads itself on first use. The report box shows per-image results."""

N_CHECK_BOTH = """**NudeNet Safety Check** on both: top the guarded images, bottom the base model's.

- **threshold** 0.45 as in the papers; **labels**: which detections count; **censor** none = report \
only. The detector downloads itself on first use.
- Images go to `output/safegen/pipeline_safe_*` and `pipeline_base_*`."""

N_ESD = f"""**ESD Concept Eraser** fine-tunes the UNet so it no longer draws **concept** ("{CONCEPT}").

- **variant** x = cross-attention only (named objects, styles), u = the rest (broad concepts such as \
nudity), x-strict = attn2 keys/values.
- **steps**/**learning_rate** 0 = the reference's defaults; training needs a GPU.
- Saves `models/diffusion_models/<name>.safetensors` (here `esd_nudity.safetensors`) — pick it in the \
**Unlearned UNet Loader** of the other workflows."""

N_SAMPLE_ERASED = """**Sample** with the erased MODEL straight from the eraser. Images go to `output/safegen/`."""

N_PIPE_SAFE = """**Safe sampling.** The INE just trained (via the **embedding** input) becomes SLD's safety concept \
on the unlearned model. Top: guarded; bottom: the base model with the same prompt and seed, for \
comparison. **preset** sets SLD's strength."""

N_PIPE_INVERSION = f"""**Concept inversion** on the *unlearned* model: the embedding that brings the concept back \
(the INE). Saved as `models/embeddings/ine_pipeline.safetensors`; **steps** 200 here for a demo \
(INE paper: 3000), **resume** continues a run."""


# ----------------------------------------------------------------------------------- layouts
def G(title, color, note, note_h, *columns):
    return {"title": title, "color": color, "note": note, "note_h": note_h, "columns": list(columns)}


def col(width, *items, gap=HGAP):
    """A column ``width`` wide, ``gap`` right of the previous one."""
    return {"w": width, "items": list(items), "gap": gap}


LAYOUTS = {
    # 1 ckpt, 2 unlearned loader, 3 prompt, 4 negative, 5 latent, 6 KSampler (unlearned), 7 decode, 8 save,
    # 9 KSampler (base), 10 decode, 11 save, 12 loader info
    "txt2img_unlearned": [
        G("1 · Models", C_MODEL, N_MODELS, 140,
          col(300, "1"), col(300, ("2", {"y": 536})), col(240, ("12", {"y": 620, "h": 90}))),
        G("2 · Prompt", C_PROMPT, N_PROMPT, 140,
          col(400, ("3", {"y": 250}), ("4", {"y": 414}), ("5", {"y": 660}))),
        G("3 · Sample: base vs unlearned", C_SAMPLE, N_COMPARE, 140,
          col(290, ("9", {"y": 190}), ("6", {"y": 536})), col(230, ("10", {"y": 0}), ("7", {"y": 100}), gap=80)),
        G("4 · Results", C_CHECK, "**Results**: the base model (top), the unlearned UNet (bottom).", 140,
          col(320, ("11", {"y": 0, "h": 300}), ("8", {"y": 354, "h": 300}))),
    ],
    # 1 ckpt, 2 prompt, 3 negative, 4 latent, 5 KSampler, 6 decode, 7 NudeNet, 8 save, 9 report
    "safety_check": [
        G("1 · Model", C_MODEL, N_CKPT, 110, col(300, "1")),
        G("2 · Prompt", C_PROMPT, N_PROMPT, 110, col(400, ("2", {"y": 190}), "3", "4")),
        G("3 · Sample", C_SAMPLE, N_SAMPLE_PLAIN, 110, col(290, ("5", {"y": 120})), col(160, ("6", {"y": 20}))),
        G("4 · Check", C_CHECK, N_CHECK, 110,
          col(330, ("7", {"y": 20})), col(320, ("8", {"y": 20}), ("9", {"y": 404}))),
    ],
    # 1 ckpt, 2 loader, 3 INE, 4 SLD, 5 prompt, 6 negative, 7 latent, 8 KSampler, 9 decode, 10 save
    "ine_sld": [
        G("1 · Models + implicit negative embedding", C_MODEL, N_MODELS + "\n\n" + N_INE, 200,
          col(300, "1"), col(320, ("2", {"y": 220}), ("3", {"y": 376}))),
        G("2 · Safety guidance (SLD)", C_SAFETY, N_SLD, 200, col(290, ("4", {"y": 480}))),
        G("3 · Prompt", C_PROMPT, N_PROMPT, 200, col(400, ("5", {"y": 170}), ("6", {"y": 334}), ("7", {"y": 580}))),
        G("4 · Sample", C_SAMPLE, N_SAMPLE, 200,
          col(290, ("8", {"y": 480})), col(160, ("9", {"y": 20})), col(320, ("10", {"y": 20}))),
    ],
    # 1 ckpt, 2 loader, 3 INE, 4 SAFREE filter, 5 re-attention, 6 latent, 7 KSampler, 8 decode, 9 save, 10 report
    "safree": [
        G("1 · Models + implicit negative embedding", C_MODEL, N_MODELS + "\n\n" + N_INE, 190,
          col(300, "1"), col(300, ("3", {"y": 440}), ("2", {"y": 748}))),
        G("2 · SAFREE", C_SAFETY, N_SAFREE, 190,
          col(340, ("4", {"y": 120, "h": 300})), col(290, ("5", {"y": 680}), ("10", {"y": 956, "h": 160}))),
        G("3 · Sample", C_SAMPLE, N_SAMPLE_SAFREE, 190,
          col(240, ("6", {"y": 840})), col(290, ("7", {"y": 400})), col(160, ("8", {"y": 20})),
          col(280, ("9", {"y": 20}))),
    ],
    # 1 ckpt, 2 SafeText trainer, 3 prompt, 4 negative, 5 latent, 6 KSampler, 7 decode, 8 save, 9 loss, 10 info
    "safe_text_encoder": [
        G("1 · Model", C_MODEL, N_CKPT, 110, col(300, "1")),
        G("2 · Align the text encoder (SafeText)", C_TRAIN, N_SAFETEXT, 110,
          col(400, ("2", {"y": 120, "h": 560})), col(300, ("9", {"y": 420, "h": 260}), "10", gap=80)),
        G("3 · Prompt", C_PROMPT, N_PROMPT, 110, col(400, ("3", {"y": 200}), "4", "5")),
        G("4 · Sample", C_SAMPLE, N_SAMPLE_ALIGNED, 110,
          col(290, ("6", {"y": 120})), col(160, ("7", {"y": 20})), col(320, ("8", {"y": 20}))),
    ],
    # 1 ckpt, 2 ESD eraser, 3 prompt, 4 negative, 5 latent, 6 KSampler, 7 decode, 8 save, 9 loss, 10 info
    "esd_eraser": [
        G("1 · Model", C_MODEL, N_CKPT, 110, col(300, "1")),
        G("2 · Erase the concept (ESD)", C_TRAIN, N_ESD, 110,
          col(330, ("2", {"y": 420})), col(300, ("9", {"y": 490, "h": 260}), "10", gap=80)),
        G("3 · Prompt", C_PROMPT, N_PROMPT, 110, col(400, ("3", {"y": 130}), ("4", {"y": 294}), ("5", {"y": 500}))),
        G("4 · Sample", C_SAMPLE, N_SAMPLE_ERASED, 110,
          col(290, ("6", {"y": 420})), col(160, ("7", {"y": 20})), col(320, ("8", {"y": 20}))),
    ],
    # 1 ckpt, 2 loader, 3 concept prompt, 4 negative, 5 latent, 6 KSampler, 7 decode, 8 trainer, 9 loss, 10 info
    "inversion_training": [
        G("1 · Base model", C_MODEL, N_CKPT, 150, col(300, "1")),
        G("2 · Concept images", C_PROMPT, N_CONCEPT_IMAGES, 150,
          col(400, ("3", {"y": 380}), "4", "5"), col(290, ("6", {"y": 320}))),
        G("3 · Concept inversion on the unlearned UNet", C_TRAIN, N_UNLEARNED + "\n\n" + N_INVERSION, 150,
          col(300, ("2", {"y": 100}), ("7", {"y": 260})), col(330, ("8", {"y": 0})),
          col(300, ("9", {"y": 0}), "10")),
    ],
    # 1 ckpt, 2 loader, 3 concept prompt, 4 negative, 5 latent, 6 KSampler, 7 decode, 8 trainer, 9 INE,
    # 10 SLD, 11 prompt, 12 negative, 13 latent, 14 KSampler (guarded), 15 decode, 16 KSampler (base),
    # 17 decode, 18 check (safe), 19 save, 20 check (base), 21 save, 22 loss
    "safe_pipeline": [
        G("1 · Base model", C_MODEL, N_CKPT, 130, col(300, "1")),
        G("2 · Concept images", C_PROMPT, N_CONCEPT_IMAGES, 130,
          col(330, ("3", {"y": 150}), "4", "5"), col(290, ("6", {"y": 150}))),
        G("3 · Concept inversion → implicit negative embedding", C_TRAIN, N_UNLEARNED + "\n\n" + N_PIPE_INVERSION, 130,
          col(300, ("7", {"y": 150}), ("2", {"y": 250})), col(330, ("8", {"y": 150})),
          col(300, ("22", {"y": 240, "h": 240}), ("9", {"y": 540}))),
        G("4 · Safe sampling (SLD + INE) vs base", C_SAFETY, N_PIPE_SAFE + "\n\n" + N_SLD, 130,
          col(290, ("10", {"y": 150})), col(330, ("11", {"y": 230}), "12", "13"),
          col(290, ("14", {"y": 150}), ("16", {"y": 466})), col(200, ("15", {"y": 150}), ("17", {"y": 466}))),
        G("5 · Check", C_CHECK, N_CHECK_BOTH, 130,
          col(300, ("18", {"y": 150}), ("20", {"y": 466})),
          col(260, ("19", {"y": 150, "h": 260}), ("21", {"y": 466, "h": 260}))),
    ],
}


# Reroutes on long links, so that they run in a free band and turn only in a gap: {workflow:
# {(target id, input): [(node id, y[, frac]), ...]}}, each point in the gap left of that node's column
# (at ``frac`` of its width, default the middle) and ``y`` below the body top (None: the height of
# the target's input), in order from the source. Links between neighbouring columns need none.
def _drop(column_of: str, band: float, frac: float = 0.5) -> list[tuple]:
    """Along the band at ``band``, then straight down (or up) the gap left of ``column_of``'s column."""
    return [(column_of, band, frac), (column_of, None, frac)]


ROUTES: dict[str, dict[tuple[str, str], list[tuple]]] = {
    # the checkpoint's outputs run at their own height (MODEL 14, CLIP 34, VAE 54) over the nodes
    "txt2img_unlearned": {
        ("2", "model"): _drop("2", 14), ("3", "clip"): _drop("3", 34), ("4", "clip"): _drop("3", 34),
        ("9", "model"): _drop("9", 14), ("7", "vae"): _drop("7", 54),
    },
    "safety_check": {("5", "model"): _drop("5", 14)},
    "ine_sld": {
        ("2", "model"): _drop("2", 14, 0.35), ("3", "clip"): _drop("2", 34, 0.65),
        ("5", "clip"): _drop("5", 34), ("6", "clip"): _drop("5", 34),
    },
    "safree": {
        ("4", "clip"): _drop("4", 34), ("7", "positive"): _drop("7", 134), ("7", "model"): _drop("7", 754),
    },
    "safe_text_encoder": {("6", "model"): _drop("6", 14), ("3", "clip"): _drop("3", 134), ("4", "clip"): _drop("3", 134)},
    "esd_eraser": {("3", "clip"): _drop("3", 34), ("4", "clip"): _drop("3", 34)},
    "inversion_training": {("6", "model"): _drop("6", 14), ("2", "model"): _drop("2", 14, 0.35),
                           ("7", "vae"): _drop("2", 54, 0.65)},
    "safe_pipeline": {
        ("3", "clip"): _drop("3", 34), ("4", "clip"): _drop("3", 34),
        ("6", "model"): _drop("6", 14), ("2", "model"): _drop("7", 14, 0.35), ("16", "model"): _drop("14", 14),
        ("8", "clip"): _drop("8", 34, 0.35), ("9", "clip"): _drop("22", 34, 0.35), ("11", "clip"): _drop("11", 34),
        ("12", "clip"): _drop("11", 34),
        ("7", "vae"): _drop("7", 54, 0.65), ("8", "vae"): _drop("8", 54, 0.65), ("15", "vae"): _drop("15", 54),
        ("17", "vae"): _drop("15", 54),
        # the unlearned MODEL over the trainer to SLD; the INE from the trainer to its loader and to SLD
        ("10", "model"): [("8", 84, 0.5)] + _drop("10", 84, 0.35), ("9", "embedding"): _drop("22", 164, 0.65),
        ("10", "safety"): _drop("10", 554, 0.65),
    },
}


# ----------------------------------------------------------------------------------- resolve
def _item(it):
    return (it, {}) if isinstance(it, str) else (it[0], dict(it[1]))


def resolve(name: str, api: dict) -> dict:
    """Absolute geometry for workflow ``name`` (``api``: its API graph, for node types):
    ``{"nodes": {id: {"pos", "size"}}, "groups": [{"title", "bounding", "color", "font_size"}],
    "notes": [{"text", "pos", "size", "group"}], "ds": {"scale", "offset"}}``."""
    groups = LAYOUTS[name]
    note_box = max(TITLE + g["note_h"] for g in groups)
    body = GROUP_HEAD + note_box + VGAP + TITLE      # y of a top node's body, from the group top
    nodes, out_groups, notes = {}, [], []
    x = 0
    for g in groups:
        inner = sum(c["w"] + c["gap"] for c in g["columns"]) - g["columns"][0]["gap"]
        cx = x + PAD - g["columns"][0]["gap"]
        bottom = body
        for c in g["columns"]:
            cx += c["gap"]
            y = body
            for it in c["items"]:
                nid, o = _item(it)
                ct = api[nid]["class_type"]
                if "y" in o:
                    if body + o["y"] < y:
                        raise ValueError(f"{name}: node {nid} at y {o['y']} overlaps the one above it")
                    y = body + o["y"]
                w, h = o.get("w", c["w"]), o.get("h", HEIGHT[ct])
                nodes[nid] = {"pos": [cx, y], "size": [w, h]}
                bottom = max(bottom, y + h)
                y += h + VGAP + TITLE
            cx += c["w"]
        notes.append({"title": "Note", "text": g["note"], "pos": [x + PAD, GROUP_HEAD + TITLE],
                      "size": [inner, g["note_h"]], "group": g["title"]})
        out_groups.append({"title": g["title"], "bounding": [x, 0, inner + 2 * PAD, bottom + PAD],
                           "color": g["color"], "font_size": GROUP_FONT})
        x += inner + 2 * PAD + GROUP_GAP
    height = max(gr["bounding"][3] for gr in out_groups)
    for gr in out_groups:                             # one row of equally tall panels
        gr["bounding"][3] = height
    missing = set(api) - set(nodes)
    extra = set(nodes) - set(api)
    if missing or extra:
        raise ValueError(f"{name}: layout lacks nodes {sorted(missing)} / names unknown nodes {sorted(extra)}")
    boxes = [(v["pos"][0], v["pos"][1] - TITLE, v["size"][0], v["size"][1] + TITLE)
             for v in list(nodes.values()) + notes]
    reroutes = []
    for (target, inp), points in ROUTES.get(name, {}).items():
        reroutes.append({"target": target, "input": inp,
                         "points": [[nodes[at]["pos"][0] - _gap_left(groups, at) * (1 - f), None if y is None else body + y]
                                    for at, y, f in points]})
    return {"nodes": nodes, "groups": out_groups, "notes": notes, "reroutes": reroutes, "models": models_property(api),
            "ds": fit_view(x - GROUP_GAP, height, boxes)}


def _gap_left(groups, nid) -> float:
    """The free width left of node ``nid``'s column (the column gap, or the group gap + padding)."""
    for g in groups:
        for i, c in enumerate(g["columns"]):
            if any(_item(it)[0] == nid for it in c["items"]):
                return c["gap"] if i else GROUP_GAP + 2 * PAD
    raise KeyError(nid)


def fit_view(width: float, height: float, boxes=()) -> dict:
    """``extra.ds`` showing the graph box (0, 0, width, height) in :data:`CLEAR`, as large as fits
    (at most MAX_SCALE), centred horizontally, with none of ``boxes`` (x, y, w, h) under the
    minimap corner (:data:`MINIMAP`)."""
    cw, ch = CLEAR[2] - CLEAR[0], CLEAR[3] - CLEAR[1]
    scale = int(min(MAX_SCALE, cw / width, ch / height) * 100) / 100     # round down to 0.01
    while True:
        left = CLEAR[0] + (cw - width * scale) / 2
        ds = {"scale": scale, "offset": [round(left / scale, 1), round(CLEAR[1] / scale, 1)]}
        if not any(_meets(screen_box(b, ds), MINIMAP) for b in boxes) or scale <= 0.1:
            return ds
        scale = round(scale - 0.01, 2)


def _meets(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def screen_box(box, ds) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) on screen of the graph box (x, y, w, h) under ``ds``."""
    s, (ox, oy) = ds["scale"], ds["offset"]
    return ((box[0] + ox) * s, (box[1] + oy) * s, (box[0] + box[2] + ox) * s, (box[1] + box[3] + oy) * s)


def models_property(api: dict) -> dict[str, list[dict]]:
    """{node id: the frontend's ``properties.models``} for the nodes whose file has a public download
    (``tools.workflows.MODEL_FILES``): the missing-model dialog names file, folder and URL."""
    out = {}
    for nid, node in api.items():
        got = [{"name": v, "url": MODEL_FILES[v]["url"], "directory": MODEL_FILES[v]["directory"]}
               for v in node["inputs"].values() if isinstance(v, str) and v in MODEL_FILES]
        if got:
            out[nid] = got
    return out


# ----------------------------------------------------------------------------------- checks
def _spline(p0, p3, n=24, free_start=True, free_end=True):
    """Points of a link segment as LiteGraph draws it: from an output it leaves to the right, into
    an input it arrives from the left (control arm a quarter of the distance); at a reroute the
    arm is at most 20 (``Reroute.maxSplineOffset``), taken here as none."""
    d = ((p3[0] - p0[0]) ** 2 + (p3[1] - p0[1]) ** 2) ** 0.5 * 0.25
    p1 = (p0[0] + d, p0[1]) if free_start else p0
    p2 = (p3[0] - d, p3[1]) if free_end else p3
    out = []
    for i in range(n + 1):
        t = i / n
        u = 1 - t
        out.append((u ** 3 * p0[0] + 3 * u * u * t * p1[0] + 3 * u * t * t * p2[0] + t ** 3 * p3[0],
                    u ** 3 * p0[1] + 3 * u * u * t * p1[1] + 3 * u * t * t * p2[1] + t ** 3 * p3[1]))
    return out


def link_points(start, reroutes, end) -> list[tuple[float, float]]:
    """The path of a link from output slot ``start`` through ``reroutes`` to input slot ``end``."""
    pts = [tuple(start)] + [tuple(p) for p in reroutes] + [tuple(end)]
    out = []
    for i, (a, b) in enumerate(zip(pts, pts[1:])):
        out += _spline(a, b, free_start=(i == 0), free_end=(i == len(pts) - 2))
    return out


def links_under_nodes(boxes: dict, links: list[dict], margin: float = 2) -> list[tuple[str, str, str, str]]:
    """(source, target, input, node) for each link whose path passes over a node other than its
    own two (``boxes``: {id: (x, y, w, h)} title bar included; ``links``: {"origin", "target",
    "input", "from", "reroutes", "to"} as ``tools/frontend/frontend.js check`` reports them)."""
    out = []
    for ln in links:
        pts = link_points(ln["from"], ln["reroutes"], ln["to"])
        for nid, (x, y, w, h) in boxes.items():
            if nid in (ln["origin"], ln["target"]):
                continue
            if any(x - margin < px < x + w + margin and y - margin < py < y + h + margin for px, py in pts):
                out.append((ln["origin"], ln["target"], ln["input"], nid))
    return out


def overlapping(boxes: dict) -> list[tuple[str, str]]:
    """Pairs of ids whose boxes (x, y, w, h) overlap."""
    ids = sorted(boxes)
    return [(a, b) for i, a in enumerate(ids) for b in ids[i + 1:]
            if _meets(_corners(boxes[a]), _corners(boxes[b]))]


def _corners(b):
    return (b[0], b[1], b[0] + b[2], b[1] + b[3])


def inside(box, outer) -> bool:
    """Box (x, y, w, h) entirely within ``outer``."""
    return outer[0] <= box[0] and outer[1] <= box[1] and box[0] + box[2] <= outer[0] + outer[2] \
        and box[1] + box[3] <= outer[1] + outer[3]
