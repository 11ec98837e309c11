"""Each class of bad file, through its node in a real server: a clear error naming the file (with its
extension), the key and what was expected; nothing accepted silently; and a legitimate A1111 ``.pt``
embedding loads with the same result as ComfyUI's own ``embedding:`` syntax.
(The seeded fuzzer over all of these is tests/server/test_fuzz_loaders.py.)
"""
from __future__ import annotations

import io
import re

import pytest
import torch
from safetensors.torch import load_file, save

from tests.fuzz_files import ATTN, DELTA_KIND, P, TEXT_KEYS
from tests.graphs import Graph, install, latent
from tests.server.test_fuzz_loaders import graph_for
from tools.comfy_host import ExecutionError
from tools.tiny_models import ensure

G = torch.Generator().manual_seed(5)


def _pt(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _sd1():
    return load_file(str(ensure("sd1")))


def _lora(rank=2, up_rank=None, parts=("up", "down", "alpha"), alpha=1.0, a_b=False):
    sd = _sd1()
    out_f, in_f = sd[P + ATTN + "to_k.weight"].shape
    m = ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k" if a_b
         else "lora_unet_" + (ATTN + "to_k").replace(".", "_"))
    names = (".lora_B.weight", ".lora_A.weight") if a_b else (".lora_up.weight", ".lora_down.weight")
    t = {}
    if "up" in parts:
        t[m + names[0]] = 0.1 * torch.randn(out_f, up_rank or rank, generator=G)
    if "down" in parts:
        t[m + names[1]] = 0.1 * torch.randn(rank, in_f, generator=G)
    if "alpha" in parts:
        t[m + ".alpha"] = alpha if isinstance(alpha, torch.Tensor) else torch.tensor(float(alpha))
    return save(t)


def _text_full(extra: dict | None = None, identical=False):
    sd = _sd1()
    t = {k: sd["cond_stage_model.transformer." + k].float() + (0.0 if identical else 0.01) for k in TEXT_KEYS}
    t.update(extra or {})
    return save(t)


CASES = {
    # (target, file name, bytes-maker, pattern the message must match after the file name)
    # 1. errors that named no file
    "empty .pt file": ("unet", "empty_file.pt", lambda: b"", r"refused to load.*\((\w+Error|\w+)(: [^)]*)?\)"),
    "pickle of None": ("unet", "none_obj.pt", lambda: _pt(None), r"expected a dict of tensors, found NoneType"),
    "no unet keys": ("unet", "junk_keys.safetensors", lambda: save({"foo.bar": torch.ones(2)}),
                     r"no UNet keys recognised"),
    "no tensors": ("unet", "no_tensors.safetensors", lambda: save({}), r"holds no tensors"),
    "float8 nan": ("embedding", "f8.safetensors", lambda: save({"emb_params": torch.full((1, 768), float("nan")).to(
        torch.float8_e4m3fn)}), r"NaN or inf"),
    "0-d embedding": ("embedding", "zero_d.safetensors", lambda: save({"emb_params": torch.tensor(1.0)}),
                      r"'emb_params' has shape \(\); expected \[n, width\]"),
    "alpha not scalar": ("unet", "alpha_vec.safetensors", lambda: _lora(alpha=torch.ones(4)),
                         r"alpha must be one number per layer.*\(4,\)"),
    # 2. accepted silently before
    "lora rank mismatch": ("unet", "rank_mismatch.safetensors", lambda: _lora(rank=2, up_rank=3),
                           r"would not apply.*attn2\.to_k"),
    "lora only down": ("unet", "only_down.safetensors", lambda: _lora(parts=("down",)), r"form no complete adapter"),
    "lora only alpha": ("unet", "only_alpha.safetensors", lambda: _lora(parts=("alpha",)),
                        r"form no complete adapter"),
    "lora only lora_A": ("unet", "only_A.safetensors", lambda: _lora(parts=("down",), a_b=True),
                         r"form no complete adapter"),
    "lora rank 0": ("unet", "rank0.safetensors", lambda: _lora(rank=0), r"would not apply|no complete adapter"),
    "lora bool": ("unet", "bool_lora.safetensors",
                  lambda: save({k: (v > 0) if v.ndim else v for k, v in load_bytes(_lora()).items()}),
                  r"not floating point.*\(bool\)"),
    "unet identical": ("unet", "identical.safetensors",
                       lambda: save({P + ATTN + "to_k.weight": _sd1()[P + ATTN + "to_k.weight"]}),
                       r"would change nothing"),
    "text foreign keys": ("text", "foreign.safetensors",
                          lambda: _text_full({"foo.bar": torch.ones(2), "../x": torch.ones(2),
                                              "vision_model.post_layernorm.weight": torch.ones(2),
                                              "lm_head.weight": torch.ones(2, 2)}),
                          r"4 key\(s\) are not text-encoder weights.*(foo\.bar|lm_head)"),
    "text empty delta": ("text", "empty_delta.safetensors", lambda: save({}, metadata={"safegen_kind": DELTA_KIND}),
                         r"holds no tensors"),
    "text zero delta": ("text", "zero_delta.safetensors",
                        lambda: save({"clip_l.transformer." + TEXT_KEYS[2]: torch.zeros(768)},
                                     metadata={"safegen_kind": DELTA_KIND}), r"every delta is zero"),
    "text identical": ("text", "identical_te.safetensors", lambda: _text_full(identical=True),
                       r"would change nothing"),
    "text int": ("text", "int_te.safetensors", lambda: save({"text_model.final_layer_norm.weight":
                                                             torch.ones(768, dtype=torch.int32)}),
                 r"not floating point.*int32"),
    "embedding no vectors": ("embedding", "empty_vec.safetensors", lambda: save({"emb_params": torch.zeros(0, 768)}),
                             r"no vectors"),
    "embedding junk beside clip_l": ("embedding", "junk_l.safetensors",
                                     lambda: save({"clip_l": torch.randn(1, 768), "junk": torch.randn(1, 768)}),
                                     r"beside clip_l.*junk"),
}


