#!/usr/bin/env python3
"""GPU smoke test: every SafeGen node once, on the tiny models, in a real ComfyUI server.

    python tools/gpu_smoke.py [--dry-run] [--model sd1|sdxl] [--comfyui PATH] [--python PATH]
                              [--timeout-min 10] [--json OUT]

Meant for a machine with a CUDA GPU and a current ComfyUI (0.33: models on NVIDIA load as
``ModelPatcherDynamic``). It starts ComfyUI (``tools/comfy_host.py``) in a fresh temporary base
directory WITHOUT ``--cpu``, puts the tiny SD1 (or, ``--model sdxl``, SDXL) checkpoint
(``tools/tiny_models.py``), a partial ESD-x UNet file (``tools/unlearned_files.py``), a random implicit negative embedding and a few 64 px
PNG images into its folders, and queues ONE small graph per SafeGen node (64 px, 2 sampling steps,
2 training steps) through ``POST /prompt`` + websocket. Output, one line per node::

    PASS SafeGen_X  (1.2 s)
    FAIL SafeGen_X: <exception from the execution_error / validation error / timeout>

then ``N passed, M failed``; exit status 0 only when every node passed (1 otherwise, 2 when it
refused to start). The node list is the 12 IDs below united with every ``SafeGen_*`` in
``GET /object_info``: a node missing there is a FAIL, a new node without a smoke graph too.

Before the nodes it prints the code path: ComfyUI version and device (``GET /system_stats``), the
class of the MODEL that ``CheckpointLoaderSimple`` returns in the server (core ``PreviewAny`` on it:
``ModelPatcherDynamic`` or not), and the contract check (``safegen_comfy.compat.check_contract()``
run in the server's interpreter, plus the pack's own start-up warning from the server log). After
each training node it prints which trainable-model path the server took ("fresh copy" / "shared
weights"), read from the server log line ``SafeGen training on ...`` that
``safegen_comfy/training.py`` logs at DEBUG (the server runs with ``--verbose DEBUG``).

``--dry-run`` starts the server with ``--cpu`` (no CUDA needed) and runs the same graphs, so the
same code-path selection is exercised on this machine. Without it, the script refuses (exit 2)
when the chosen interpreter has no CUDA. The whole run stays within ``--timeout-min``: a node that
does not finish in its share is interrupted and reported as FAIL; the server is always stopped.
Each node gets at most 30 % of the budget; ``N passed, M failed`` is preceded by one ``code path:``
summary line. The server's base folder (with ``comfyui.log``) is deleted after a clean run and kept
(path printed) after a failure. The Unlearned UNet Loader reads a partial file written here (not the
ESD node's output), so its result does not depend on the ESD node; the Safe Text Encoder needs the
trainer's file and is a FAIL ("not run") when the trainer failed.
Needs only the standard library and ``websocket-client`` here; everything that imports torch runs
in the server's interpreter (``--python``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python tools/gpu_smoke.py` puts tools/ first, not the repo
    sys.path.insert(0, str(REPO))

from tools.comfy_host import (  # noqa: E402
    ComfyHostError, ComfyServer, ExecutionError, PromptError, PromptInterrupted, RunTimeoutError,
    ServerStartError, _default_python)
from tools.tiny_models import comfyui_dir  # noqa: E402
from tools.workflows import Graph  # noqa: E402

NODE_IDS = (  # run order: consecutive graphs share the cached prompt encodes where they can
    "SafeGen_ESDConceptEraser",
    "SafeGen_UnlearnedUNetLoader",
    "SafeGen_SLDGuidance",
    "SafeGen_SLDGuider",
    "SafeGen_SAFREEReattention",
    "SafeGen_LoadImplicitNegativeEmbedding",
    "SafeGen_SAFREEPromptFilter",
    "SafeGen_SafeTextEncoderTrainer",
    "SafeGen_SafeTextEncoder",
    "SafeGen_DarkMinerEraser",
    "SafeGen_ConceptInversionTrainer",
    "SafeGen_NudeNetSafetyCheck",
)
TRAINING_NODES = {"SafeGen_ESDConceptEraser", "SafeGen_ConceptInversionTrainer",
                  "SafeGen_SafeTextEncoderTrainer", "SafeGen_DarkMinerEraser"}

PX = 64            # image size of every graph
STEPS = 2          # sampling steps
TRAIN_STEPS = 2    # training steps of every trainer
PROMPT = "a photo of a woman on the beach"
CONCEPT = "nudity"
SAFETEXT_NAME = "smoke_safetext"
START_TIMEOUT = 240.0
STOP_RESERVE = 20.0     # seconds kept for stopping the server at the end
MARK = "SAFEGEN_SMOKE_JSON "
TRAINING_LOG = re.compile(r"SafeGen training on (.+?)\s*$")
PACK_WARNING = re.compile(r"SafeGen: ComfyUI \S+ lacks .*")


# ----------------------------------------------------------------------------------- preparation
# Both run in the SERVER's interpreter (it has torch; this script needs only the standard library).
_CUDA_PROBE = r"""
import json, torch
ok = bool(torch.cuda.is_available())
print("SAFEGEN_SMOKE_JSON " + json.dumps({"torch": torch.__version__, "cuda": ok,
                                          "device": torch.cuda.get_device_name(0) if ok else ""}))
