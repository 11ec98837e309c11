"""Deterministic, cached tiny checkpoints that ComfyUI's own model detection accepts.

Used by SafeGen's tests and demos on a CPU-only host without a model hub::

    from tools.tiny_models import ensure
    path = ensure("sd1")        # <repo>/.cache/tiny/safegen_tiny_sd1_v1_seed0.safetensors

    python tools/tiny_models.py sd1|sdxl|all [--out DIR]

* ``sd1``: the smallest UNet that ComfyUI detects as ``SD15`` (one level, one res block, one
  transformer block, no middle block; 18.7M params, built from ComfyUI's own ``UNetModel``),
  a full-size random CLIP-L (ComfyUI's fixed ``sd1_clip_config.json``; smaller shapes do not
  load) and a TAESD VAE. LDM layout: ``model.diffusion_model.*``,
  ``cond_stage_model.transformer.text_model.*``, ``first_stage_model.taesd_{en,de}coder.*``.
* ``sdxl``: a one-level UNet whose flattened ``transformer_depth`` is ``[0,0,2,2,10,10]`` (what
  ComfyUI's ``SDXL`` class pins; smaller depths are detected as Segmind Vega / KOALA), full-size
  random CLIP-L and CLIP-G (a shallower CLIP-G encodes to NaN), TAESD-XL-style VAE. CLIP-G is
  written through ComfyUI's own ``SDXL.process_clip_state_dict_for_saving`` (open_clip layout).

All weights are random but reproducible: every tensor is drawn from its own generator seeded
from ``(SEED, kind, key)``, with ``uniform_`` (the CPU uniform kernel is serial, so the bytes do
not depend on the CPU's vector extensions the way ``normal_`` can), so the files are
byte-identical across runs. The UNet is re-initialised completely (ComfyUI/LDM zero-initialise
output convolutions) so that its noise prediction depends on x, t and the text context; this is
checked before saving, as is ComfyUI's detection of the model class.

The file name carries ``VERSION`` and the seed: bump ``VERSION`` whenever the content changes.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import logging
import math
import os
import sys
import time
import zlib
from pathlib import Path

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
VERSION = "v1"
SEED = 0
KINDS = ("sd1", "sdxl")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
_UNET_STD = 0.03  # std of every UNet weight/bias (norm weights are 1, norm biases 0)
_CLIP_STD = 0.02  # std of text-encoder weights and token embeddings (HF CLIP initializer_range)
_VAE_SCALE = {"sd1": 0.18215, "sdxl": 0.13025}  # TAESD / TAESD-XL, as in ComfyUI's nodes.VAELoader
_SAFETENSORS_META_KEY = "safegen.tiny_model"


# --------------------------------------------------------------------------------------------
# Importing ComfyUI
# --------------------------------------------------------------------------------------------

def comfyui_dir() -> Path:
    """The ComfyUI source folder: ``$SAFEGEN_COMFYUI`` or ``<repo>/.comfyui``.

    The one place that locates ComfyUI (tools/comfy_host.py, the tests and benchmarks use it)."""
    env = os.environ.get("SAFEGEN_COMFYUI")
    return Path(env).resolve() if env else REPO_ROOT / ".comfyui"


# Import-only placeholders (tools/<name>_stub/<name>) for packages whose PyPI wheels do not load
# beside the CPU-only torch, yet ComfyUI imports at module level: torchvision (0.3.75: cascade,
# cosmos, ace; spandrel) and torchaudio (>= 0.20: comfy/sd.py -> lightricks audio_vae). Each is put
# on the path only when no working copy of the real package imports: here in-process
# (setup_comfy_import), and on the server's PYTHONPATH in tools/comfy_host.py.
PLACEHOLDER_STUBS: dict[str, Path] = {
    name: REPO_ROOT / "tools" / f"{name}_stub" for name in ("torchvision", "torchaudio")
}
# transformers' cached availability checks to settle before a placeholder becomes importable
_TRANSFORMERS_CHECKS = {
    "torchvision": ("is_torchvision_available",),
    "torchaudio": ("is_torchaudio_available", "is_speech_available"),
}


def _ensure_placeholder(name: str) -> None:
    """Put the import-only placeholder for ``name`` first on sys.path when no working one imports."""
    if name in sys.modules:
        return
    if importlib.util.find_spec(name) is not None:
        try:
            importlib.import_module(name)
            return
        except Exception as exc:  # e.g. "operator torchvision::nms does not exist"
            log.warning("%s does not import (%s); using the placeholder", name, exc)
            for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
                del sys.modules[mod]
    _prime_transformers_without(name)
    stub = str(PLACEHOLDER_STUBS[name])
    if stub not in sys.path:
        sys.path.insert(0, stub)
    importlib.invalidate_caches()


def _prime_transformers_without(name: str) -> None:
    """Let transformers record (lru_cache) that ``name`` is absent *before* the placeholder
    becomes importable: otherwise it takes the placeholder for a real install and, e.g.,
    ``CLIPImageProcessor`` picks its torchvision backend, whose calls then raise."""
    if importlib.util.find_spec("transformers") is None:
        return
    try:
        from transformers.utils import import_utils

        for check in _TRANSFORMERS_CHECKS.get(name, ()):
            fn = getattr(import_utils, check, None)
            if fn is not None:
                fn()
    except Exception as exc:  # never let this optional step break the import of ComfyUI
        log.debug("could not prime transformers' %s check: %s", name, exc)


def setup_comfy_import() -> None:
    """Make ``import comfy...`` work here: ComfyUI on sys.path, CPU mode, placeholders if needed.

    ``args.cpu`` is only set if ``comfy.model_management`` has not been imported yet (setting it
    afterwards has no effect; inside a running ComfyUI its own command line rules).
    """
    cdir = str(comfyui_dir())
    if not os.path.isdir(cdir):
        raise FileNotFoundError(f"ComfyUI source not found at {cdir} (set SAFEGEN_COMFYUI)")
    if cdir not in sys.path:
        sys.path.insert(0, cdir)
    for name in PLACEHOLDER_STUBS:
        _ensure_placeholder(name)
    if "comfy.model_management" not in sys.modules:
        import comfy.cli_args

        comfy.cli_args.args.cpu = True


# --------------------------------------------------------------------------------------------
# Deterministic random tensors
# --------------------------------------------------------------------------------------------

def _generator(kind: str, key: str, seed: int):
    import torch

    g = torch.Generator(device="cpu")
    g.manual_seed(seed * 0x1_0000_0000 + zlib.crc32(f"{kind}/{key}".encode()))
    return g


def _random(shape, std: float, kind: str, key: str, seed: int, dtype):
    """Uniform noise with the given std (bound std*sqrt(3)), drawn from its own generator."""
    import torch

    bound = std * math.sqrt(3.0)
    out = torch.empty(tuple(shape), dtype=dtype)
    return out.uniform_(-bound, bound, generator=_generator(kind, key, seed))


def _is_norm(module) -> bool:
    import torch

    return isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm))


def _init_params_(module, kind: str, seed: int, weight_std, bias_std) -> None:
    """Re-initialise every parameter of ``module`` in place (norms: weight 1, bias 0).

    ``weight_std``/``bias_std`` are floats or callables ``(param_name, param) -> float``.
    """
    import torch

    with torch.no_grad():
        for mname, mod in module.named_modules():
            for pname, p in mod.named_parameters(recurse=False):
                full = f"{mname}.{pname}" if mname else pname
                if _is_norm(mod):
                    p.fill_(1.0 if pname == "weight" else 0.0)
                    continue
                std = bias_std if pname == "bias" else weight_std
                if callable(std):
                    std = std(full, p)
                if std == 0:
                    p.zero_()
                else:
                    # drawn in fp16 (what is saved), so the checked weights are the saved ones
                    p.copy_(_random(p.shape, std, kind, full, seed, torch.float16))


# --------------------------------------------------------------------------------------------
# UNet configurations
# --------------------------------------------------------------------------------------------

def comfy_unet_config_sd1() -> dict:
    """kwargs of ComfyUI's ``UNetModel`` for the tiny SD1 UNet (detected as ``SD15``)."""
    return dict(
        image_size=32, in_channels=4, out_channels=4, model_channels=320,
        num_res_blocks=[1], channel_mult=[1],
        transformer_depth=[1], transformer_depth_output=[1, 1], transformer_depth_middle=-2,
        context_dim=768, use_linear_in_transformer=False, use_spatial_transformer=True,
        legacy=False, num_heads=8, num_head_channels=-1, adm_in_channels=None,
        use_checkpoint=False, use_temporal_resblock=False, use_temporal_attention=False,
    )