def load_bytes(b: bytes) -> dict:
    from safetensors.torch import load
    return load(b)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_file_is_refused_naming_file_key_and_expectation(comfy_server, case):
    target, fname, make, pattern = CASES[case]
    folder = {"unet": "diffusion_models", "embedding": "embeddings", "text": "text_encoders"}[target]
    d = comfy_server.models_dir / folder
    d.mkdir(parents=True, exist_ok=True)
    fname = f"bad_{fname}"
    (d / fname).write_bytes(make())
    ck = install(comfy_server, "sd1")
    with pytest.raises(ExecutionError) as e:
        comfy_server.run(graph_for(target, ck, fname), timeout=300)
    msg = e.value.exception_message
    assert msg.startswith(fname + ":") or fname in msg, msg
    assert re.search(pattern, msg), msg


def test_a1111_pt_embedding_loads_like_stock_embedding_syntax(comfy_server):
    """{"string_to_param": {"*": T}, "name", "step", …} (.pt): the node's conditioning equals ComfyUI's
    `embedding:` of the same file, and the sampled latent too."""
    vec = 0.02 * torch.randn(2, 768, generator=G)
    d = comfy_server.models_dir / "embeddings"
    d.mkdir(parents=True, exist_ok=True)
    (d / "a1111_style.pt").write_bytes(_pt({"string_to_param": {"*": vec}, "name": "a1111_style", "step": 500,
                                            "sd_checkpoint": "abc", "sd_checkpoint_name": "v1-5"}))
    ck = install(comfy_server, "sd1")
    g = Graph()
    c = g.add("CheckpointLoaderSimple", ckpt_name=ck)
    ours = g.add("SafeGen_LoadImplicitNegativeEmbedding", clip=c[1], embedding_name="a1111_style.pt",
                 text="a photo of {}", strength=1.0)
    stock = g.add("CLIPTextEncode", clip=c[1], text="a photo of embedding:a1111_style.pt")
    neg = g.add("CLIPTextEncode", clip=c[1], text="")
    lat = g.add("EmptyLatentImage", width=64, height=64, batch_size=1)
    outs = {}
    for key, cond in (("ours", ours[0]), ("stock", stock[0])):
        ks = g.add("KSampler", model=c[0], positive=cond, negative=neg[0], latent_image=lat[0], seed=3, steps=2,
                   cfg=5.0, sampler_name="euler", scheduler="normal", denoise=1.0)
        outs[key] = g.add("SaveLatent", samples=ks[0], filename_prefix=f"safegen_test/a1111_{key}")
    r = comfy_server.run(g, timeout=600)
    a, b = latent(comfy_server, r, outs["ours"]), latent(comfy_server, r, outs["stock"])
    assert torch.equal(a, b)
    # and the embedding changed the result (it is really used)
    g2 = Graph()
    c2 = g2.add("CheckpointLoaderSimple", ckpt_name=ck)
    plain = g2.add("CLIPTextEncode", clip=c2[1], text="a photo of")
    neg2 = g2.add("CLIPTextEncode", clip=c2[1], text="")
    lat2 = g2.add("EmptyLatentImage", width=64, height=64, batch_size=1)
    ks2 = g2.add("KSampler", model=c2[0], positive=plain[0], negative=neg2[0], latent_image=lat2[0], seed=3,
                 steps=2, cfg=5.0, sampler_name="euler", scheduler="normal", denoise=1.0)
    sv = g2.add("SaveLatent", samples=ks2[0], filename_prefix="safegen_test/a1111_plain")
    r2 = comfy_server.run(g2, timeout=600)
    assert not torch.equal(latent(comfy_server, r2, sv), a)