"""

# The contract check and the input files; runs while the server starts.
_PREPARE = r"""
import json, os, sys, traceback
repo, base, family = sys.argv[1], sys.argv[2], sys.argv[3]
sys.path.insert(0, repo)
out = {}
try:
    from tools.tiny_models import setup_comfy_import
    setup_comfy_import()
    import safegen_comfy.compat as compat
    out["contract"] = compat.check_contract()
    out["contract_items"] = len(compat.INTERNALS)
    out["contract_comfyui"] = compat.comfy_version()
except Exception:
    out["contract_error"] = traceback.format_exc(limit=3)
try:
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import load_file, save_file
    from tools.tiny_models import ensure
    from tools.unlearned_files import perturb, select, write_ldm
    ck = ensure(family)
    P = "model.diffusion_model."
    unet = {k[len(P):]: v for k, v in load_file(str(ck)).items() if k.startswith(P)}
    part = perturb(select(unet, "esd-x"), "all", scale=0.05, seed=1)  # an ESD-x style partial file
    write_ldm(os.path.join(base, "models", "diffusion_models", "smoke_esd_x.safetensors"), part)
    g = torch.Generator().manual_seed(123)
    emb = ({"emb_params": torch.randn(2, 768, generator=g) * 0.02} if family == "sd1" else
           {"clip_l": torch.randn(2, 768, generator=g) * 0.02, "clip_g": torch.randn(2, 1280, generator=g) * 0.02})
    save_file(emb, os.path.join(base, "models", "embeddings", "smoke_ine.safetensors"))
    rng = np.random.default_rng(0)
    folder = os.path.join(base, "input", "safegen_smoke_concept")
    os.makedirs(folder, exist_ok=True)
    for i in range(4):
        a = np.full((64, 64, 3), 30, np.uint8)
        y, x = rng.integers(8, 40, 2)
        a[y:y + 16, x:x + 16] = rng.integers(120, 255, 3)
        Image.fromarray(a).save(os.path.join(folder, f"{i}.png"))
        if i < 2:
            Image.fromarray(a).save(os.path.join(base, "input", f"safegen_smoke_{i}.png"))
    os.symlink(os.path.realpath(ck), os.path.join(base, "models", "checkpoints", os.path.basename(ck)))
    out["ckpt"] = os.path.basename(ck)
except Exception:
    out["files_error"] = traceback.format_exc(limit=4)