def comfy_unet_config_sdxl() -> dict:
    """kwargs of ComfyUI's ``UNetModel`` for the tiny SDXL UNet (detected as ``SDXL``).

    ``transformer_depth`` is consumed one entry per *input res block* (openaimodel.UNetModel
    pops it), so one level of 6 res blocks carries the flattened ``[0, 0, 2, 2, 10, 10]`` that
    ``supported_models.SDXL`` requires.
    """
    return dict(
        image_size=32, in_channels=4, out_channels=4, model_channels=320,
        num_res_blocks=[6], channel_mult=[1],
        transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_output=[0] * 7,
        transformer_depth_middle=-2,
        context_dim=2048, use_linear_in_transformer=True, use_spatial_transformer=True,
        legacy=False, num_heads=-1, num_head_channels=64,
        num_classes="sequential", adm_in_channels=2816,
        use_checkpoint=False, use_temporal_resblock=False, use_temporal_attention=False,
    )


def diffusers_unet_config_sd1() -> dict:
    """kwargs of a diffusers ``UNet2DConditionModel`` that is an exact twin of the tiny SD1 UNet."""
    return dict(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320,),
        down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",),
        layers_per_block=1,
        mid_block_type=None,
        cross_attention_dim=768,
        attention_head_dim=8,
        use_linear_projection=False,
        flip_sin_to_cos=True,
        freq_shift=0,
        norm_num_groups=32,
    )


