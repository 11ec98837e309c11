"""A tiny SD1-shaped model that *knows a concept*, for tests where the text must matter.

The tiny checkpoint of tools/tiny_models.py has random weights: its noise prediction barely
depends on the text, so an inversion has nothing to recover. Here its UNet is trained briefly
(in latent space, no VAE needed) on a few "concepts", each a fixed latent pattern plus noise,
each tied to a conditioning:

* the hidden concept: prompt ``{e*}`` where e* is a random token vector (a *hidden embedding*,
  saved beside the model so tests can compare against it);
* two named concepts: "a red square", "a blue circle" (text through the model's own CLIP);
* the empty prompt: a mixture of all patterns.

After training, sampling with e* gives the hidden pattern; the empty prompt does not. Training costs minutes of CPU, so its result — the UNet (fp16, ~36 MiB) and the hidden
embedding — is shipped in tests/assets/; ``ensure()`` assembles a loadable checkpoint from it and
the deterministic tiny checkpoint's CLIP/VAE into .cache/tiny/. ``python tools/concept_model.py
--train`` rebuilds the assets (time printed). Needs ComfyUI importable.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)
VERSION = "v2"
SEED = 0
LATENT = 4          # 4×4 latents = 32×32 images (the tiny UNet has one level: any size works)
STEPS = 800
BATCH = 8
LR = 5e-4


def patterns(n: int, g: torch.Generator) -> torch.Tensor:
    """n smooth, distinct latent patterns [n,4,8,8] with unit-ish scale."""
    base = torch.randn(n, 4, 2, 2, generator=g)
    return torch.nn.functional.interpolate(base, size=(LATENT, LATENT), mode="bilinear", align_corners=False) * 1.5


ASSETS = Path(__file__).resolve().parents[1] / "tests" / "assets"


def asset_paths() -> tuple[Path, Path]:
    return ASSETS / f"concept_sd1_unet_{VERSION}.safetensors", ASSETS / f"concept_sd1_hidden_{VERSION}.safetensors"


def ensure(cache_dir=None) -> tuple[Path, Path]:
    """(checkpoint path, hidden-embedding path): the shipped UNet + the tiny checkpoint's CLIP/VAE."""
    from safetensors.torch import load_file, save_file

    from tools.tiny_models import default_cache_dir
    from tools.tiny_models import ensure as ensure_tiny
    unet_file, hid = asset_paths()
    if not unet_file.exists():
        raise FileNotFoundError(f"{unet_file} missing: run python tools/concept_model.py --train")
    d = Path(cache_dir) if cache_dir else default_cache_dir()
    ck = d / f"safegen_concept_sd1_{VERSION}.safetensors"
    if not ck.exists():
        sd = {k: v for k, v in load_file(str(ensure_tiny("sd1"))).items() if not k.startswith("model.diffusion_model.")}
        sd.update(load_file(str(unet_file)))
        d.mkdir(parents=True, exist_ok=True)
        tmp = ck.with_suffix(".tmp")
        save_file(sd, str(tmp), metadata={"safegen": f"concept model {VERSION}"})
        os.replace(tmp, ck)
    return ck, hid


def build(unet_path: Path, hidden_path: Path) -> None:
    from safetensors.torch import save_file

    from tests.packload import pack_module
    from tools.tiny_models import ensure as ensure_tiny
    from tools.tiny_models import setup_comfy_import
    setup_comfy_import()
    import comfy.sd

    G = pack_module("safegen_comfy.text")
    inv = pack_module("safegen_comfy.inversion")
    base = ensure_tiny("sd1")
    torch.manual_seed(SEED)
    g = torch.Generator().manual_seed(SEED)
    mp, clip, _vae, *_ = comfy.sd.load_checkpoint_guess_config(str(base), output_vae=False, output_clip=True,
                                                               embedding_directory=[])
    init = inv.init_token_vectors(clip, "person")["l"]
    e_star = torch.randn(1, 768, generator=g)
    e_star = e_star / e_star.norm() * init.norm()
    pats = patterns(3, g)
    text = G.prompt_with_embedding("{}")
    with torch.no_grad():
        conds = [clip.encode_from_tokens(clip.tokenize(t)) for t in ("a red square", "a blue circle")]
        hidden_cond = G.encode(clip, text, {"l": e_star})[0][0]
        empty = clip.encode_from_tokens(clip.tokenize(""))
    ctx = torch.cat([hidden_cond, conds[0], conds[1], empty])  # [4,77,768]; class 3 = empty → any pattern
    unet = mp.model.diffusion_model
    sigmas = G.model_sigmas(mp)
    unet.train()
    params = [p for p in unet.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    for step in range(STEPS):
        cls = torch.randint(0, 4, (BATCH,), generator=g)
        pat = torch.where((cls == 3).view(-1, 1, 1, 1), pats[torch.randint(0, 3, (BATCH,), generator=g)],
                          pats[cls.clamp(max=2)])
        x0 = pat + 0.1 * torch.randn(pat.shape, generator=g)
        t = torch.randint(0, sigmas.shape[0], (BATCH,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        s = sigmas[t]
        x = x0 + eps * s.view(-1, 1, 1, 1)
        den = mp.model.apply_model(x, s, c_crossattn=ctx[cls])
        loss = torch.nn.functional.mse_loss((x - den) / s.view(-1, 1, 1, 1), eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == STEPS - 1:
            log.info("concept model step %d loss %.4f", step, loss.item())
    unet.eval()
    sd = {"model.diffusion_model." + k: v.detach().to(torch.float16).contiguous() for k, v in unet.state_dict().items()}
    unet_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = unet_path.with_suffix(".tmp")
    save_file(sd, str(tmp), metadata={"safegen": f"concept model UNet {VERSION}", "steps": str(STEPS),
                                       "batch": str(BATCH), "lr": str(LR), "final_loss": f"{loss.item():.4f}"})
    os.replace(tmp, unet_path)
    tmp = hidden_path.with_suffix(".tmp")
    save_file({"emb_params": e_star.contiguous(), "patterns": pats.contiguous()}, str(tmp))
    os.replace(tmp, hidden_path)


if __name__ == "__main__":
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    logging.basicConfig(level=logging.INFO)
    import time
    from tools import concept_model as CM
    if "--train" in sys.argv:
        t0 = time.time()
        CM.build(*CM.asset_paths())
        log.info("trained in %.0f s", time.time() - t0)
    for p in CM.ensure():
        sys.stdout.write(f"{p}\n")