print("SAFEGEN_SMOKE_JSON " + json.dumps(out))
"""


class Helper:
    """A script run in the server's interpreter; its result is the JSON after MARK on stdout."""

    def __init__(self, python: Path, comfy_dir: Path, code: str, *args: str, log: Path):
        env = dict(os.environ, SAFEGEN_COMFYUI=str(comfy_dir), PYTHONDONTWRITEBYTECODE="1")
        self.log = log
        self._out = open(log, "w+b")
        self.proc = subprocess.Popen([str(python), "-c", code, *args], cwd=str(REPO), env=env,
                                     stdin=subprocess.DEVNULL, stdout=self._out, stderr=subprocess.STDOUT)

    def result(self, timeout: float) -> dict:
        try:
            rc = self.proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"helper in {self.proc.args[0]} did not finish within {timeout:.0f} s")
        finally:
            self._out.close()
        text = self.log.read_text(encoding="utf-8", errors="replace")
        for line in reversed(text.splitlines()):
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        raise RuntimeError(f"helper in {self.proc.args[0]} failed (exit {rc}):\n{text[-3000:]}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._out.close()


# ----------------------------------------------------------------------------------- the graphs
@dataclass
class Ctx:
    ckpt: str
    unet_file: str = "smoke_esd_x.safetensors"
    embedding_file: str = "smoke_ine.safetensors"
    concept_folder: str = "safegen_smoke_concept"
    images: tuple = ("safegen_smoke_0.png", "safegen_smoke_1.png")
    safetext_file: str | None = None  # set once the trainer wrote it


def _ck(g, ctx):
    return g.add("CheckpointLoaderSimple", ckpt_name=ctx.ckpt)


def _sample(g, ck, model=None, clip=None, pos=None, neg=None):
    """KSampler (64 px, 2 steps) -> VAEDecode -> PreviewImage."""
    clip = clip if clip is not None else ck[1]
    if pos is None:
        pos = g.add("CLIPTextEncode", clip=clip, text=PROMPT)[0]
    if neg is None:
        neg = g.add("CLIPTextEncode", clip=clip, text="")[0]
    lat = g.add("EmptyLatentImage", width=PX, height=PX, batch_size=1)
    ks = g.add("KSampler", model=model if model is not None else ck[0], positive=pos, negative=neg,
               latent_image=lat[0], seed=7, steps=STEPS, cfg=5.0, sampler_name="euler", scheduler="normal",
               denoise=1.0)
    img = g.add("VAEDecode", samples=ks[0], vae=ck[2])
    return g.add("PreviewImage", images=img[0])


def g_esd(ctx):
    g = Graph()
    ck = _ck(g, ctx)
    er = g.add("SafeGen_ESDConceptEraser", model=ck[0], clip=ck[1], concept=CONCEPT, variant="x", eta=1.0,
               steps=TRAIN_STEPS, learning_rate=1e-3, seed=0, sampling_steps=STEPS, start_guidance=3.0,
               resolution=PX, xt_sampler="erased", name="smoke_esd", checkpoint_every=0, keep_checkpoints=1,
               preview_every=0, resume=False, vae=ck[2])
    _sample(g, ck, model=er[0])
    return g


def g_unet_loader(ctx):
    g = Graph()
    ck = _ck(g, ctx)
    ld = g.add("SafeGen_UnlearnedUNetLoader", model=ck[0], unet_name=ctx.unet_file, strength=1.0)
    _sample(g, ck, model=ld[0])
    g.add("PreviewAny", source=ld[1])
    return g


def g_inversion(ctx):
    g = Graph()
    ck = _ck(g, ctx)
    tr = g.add("SafeGen_ConceptInversionTrainer", model=ck[0], clip=ck[1], vae=ck[2], name="smoke_inversion",
               num_vectors=1, init_text="person", template="{}", steps=TRAIN_STEPS, learning_rate=5e-3,
               batch_size=1, seed=0, objective="ldm", guidance_scale=7.5, negative_text="",
               checkpoint_every=0,
               keep_checkpoints=1, preview_every=0, resume=False, image_folder=ctx.concept_folder,
               resolution=PX, gradient_accumulation=1)
    g.add("PreviewImage", images=tr[1])
    return g


def g_load_ine(ctx):
    g = Graph()
    ck = _ck(g, ctx)
    ine = g.add("SafeGen_LoadImplicitNegativeEmbedding", clip=ck[1], embedding_name=ctx.embedding_file,
                text="{}", strength=1.0)
    _sample(g, ck, neg=ine[0])
    return g


def g_sld(ctx):
    g = Graph()
    ck = _ck(g, ctx)
    saf = g.add("CLIPTextEncode", clip=ck[1], text=CONCEPT)
    sld = g.add("SafeGen_SLDGuidance", model=ck[0], safety=saf[0], preset="custom", warmup_steps=0,
                guidance_scale=50.0, threshold=0.01, momentum_scale=0.3, momentum_beta=0.4)
    _sample(g, ck, model=sld[0])
    return g


def g_sld_guider(ctx):
    g = Graph()
    ck = _ck(g, ctx)
    pos = g.add("CLIPTextEncode", clip=ck[1], text=PROMPT)
    neg = g.add("CLIPTextEncode", clip=ck[1], text="")
    saf = g.add("CLIPTextEncode", clip=ck[1], text=CONCEPT)
    gd = g.add("SafeGen_SLDGuider", model=ck[0], positive=pos[0], negative=neg[0], safety=saf[0], cfg=5.0,
               preset="custom", warmup_steps=0, guidance_scale=50.0, threshold=0.01, momentum_scale=0.3,
               momentum_beta=0.4)
    noise = g.add("RandomNoise", noise_seed=7)
    sampler = g.add("KSamplerSelect", sampler_name="euler")
    sigmas = g.add("BasicScheduler", model=ck[0], scheduler="normal", steps=STEPS, denoise=1.0)
    lat = g.add("EmptyLatentImage", width=PX, height=PX, batch_size=1)
    sca = g.add("SamplerCustomAdvanced", noise=noise[0], guider=gd[0], sampler=sampler[0], sigmas=sigmas[0],
                latent_image=lat[0])
    img = g.add("VAEDecode", samples=sca[0], vae=ck[2])
    g.add("PreviewImage", images=img[0])
    return g


def g_safree_filter(ctx):
    g = Graph()
    ck = _ck(g, ctx)
    f = g.add("SafeGen_SAFREEPromptFilter", clip=ck[1], text="a nude woman",
              toxic_concepts="Nudity\nSexual Acts", alpha=0.01, self_validating_filter=True,
              up_t=10)
    _sample(g, ck, pos=f[0])
    g.add("PreviewAny", source=f[1])
    return g


def g_safree_reattention(ctx):
    g = Graph()
    ck = _ck(g, ctx)
    f = g.add("SafeGen_SAFREEPromptFilter", clip=ck[1], text="a nude woman",
              toxic_concepts="Nudity\nSexual Acts", alpha=0.01, self_validating_filter=True, up_t=10)
    re_ = g.add("SafeGen_SAFREEReattention", model=ck[0], b1=1.0, b2=1.0, s1=0.9, s2=0.2, start_percent=0.0,
                end_percent=1.0, mode="safeguard-low", original=f[2])
    _sample(g, ck, model=re_[0], pos=f[0])
    return g


def g_safetext_trainer(ctx):
    g = Graph()
    ck = _ck(g, ctx)
    # two prompts each (the default lists are hundreds of prompts, each encoded once: minutes on CPU)
    t = g.add("SafeGen_SafeTextEncoderTrainer", clip=ck[1], unsafe_prompts="a nude woman\nnaked bodies",
              safe_prompts="a red car\na mountain lake", lambda_=1.0, steps=TRAIN_STEPS, learning_rate=1e-4,
              layers="final layers (last 2)", batch_size=2, seed=0, checkpoint_every=0, resume=False,
              name=SAFETEXT_NAME, unsafe_file="", safe_file="")
    pos = g.add("CLIPTextEncode", clip=t[0], text=PROMPT)  # the trained CLIP encodes the prompt
    _sample(g, ck, pos=pos[0])
    return g


def g_safetext_encoder(ctx):
    if not ctx.safetext_file:
        raise _NotRun("needs the delta file of SafeGen_SafeTextEncoderTrainer, which did not pass")
    g = Graph()
    ck = _ck(g, ctx)
    enc = g.add("SafeGen_SafeTextEncoder", clip=ck[1], file=ctx.safetext_file, strength=1.0, text=PROMPT)
    _sample(g, ck, pos=enc[1])
    return g


def g_dark_miner(ctx):
    g = Graph()
    ck = _ck(g, ctx)
    dm = g.add("SafeGen_DarkMinerEraser", model=ck[0], clip=ck[1], concept=CONCEPT,
               anchor_prompts="a photo of a dog", variant="x", rounds=1,
               mining_steps=TRAIN_STEPS, mining_lr=1e-2, circumvent_steps=TRAIN_STEPS, learning_rate=1e-3,
               eta=1.0,
               anchor_weight=1.0, sampling_steps=STEPS, start_guidance=3.0, resolution=PX, concept_images=2,
               verify_draws=1, verify_margin=0.0, seed=0, xt_sampler="erased", name="smoke_dark_miner",
               checkpoint_every=0, keep_checkpoints=1, preview_every=0, resume=False)
    _sample(g, ck, model=dm[0])
    return g


def g_nudenet(ctx):
    g = Graph()
    a = g.add("LoadImage", image=ctx.images[0])
    b = g.add("LoadImage", image=ctx.images[1])
    batch = g.add("ImageBatch", image1=a[0], image2=b[0])
    chk = g.add("SafeGen_NudeNetSafetyCheck", images=batch[0], threshold=0.45,
                labels="FACE_FEMALE\nFEMALE_BREAST_EXPOSED", censor="pixelate")
    g.add("PreviewAny", source=chk[2])
    return g


GRAPHS = {
    "SafeGen_ESDConceptEraser": g_esd,
    "SafeGen_UnlearnedUNetLoader": g_unet_loader,
    "SafeGen_SLDGuidance": g_sld,
    "SafeGen_SLDGuider": g_sld_guider,
    "SafeGen_SAFREEReattention": g_safree_reattention,
    "SafeGen_LoadImplicitNegativeEmbedding": g_load_ine,
    "SafeGen_SAFREEPromptFilter": g_safree_filter,
    "SafeGen_SafeTextEncoderTrainer": g_safetext_trainer,
    "SafeGen_SafeTextEncoder": g_safetext_encoder,
    "SafeGen_DarkMinerEraser": g_dark_miner,
    "SafeGen_ConceptInversionTrainer": g_inversion,
    "SafeGen_NudeNetSafetyCheck": g_nudenet,
}
assert tuple(GRAPHS) == NODE_IDS


class _NotRun(Exception):
    """A node whose graph cannot be built (a prerequisite failed)."""


# ----------------------------------------------------------------------------------- running
class SmokeServer(ComfyServer):
    """ComfyServer with ``--cpu`` only for the dry run."""

    def __init__(self, *a, cpu: bool, **kw):
        super().__init__(*a, **kw)
        self.cpu = cpu

    def command(self) -> list[str]:
        cmd = super().command()
        if not self.cpu:
            cmd = [c for c in cmd if c != "--cpu"]
        return cmd


@dataclass
class NodeResult:
    node: str
    ok: bool
    seconds: float = 0.0
    error: str = ""
    training: list = field(default_factory=list)  # "SafeGen training on ..." payloads logged meanwhile


def _one_line(text: str, limit: int = 600) -> str:
    s = " | ".join(ln.strip() for ln in str(text).strip().splitlines() if ln.strip())
    return s if len(s) <= limit else s[:limit - 3] + "..."


def _error_text(e: Exception, node: str) -> str:
    if isinstance(e, ExecutionError):
        where = "" if e.node_type == node else f"in {e.node_type} (node {e.node_id}): "
        return _one_line(f"{where}{e.exception_type}: {e.exception_message}")
    if isinstance(e, PromptError):
        return _one_line(str(e))
    if isinstance(e, PromptInterrupted):
        return f"interrupted at {e.node_type}"
    return _one_line(f"{type(e).__name__}: {e}")


def _wait_idle(srv, seconds: float) -> bool:
    """True when the server's queue is empty within ``seconds``."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        try:
            q = srv.client.queue_state()
            if not q.get("queue_running") and not q.get("queue_pending"):
                return True
        except (ComfyHostError, OSError):
            pass
        time.sleep(0.5)
    return False


def run_node(srv, node: str, graph: dict, timeout: float) -> NodeResult:
    log_before = len(srv.log_text())
    t0 = time.monotonic()
    try:
        srv.run(graph, timeout=timeout)
        res = NodeResult(node, True)
    except RunTimeoutError:
        res = NodeResult(node, False, error=f"no result within {timeout:.0f} s (interrupted)")
        try:
            srv.client.post("/queue", {"clear": True})
            srv.client.interrupt()
        except (ComfyHostError, OSError):
            pass
    except (ComfyHostError, OSError) as e:
        res = NodeResult(node, False, error=_error_text(e, node))
    res.seconds = time.monotonic() - t0
    new_log = srv.log_text()[log_before:]
    res.training = [m.group(1) for m in map(TRAINING_LOG.search, new_log.splitlines()) if m]
    return res


def model_class(srv, ctx, timeout: float) -> str:
    """Class of the MODEL CheckpointLoaderSimple returns in the server (core PreviewAny prints it)."""
    g = Graph()
    ck = _ck(g, ctx)
    pv = g.add("PreviewAny", source=ck[0])
    r = srv.run(g, timeout=timeout)
    text = " ".join(r.ui(pv).get("text", []))
    m = re.search(r"<([\w.]+) object at", text)
    return m.group(1) if m else _one_line(text, 120)


def _say(line: str = "") -> None:
    print(line, flush=True)  # noqa: T201 - CLI output


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="run on CPU (server started with --cpu); same graphs and code-path report")
    ap.add_argument("--comfyui", type=Path, default=None,
                    help="ComfyUI source folder (default: $SAFEGEN_COMFYUI or <repo>/.comfyui)")
    ap.add_argument("--python", type=Path, default=None,
                    help="interpreter that runs ComfyUI "
                         "(default: $SAFEGEN_PYTHON or <repo>/.venv/bin/python)")
    ap.add_argument("--timeout-min", type=float, default=10.0, help="budget of the whole run in minutes")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this file")
    ap.add_argument("--model", choices=("sd1", "sdxl"), default="sd1",
                    help="which tiny checkpoint every graph uses (sd1: CLIP-L; sdxl: CLIP-L + CLIP-G)")
    args = ap.parse_args(argv)

    t_start = time.monotonic()
    deadline = t_start + args.timeout_min * 60
    comfy_dir = (args.comfyui or comfyui_dir()).resolve()
    python = Path(args.python or _default_python())
    if not (comfy_dir / "main.py").is_file():
        _say(f"gpu_smoke: no ComfyUI at {comfy_dir} (--comfyui / SAFEGEN_COMFYUI)")
        return 2
    if not python.exists():
        _say(f"gpu_smoke: no interpreter at {python} (--python / SAFEGEN_PYTHON)")
        return 2

    base = Path(tempfile.mkdtemp(prefix="safegen_gpu_smoke_"))
    report: dict = {"dry_run": args.dry_run, "model": args.model, "comfyui_dir": str(comfy_dir),
                    "python": str(python), "base_dir": str(base), "nodes": []}
    srv = SmokeServer(base, comfy_dir=comfy_dir, python=python, cpu=args.dry_run,
                      extra_args=["--verbose", "DEBUG"])
    results: list[NodeResult] = []
    keep = False
    helper = None
    try:
        srv.prepare()
        for sub in ("diffusion_models", "embeddings", "text_encoders"):
            (srv.models_dir / sub).mkdir(parents=True, exist_ok=True)
        _say(f"SafeGen GPU smoke{' (DRY RUN: CPU, --cpu)' if args.dry_run else ''}: ComfyUI {comfy_dir}, "
             f"python {python}")
        if not args.dry_run:
            cuda = Helper(python, comfy_dir, _CUDA_PROBE, log=base / "cuda_probe.log").result(
                timeout=deadline - time.monotonic())
            report["cuda"] = cuda
            if not cuda.get("cuda"):
                _say(f"gpu_smoke: refusing to start: {python} has no CUDA (torch {cuda.get('torch')}: "
                     "torch.cuda.is_available() is False). Use --python with a CUDA build of torch, "
                     "or --dry-run to run on CPU.")
                return 2
        helper = Helper(python, comfy_dir, _PREPARE, str(REPO), str(base), args.model, log=base / "prepare.log")
        srv.start(timeout=min(START_TIMEOUT, max(10.0, deadline - time.monotonic())))
        prep = helper.result(timeout=deadline - time.monotonic())
        report["prepare"] = prep
        if prep.get("files_error"):
            raise RuntimeError(f"could not write the input files:\n{prep['files_error']}")
        ctx = Ctx(ckpt=prep["ckpt"])

        stats = srv.client.system_stats()
        system, devices = stats.get("system", {}), stats.get("devices", [])
        dev = ", ".join(f"{d.get('name')} ({d.get('type')})" for d in devices) or "?"
        report.update(comfyui_version=system.get("comfyui_version"), devices=devices,
                      torch=system.get("pytorch_version"), startup_seconds=srv.startup_seconds)
        _say(f"ComfyUI version: {system.get('comfyui_version', '?')}  "
             f"(torch {system.get('pytorch_version', '?')}, "
             f"python {str(system.get('python_version', '?')).split()[0]}, "
             f"start-up {srv.startup_seconds:.1f} s)")
        _say(f"device: {dev}")
        try:
            cls = model_class(srv, ctx, timeout=max(10.0, min(120.0, deadline - time.monotonic())))
            dyn = "yes" if cls.endswith("ModelPatcherDynamic") else "no"
        except (ComfyHostError, OSError) as e:
            cls, dyn = f"unknown ({_error_text(e, 'PreviewAny')})", "unknown"
        report.update(model_class=cls, model_patcher_dynamic=dyn)
        _say(f"ModelPatcherDynamic: {dyn}  (CheckpointLoaderSimple MODEL is {cls})")
        if prep.get("contract_error"):
            contract = f"could not run: {_one_line(prep['contract_error'], 300)}"
        elif prep.get("contract"):
            contract = f"BROKEN ({len(prep['contract'])}): " + "; ".join(prep["contract"])
        else:
            contract = (f"OK ({prep.get('contract_items')} internals present on ComfyUI "
                        f"{prep.get('contract_comfyui')})")
        warning = next((m.group(0) for m in map(PACK_WARNING.search, srv.log_text().splitlines()) if m), None)
        report.update(contract=prep.get("contract"), pack_warning=warning)
        _say(f"contract check: {contract}")
        _say(f"pack start-up warning: {warning or 'none'}")
        import_error = srv.pack_import_error()
        if import_error:
            _say(f"pack import FAILED: {_one_line(import_error, 400)}")

        info = srv.client.object_info()
        loaded = sorted(k for k in info if k.startswith("SafeGen_"))
        report["loaded_nodes"] = loaded
        order = list(NODE_IDS) + [k for k in loaded if k not in GRAPHS]
        _say(f"SafeGen nodes registered: {len(loaded)}; running {len(order)} graphs "
             f"(trainable-model path from the server log)")
        stuck = None
        for node in order:
            remaining = deadline - time.monotonic() - STOP_RESERVE
            if node not in info:
                res = NodeResult(node, False, error="not registered (missing from GET /object_info)")
            elif node not in GRAPHS:
                res = NodeResult(node, False, error="no smoke graph for this node in tools/gpu_smoke.py")
            elif stuck:
                res = NodeResult(node, False, error=f"not run: the server is still busy with {stuck}")
            elif remaining < 5:
                res = NodeResult(node, False,
                                 error=f"not run: the {args.timeout_min:g} min budget is used up")
            else:
                try:
                    graph = GRAPHS[node](ctx)
                except _NotRun as e:
                    res = NodeResult(node, False, error=f"not run: {e}")
                else:
                    cap = max(30.0, args.timeout_min * 60 * 0.3)
                    res = run_node(srv, node, graph, timeout=min(cap, remaining))
                    if not res.ok and res.error.startswith("no result within") and not _wait_idle(srv, 30):
                        stuck = node
            if node == "SafeGen_SafeTextEncoderTrainer" and res.ok:
                if (srv.models_dir / "text_encoders" / f"{SAFETEXT_NAME}.safetensors").is_file():
                    ctx.safetext_file = f"{SAFETEXT_NAME}.safetensors"
            results.append(res)
            _say(f"PASS {node}  ({res.seconds:.1f} s)" if res.ok else f"FAIL {node}: {res.error}")
            if node in TRAINING_NODES and (res.ok or res.training):
                modes = sorted({m.strip() for line in res.training for m in line.split(",")})
                path = " + ".join(modes) if modes else "not found in the server log"
                logged = " | ".join(res.training) or "-"
                _say(f"    trainable-model path: {path}  (server log: SafeGen training on {logged})")
        paths = {r.node: sorted({m.strip() for line in r.training for m in line.split(",")})
                 for r in results if r.node in TRAINING_NODES}
        report["trainable_paths"] = paths
        seen = sorted({m for v in paths.values() for m in v})
        _say(f"code path: ModelPatcherDynamic {dyn}; "
             f"trainable-model path {' + '.join(seen) or 'none logged'} "
             f"({sum(bool(v) for v in paths.values())}/{len(TRAINING_NODES)} training nodes logged one)")
    except (ServerStartError, RuntimeError, subprocess.TimeoutExpired, ComfyHostError, OSError) as e:
        keep = True
        _say(f"gpu_smoke: {type(e).__name__}: {e}")
        done = {r.node for r in results}
        for node in NODE_IDS:
            if node not in done:
                results.append(NodeResult(node, False, error="not run (see the error above)"))
                _say(f"FAIL {node}: not run (see the error above)")
    finally:
        if helper is not None:
            helper.kill()
        srv.stop()
        passed = sum(r.ok for r in results)
        failed = len(results) - passed
        if results:
            report["nodes"] = [asdict(r) for r in results]
            report["passed"], report["failed"] = passed, failed
            report["seconds"] = time.monotonic() - t_start
            _say(f"total {report['seconds']:.1f} s (budget {args.timeout_min:g} min)")
            if failed or keep:
                _say(f"server log kept: {srv.log_path}")
            _say(f"{passed} passed, {failed} failed")
        if args.json:
            args.json.write_text(json.dumps(report, indent=1) + "\n")
        if not keep and (not results or not failed):  # keep the folder (and its log) after a failure
            shutil.rmtree(base, ignore_errors=True)
    return 0 if results and not failed else (2 if not results else 1)


if __name__ == "__main__":
    sys.exit(main())