_EXPECTED_CLASS = {"sd1": "SD15", "sdxl": "SDXL"}
_UNET_CONFIGS = {"sd1": comfy_unet_config_sd1, "sdxl": comfy_unet_config_sdxl}


def _detect(sd: dict, kind: str):
    """ComfyUI's own detection; raises unless it yields exactly the expected class."""
    import comfy.model_detection
    import comfy.supported_models

    model_config = comfy.model_detection.model_config_from_unet(sd, UNET_PREFIX)
    expected = getattr(comfy.supported_models, _EXPECTED_CLASS[kind])
    if type(model_config) is not expected:
        got = type(model_config).__name__ if model_config is not None else None
        raise RuntimeError(f"tiny {kind}: ComfyUI detects {got}, expected {expected.__name__}")
    return model_config


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------

def _build_unet(kind: str, seed: int) -> dict:
    """UNet state dict (fp16, with the LDM prefix) after checking it responds to x, t, context."""
    import torch
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    cfg = _UNET_CONFIGS[kind]()
    unet = UNetModel(**cfg, dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
    _init_params_(unet, f"{kind}/unet", seed, _UNET_STD, _UNET_STD)  # fp16-exact values
    unet.eval()
    _check_unet_responds(unet, cfg, kind, seed)
    sd = {UNET_PREFIX + k: v.detach().to(torch.float16).contiguous() for k, v in unet.state_dict().items()}
    del unet
    log.info("tiny %s: UNet %.1fM params", kind, sum(v.numel() for v in sd.values()) / 1e6)
    return sd


def _check_unet_responds(unet, cfg: dict, kind: str, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed + 12345)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx_a = torch.randn(1, 77, cfg["context_dim"], generator=g)
    ctx_b = torch.randn(1, 77, cfg["context_dim"], generator=g)
    y = torch.randn(1, cfg["adm_in_channels"], generator=g) if cfg.get("adm_in_channels") else None
    t = torch.tensor([500.0])

    def pred(x_, t_, c_):
        with torch.no_grad():
            return unet(x_, timesteps=t_, context=c_, y=y, transformer_options={})

    base = pred(x, t, ctx_a)
    if not torch.isfinite(base).all():
        raise RuntimeError(f"tiny {kind}: UNet prediction is not finite")
    scale = base.abs().max().item()
    diffs = {
        "context": (pred(x, t, ctx_b) - base).abs().max().item(),
        "x": (pred(x + 0.5 * torch.randn(x.shape, generator=g), t, ctx_a) - base).abs().max().item(),
        "t": (pred(x, torch.tensor([100.0]), ctx_a) - base).abs().max().item(),
    }
    log.info("tiny %s: UNet |pred|max=%.3g, change with context/x/t: %s", kind, scale,
             ", ".join(f"{k}={v:.3g}" for k, v in diffs.items()))
    for what, d in diffs.items():
        if not d > 1e-3 * max(scale, 1e-6):
            raise RuntimeError(f"tiny {kind}: UNet prediction does not depend on {what} (max diff {d:.3g})")


def _clip_state_dict(name: str, config_file: str, kind: str, seed: int) -> dict:
    """A full-size random ComfyUI CLIP text model as ``{"<name>.transformer.<key>": fp16 tensor}``."""
    import torch
    import comfy.clip_model
    import comfy.ops

    config = json.loads((comfyui_dir() / "comfy" / config_file).read_text())
    meta = comfy.clip_model.CLIPTextModel(config, dtype=torch.float16, device="meta",
                                          operations=comfy.ops.manual_cast)
    out = {}
    for mname, mod in meta.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            key = f"{mname}.{pname}"
            if _is_norm(mod):
                t = torch.full(tuple(p.shape), 1.0 if pname == "weight" else 0.0, dtype=torch.float16)
            elif pname == "bias":
                t = torch.zeros(tuple(p.shape), dtype=torch.float16)
            else:
                std = 0.01 if "position_embedding" in key else _CLIP_STD
                t = _random(p.shape, std, f"{kind}/{name}", key, seed, torch.float16)
            out[f"{name}.transformer.{key}"] = t
    del meta
    log.info("tiny %s: %s %.1fM params", kind, name, sum(v.numel() for v in out.values()) / 1e6)
    return out


def _taesd_state_dict(kind: str, seed: int) -> dict:
    import torch
    import comfy.taesd.taesd

    vae = comfy.taesd.taesd.TAESD(latent_channels=4)
    last_dec = f"taesd_decoder.{len(vae.taesd_decoder) - 1}."

    def weight_std(name, p):  # He init keeps ReLU activations at scale; small last layer
        if p.dim() == 0:  # vae_scale / vae_shift: set below
            return 0.0
        fan_in = p[0].numel()
        return 0.03 / math.sqrt(fan_in) if name.startswith(last_dec) else math.sqrt(2.0 / fan_in)

    def bias_std(name, p):
        return 0.0

    _init_params_(vae, f"{kind}/vae", seed, weight_std, bias_std)
    with torch.no_grad():
        getattr(vae.taesd_decoder, str(len(vae.taesd_decoder) - 1)).bias.fill_(0.5)  # mid-grey images
        vae.vae_scale.fill_(_VAE_SCALE[kind])
        vae.vae_shift.fill_(0.0)
    return {VAE_PREFIX + k: v.detach().to(torch.float32).contiguous() for k, v in vae.state_dict().items()}


def _build_state_dict(kind: str, seed: int) -> dict:
    unet_sd = _build_unet(kind, seed)
    model_config = _detect(unet_sd, kind)  # before spending time on the text encoders
    sd = dict(unet_sd)
    del unet_sd
    sd.update(_taesd_state_dict(kind, seed))
    if kind == "sd1":
        clip = _clip_state_dict("clip_l", "sd1_clip_config.json", kind, seed)
        sd.update(model_config.process_clip_state_dict_for_saving(clip))
    else:
        clip = _clip_state_dict("clip_l", "sd1_clip_config.json", kind, seed)
        clip.update(_clip_state_dict("clip_g", "clip_config_bigg.json", kind, seed))
        saved = model_config.process_clip_state_dict_for_saving(clip)  # open_clip layout for CLIP-G
        del clip
        sd.update({k: v.contiguous() for k, v in saved.items()})
        del saved
    _detect(sd, kind)
    return sd


def file_name(kind: str, seed: int = SEED) -> str:
    return f"safegen_tiny_{kind}_{VERSION}_seed{seed}.safetensors"


def default_cache_dir() -> Path:
    return REPO_ROOT / ".cache" / "tiny"


@contextlib.contextmanager
def _file_lock(path: Path):
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic os.replace still keeps the file whole
        yield
        return
    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build(kind: str, out_path, seed: int = SEED) -> Path:
    """Build the tiny ``kind`` checkpoint into ``out_path`` (atomically), whether or not it exists."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    setup_comfy_import()
    from safetensors.torch import save_file

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sd = _build_state_dict(kind, seed)
    meta = {_SAFETENSORS_META_KEY: json.dumps(
        {"kind": kind, "version": VERSION, "seed": seed, "builder": "SafeGen tools/tiny_models.py"},
        sort_keys=True)}  # a single key: the header is then byte-stable
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    try:
        save_file(sd, str(tmp), metadata=meta)
        os.chmod(tmp, 0o644)  # safetensors creates the file owner-only
        os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    log.info("tiny %s: wrote %s (%.1f MiB) in %.1f s", kind, out_path,
             out_path.stat().st_size / 2**20, time.perf_counter() - t0)
    return out_path


def ensure(kind: str, cache_dir=None) -> Path:
    """Path of the cached tiny ``kind`` ("sd1" or "sdxl") checkpoint, building it once if needed."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / file_name(kind)
    if path.is_file():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache / f".{path.name}.lock"):
        if not path.is_file():  # another process may have built it while we waited
            log.info("tiny %s: building %s", kind, path)
            build(kind, path)
    return path


# --------------------------------------------------------------------------------------------
# The diffusers twin of the tiny SD1 UNet (an independent reference implementation)
# --------------------------------------------------------------------------------------------

def ldm_to_diffusers_unet(sd_ldm_unet_without_prefix: dict, unet_config: dict) -> dict:
    """Rename an LDM-layout UNet state dict (no ``model.diffusion_model.`` prefix) to diffusers.

    ``comfy.utils.unet_to_diffusers(unet_config)`` maps diffusers names -> LDM names for a
    ComfyUI ``unet_config`` (it needs ``num_res_blocks``, ``channel_mult``, ``transformer_depth``,
    ``transformer_depth_output``, ``transformer_depth_middle``); entries whose LDM key is not in
    the state dict are skipped. Raises ``KeyError`` if an LDM key has no diffusers name.
    """
    setup_comfy_import()
    import comfy.utils

    mapping = comfy.utils.unet_to_diffusers(unet_config)
    out, used = {}, set()
    for diffusers_key, ldm_key in mapping.items():
        if ldm_key in sd_ldm_unet_without_prefix:
            out[diffusers_key] = sd_ldm_unet_without_prefix[ldm_key]
            used.add(ldm_key)
    left = sorted(set(sd_ldm_unet_without_prefix) - used)
    if left:
        raise KeyError(f"{len(left)} LDM UNet keys have no diffusers name, e.g. {left[:5]}")
    return out


def load_diffusers_twin_sd1(ckpt_path):
    """A diffusers ``UNet2DConditionModel`` (fp32, eval) with the tiny SD1 file's UNet, strict."""
    import torch
    from safetensors.torch import load_file

    setup_comfy_import()
    import comfy.model_detection
    from diffusers import UNet2DConditionModel

    sd = load_file(str(ckpt_path))
    unet_config = comfy.model_detection.detect_unet_config(sd, UNET_PREFIX)
    ldm = {k[len(UNET_PREFIX):]: v.to(torch.float32) for k, v in sd.items() if k.startswith(UNET_PREFIX)}
    del sd
    model = UNet2DConditionModel(**diffusers_unet_config_sd1())
    model.load_state_dict(ldm_to_diffusers_unet(ldm, unet_config), strict=True)
    return model.eval()


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=[*KINDS, "all"])
    parser.add_argument("--out", default=None, help="output folder (default: <repo>/.cache/tiny)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the file exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for kind in KINDS if args.kind == "all" else (args.kind,):
        if args.force:
            out = Path(args.out) if args.out else default_cache_dir()
            path = build(kind, out / file_name(kind))
        else:
            path = ensure(kind, args.out)
        sys.stdout.write(f"{path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
