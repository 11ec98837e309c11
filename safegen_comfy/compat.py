"""The ComfyUI-compatibility seam: the ONE module through which SafeGen touches ComfyUI internals.

Everything here is an attribute of ComfyUI that is not one of its documented extension points
(V3 ``comfy_api``, ModelPatcher's public setters / ``add_patches`` / ``add_weight_wrapper`` /
wrappers, ``comfy.sample``, ``folder_paths``, ``ProgressBar``, ``model_management.load_models_gpu``
and the interrupt check). Each function names the ComfyUI file it mirrors and the versions it
was read on; :data:`INTERNALS` lists every such attribute for the contract check
(:func:`check_contract`, run at import by ``nodes/__init__.py`` and by
``tests/unit/test_comfy_contract.py``). Checked on ComfyUI 0.3.75 and 0.33.0.

Runtime modules (``safegen_comfy/*``) call these functions; nodes call only the runtime modules.
Features are detected (``hasattr`` / signatures), never version numbers.
"""
from __future__ import annotations

import atexit
import contextlib
import importlib
import inspect
import logging
import os
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass

import torch

log = logging.getLogger("safegen")


# =========================================================================== the contract
@dataclass(frozen=True)
class Internal:
    """One ComfyUI internal the pack relies on: ``module`` + dotted ``attr``; ``params`` that a
    callable must accept (by name); ``nodes`` that break without it."""
    module: str
    attr: str
    params: tuple = ()
    nodes: tuple = ()
    why: str = ""
    static: bool = False  # checked in the module's source (a module only a running server can import)


_ALL = ("every SafeGen node",)
_TEXT = ("Concept Inversion Trainer", "Load Implicit Negative Embedding", "SAFREE Prompt Filter",
         "Dark Miner Eraser")
_TRAIN = ("Concept Inversion Trainer", "ESD Concept Eraser", "Dark Miner Eraser", "Safe Text Encoder Trainer")
_SLD = ("SLD Safety Guidance", "SLD Guider")

INTERNALS: tuple[Internal, ...] = (
    # --- tokenizers (comfy/sd1_clip.py, comfy/sdxl_clip.py)
    Internal("comfy.sd1_clip", "SDTokenizer.tokenize_with_weights", ("text",), _TEXT,
             "per-encoder token lists (with embedding tensors spliced in)"),
    Internal("comfy.sd1_clip", "SDTokenizer.__init__",
             ("embedding_directory", "embedding_size", "embedding_key"), _TEXT,
             "attributes embedding_directory / embedding_size / embedding_key / start_token / end_token / pad_token"),
    Internal("comfy.sd1_clip", "load_embed", ("embedding_name", "embedding_directory", "embedding_size"), _TEXT,
             "how embedding:NAME files are read (the pack writes such a file for in-memory vectors)"),
    Internal("comfy.sd1_clip", "SD1Tokenizer.__init__", ("clip_name",), _TEXT, "tokenizer.clip_l"),
    Internal("comfy.sdxl_clip", "SDXLTokenizer", (), _TEXT, "tokenizer.clip_l / clip_g"),
    # --- text encoders (comfy/sd1_clip.py, comfy/sd.py)
    Internal("comfy.sd1_clip", "SDClipModel.encode_token_weights", ("token_weight_pairs",),
             ("SAFREE Prompt Filter",), "per-encoder hidden states of token chunks"),
    Internal("comfy.sd1_clip", "SDClipModel.set_clip_options", ("options",), ("SAFREE Prompt Filter",)),
    Internal("comfy.sd1_clip", "SDClipModel.reset_clip_options", (), ("SAFREE Prompt Filter",)),
    Internal("comfy.sd1_clip", "SDClipModel.__init__", ("layer", "layer_idx", "layer_norm_hidden_state"),
             ("Safe Text Encoder Trainer",), "which layer the conditioning is read from"),
    Internal("comfy.sd", "CLIP.clone", (), _TRAIN + ("Safe Text Encoder",)),
    Internal("comfy.clip_model", "CLIPLayer.forward", ("x", "mask", "optimized_attention"), _TRAIN,
             "replaced out of place while training (layer_norm1, self_attn, layer_norm2, mlp)"),
    Internal("comfy.sd", "CLIP.load_model", (), ("SAFREE Prompt Filter",)),
    Internal("comfy.sd", "CLIP.encode_from_tokens", ("tokens", "return_pooled"), _TEXT + _TRAIN),
    Internal("comfy.sd", "CLIP.encode_from_tokens_scheduled", ("tokens",), _TEXT),
    # --- models (comfy/model_base.py, comfy/model_patcher.py)
    Internal("comfy.model_base", "BaseModel.apply_model", ("x", "t", "c_crossattn"), _TRAIN,
             "noise prediction of the UNet in k-diffusion space"),
    Internal("comfy.model_base", "BaseModel.process_latent_in", ("latent",), _TRAIN),
    Internal("comfy.model_base", "SDXL.encode_adm", (), _TRAIN, "SDXL pooled/size vector y"),
    Internal("comfy.model_patcher", "ModelPatcher.get_key_patches", ("filter_prefix",),
             ("Unlearned UNet Loader",), "the base's own weights of a full-UNet file"),
    Internal("comfy.model_patcher", "ModelPatcher.model_state_dict", ("filter_prefix",),
             ("Unlearned UNet Loader", "Safe Text Encoder", "Safe Text Encoder Trainer")),
    Internal("comfy.model_patcher", "ModelPatcher.clone", (), _TRAIN,
             "force_deepcopy / disable_dynamic when present (0.12+), plain clone before"),
    Internal("comfy.model_management", "current_loaded_models", (), _TRAIN,
             "entries a fresh copy's temporary loader left behind are removed (drop_orphaned_entries)"),
    Internal("comfy.model_management", "LoadedModel.model", (), _TRAIN, "the entry's patcher (None when collected)"),
    # --- LoRA / weight adapters (comfy/lora.py, comfy/weight_adapter/base.py)
    Internal("comfy.lora", "model_lora_keys_unet", ("model",), ("Unlearned UNet Loader",)),
    Internal("comfy.lora", "calculate_weight", ("patches", "weight", "key", "intermediate_dtype"),
             ("Unlearned UNet Loader",), "each LoRA layer applied once at load time"),
    Internal("comfy.lora", "load_lora", ("lora", "to_load"), ("Unlearned UNet Loader",)),
    Internal("comfy.lora_convert", "convert_lora", ("sd",), ("Unlearned UNet Loader",)),
    Internal("comfy.utils", "unet_to_diffusers", ("unet_config",), ("Unlearned UNet Loader",)),
    Internal("comfy.weight_adapter.base", "WeightAdapterBase.calculate_weight",
             ("weight", "key", "strength", "strength_model", "offset", "function"), ("Unlearned UNet Loader",)),
    Internal("comfy.sd", "load_diffusion_model_state_dict", ("sd",), ("Unlearned UNet Loader",)),
    # --- sampling (comfy/samplers.py, comfy/sampler_helpers.py, comfy/patcher_extension.py)
    Internal("comfy.samplers", "calc_cond_batch", ("model", "conds", "x_in", "timestep", "model_options"),
             _SLD),
    Internal("comfy.samplers", "cfg_function",
             ("model", "cond_pred", "uncond_pred", "cond_scale", "x", "timestep", "model_options", "cond",
              "uncond"), ("SLD Guider",)),
    Internal("comfy.samplers", "encode_model_conds", ("model_function", "conds", "noise", "device", "prompt_type"),
             ("SLD Safety Guidance",)),
    Internal("comfy.samplers", "calculate_start_end_timesteps", ("model", "conds"), ("SLD Safety Guidance",)),
    Internal("comfy.samplers", "CFGGuider.inner_set_conds", ("conds",), ("SLD Guider",)),
    Internal("comfy.samplers", "CFGGuider.predict_noise", ("x", "timestep", "model_options", "seed"),
             ("SLD Guider",)),
    Internal("comfy.samplers", "CFGGuider.sample", ("noise", "latent_image", "sampler", "sigmas"), _SLD,
             "guider.conds / original_conds / cfg / inner_model during a run"),
    Internal("comfy.sampler_helpers", "convert_cond", ("cond",), _SLD),
    Internal("comfy.patcher_extension", "WrappersMP.OUTER_SAMPLE", (), ("SLD Safety Guidance",)),
    Internal("comfy.samplers", "CFGGuider.outer_sample", ("noise", "latent_image", "sampler", "sigmas"),
             ("SAFREE Prompt Filter",), "sigmas is the 4th argument of the OUTER_SAMPLE call"),
    Internal("comfy.hooks", "TransformerOptionsHook.__init__", ("transformers_dict", "hook_scope"),
             ("SAFREE Prompt Filter",), "step window resolved on the sampler's sigmas"),
    Internal("comfy.hooks", "EnumHookScope.AllConditioning", (), ("SAFREE Prompt Filter",)),
    Internal("comfy.hooks", "HookGroup.add", ("hook",), ("SAFREE Prompt Filter",)),
    Internal("comfy.sampler_helpers", "prepare_model_patcher", ("model", "conds", "model_options"),
             ("SAFREE Prompt Filter",), "registers the conds' hooks before OUTER_SAMPLE"),
    Internal("comfy.sd1_clip", "SDClipModel.encode", ("tokens",), ("SAFREE Prompt Filter",),
             "batched (hidden states, pooled) per chunk"),
    Internal("comfy.patcher_extension", "WrapperExecutor.__init__", ("class_obj",), ("SLD Safety Guidance",),
             "executor.class_obj is the guider running the sample"),
    Internal("node_helpers", "conditioning_set_values", ("conditioning", "values"), _SLD + ("SAFREE Prompt Filter",)),
    # --- UI feedback (comfy_execution/utils.py, server.py)
    Internal("comfy_execution.utils", "get_executing_context", (), _TRAIN, "progress text on the running node"),
    Internal("server", "PromptServer.send_progress_text", ("text", "node_id"), _TRAIN, static=True),
)


def comfy_version() -> str:
    try:
        return str(importlib.import_module("comfyui_version").__version__)
    except Exception:  # noqa: BLE001 - a checkout without the version file
        return "unknown"


def _resolve(item: Internal):
    obj = importlib.import_module(item.module)
    for part in item.attr.split("."):
        obj = getattr(obj, part)
    return obj


def _static_params(item: Internal) -> list[str]:
    """Parameter names of ``item`` read from its module's source without importing it."""
    import ast
    import importlib.util
    spec = importlib.util.find_spec(item.module)
    if spec is None or not spec.origin:
        raise ImportError(f"no module {item.module}")
    with open(spec.origin, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    nodes = tree.body
    found = None
    for part in item.attr.split("."):
        found = next((n for n in nodes if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and n.name == part), None)
        if found is None:
            raise AttributeError(f"{item.module} has no {item.attr}")
        nodes = getattr(found, "body", [])
    if not isinstance(found, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return []
    a = found.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    return names + (["**"] if a.kwarg else [])


def check_item(item: Internal) -> str | None:
    """None when ``item`` is present with the parameters listed, else one line saying what broke."""
    where = f"{item.module}.{item.attr}"
    if item.static and item.module not in sys.modules:
        try:
            names = _static_params(item)
        except Exception as e:  # noqa: BLE001
            return f"{where}: missing ({type(e).__name__}: {e}) on ComfyUI {comfy_version()}"
        missing = [p for p in item.params if p not in names and "**" not in names]
        if missing:
            return (f"{where}: signature changed, parameter(s) {', '.join(missing)} gone "
                    f"(now {', '.join(names)}) on ComfyUI {comfy_version()}")
        return None
    try:
        obj = _resolve(item)
    except Exception as e:  # noqa: BLE001 - ImportError, AttributeError, anything at import
        return f"{where}: missing ({type(e).__name__}: {e}) on ComfyUI {comfy_version()}"
    if item.params:
        try:
            sig = inspect.signature(obj)
        except (TypeError, ValueError):
            return f"{where}: not introspectable as a callable on ComfyUI {comfy_version()}"
        names = set(sig.parameters)
        var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
        missing = [p for p in item.params if p not in names and not var_kw]
        if missing:
            return (f"{where}: signature changed, parameter(s) {', '.join(missing)} gone "
                    f"(now {sig}) on ComfyUI {comfy_version()}")
    return None


def check_contract(items=INTERNALS) -> list[str]:
    """One line per broken internal (empty when ComfyUI offers everything the pack uses)."""
    return [msg for msg in (check_item(i) for i in items) if msg]


def affected_nodes(items=INTERNALS) -> list[str]:
    """The nodes that break with the broken ones among ``items``."""
    out: list[str] = []
    for i in items:
        if check_item(i):
            out.extend(n for n in i.nodes if n not in out)
    return out


def warn_if_incompatible() -> list[str]:
    """Log ONE warning naming the broken internals, the nodes affected and the ComfyUI version;
    returns the broken items' lines."""
    broken = {i: msg for i in INTERNALS if (msg := check_item(i))}
    if broken:
        log.warning("SafeGen: ComfyUI %s lacks %d internal(s) SafeGen uses; affected: %s. Details: %s",
                    comfy_version(), len(broken), ", ".join(affected_nodes(broken)), "; ".join(broken.values()))
    return list(broken.values())


# =========================================================================== tokenizers
def encoder_tokenizers(clip) -> dict[str, object]:
    """{'l': SDTokenizer, 'g': …} of a CLIP (SD1: l; SDXL: g and l).
    Mirrors comfy/sd1_clip.py ``SD1Tokenizer`` (attribute ``clip_l``) and comfy/sdxl_clip.py
    ``SDXLTokenizer`` (``clip_l``, ``clip_g``); 0.3.75, 0.33.0."""
    tok = clip.tokenizer
    out = {}
    for key in ("l", "g"):
        t = getattr(tok, f"clip_{key}", None)
        if t is not None and hasattr(t, "tokenize_with_weights") and hasattr(t, "embedding_size"):
            out[key] = t
    if not out:
        raise ValueError(f"unsupported CLIP type {type(tok).__name__}: SafeGen supports SD1.x and SDXL text encoders")
    return out


def embedding_width(tokenizer) -> int:
    return int(tokenizer.embedding_size)  # comfy/sd1_clip.py SDTokenizer.__init__


def embedding_key(tokenizer) -> str:
    return str(tokenizer.embedding_key)  # 'clip_l' / 'clip_g': the key load_embed reads from a file


def special_tokens(tokenizer) -> tuple:
    """(start, end, pad) token ids (comfy/sd1_clip.py SDTokenizer attributes)."""
    return tokenizer.start_token, tokenizer.end_token, tokenizer.pad_token


def tokenize_chunks(tokenizer, text: str) -> list:
    """One encoder's [(token, weight), …] chunks for ``text`` (SDTokenizer.tokenize_with_weights)."""
    return tokenizer.tokenize_with_weights(text)


def vocab(tokenizer) -> dict:
    """token string → id of the encoder's HF tokenizer (SDTokenizer.tokenizer, a CLIPTokenizer)."""
    return tokenizer.tokenizer.get_vocab()


_TMP_EMB_DIR: list[str] = []


def _tmp_embedding_dir() -> str:
    if not _TMP_EMB_DIR:
        d = tempfile.mkdtemp(prefix="safegen_embeddings_")
        atexit.register(shutil.rmtree, d, True)
        _TMP_EMB_DIR.append(d)
    return _TMP_EMB_DIR[0]


@contextlib.contextmanager
def embedding_file_in_reach(clip, tensors: dict[str, torch.Tensor], default_dirs: list[str]):
    """While active, ``embedding:NAME`` (NAME yielded) resolves to ``tensors`` (keyed like a stock
    embedding file: ``clip_l`` / ``clip_g``) in every encoder's tokenizer of ``clip``.

    The tensors are written as an ordinary safetensors embedding file in a private folder that is
    put first in each tokenizer's ``embedding_directory`` (comfy/sd1_clip.py SDTokenizer reads it on
    every ``embedding:`` word through ``load_embed``; same code on 0.3.75 and 0.33.0). So the
    tokens are exactly what stock ``embedding:NAME`` gives. The folder list is restored and the file
    removed on exit."""
    import safetensors.torch
    name = f"safegen_{uuid.uuid4().hex}"
    folder = _tmp_embedding_dir()
    path = os.path.join(folder, f"{name}.safetensors")
    safetensors.torch.save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, path)
    saved = []
    try:
        for tok in encoder_tokenizers(clip).values():
            prev = tok.embedding_directory
            saved.append((tok, prev))
            if prev is None:
                rest = list(default_dirs)
            elif isinstance(prev, str):
                rest = [prev]
            else:
                rest = list(prev)
            tok.embedding_directory = [folder] + rest
        yield name
    finally:
        for tok, prev in saved:
            tok.embedding_directory = prev
        with contextlib.suppress(OSError):
            os.remove(path)


# =========================================================================== text encoders
def text_encoder(clip, enc: str):
    """The SDClipModel of encoder ``enc`` ('l' / 'g') inside ``clip.cond_stage_model``
    (comfy/sd1_clip.py SD1ClipModel ``clip_l``; comfy/sdxl_clip.py SDXLClipModel ``clip_l``/``clip_g``)."""
    return getattr(clip.cond_stage_model, f"clip_{enc}")


def input_embedding_rows(clip, enc: str, ids: list[int]) -> torch.Tensor:
    """Rows of encoder ``enc``'s token-embedding table (``transformer.get_input_embeddings()``)."""
    table = text_encoder(clip, enc).transformer.get_input_embeddings().weight
    return table[torch.tensor(ids)].detach().float().cpu().clone()


def encoder_layer_settings(clip) -> dict[str, tuple[int, str, int | None, bool]]:
    """{'clip_l': (num_layers, layer, layer_idx, layer_norm_hidden_state), …} and the CLIP's own
    ``layer_idx`` under key ``None`` (CLIPSetLastLayer). comfy/sd1_clip.py SDClipModel attributes."""
    out = {}
    cm = clip.cond_stage_model
    for attr in ("clip_l", "clip_g"):
        enc = getattr(cm, attr, None)
        if enc is None or not hasattr(enc, "num_layers"):
            continue
        out[attr] = (int(enc.num_layers), enc.layer, enc.layer_idx, bool(enc.layer_norm_hidden_state))
    out[None] = clip.layer_idx
    return out


def encode_token_chunks(clip, enc: str, chunks: list) -> torch.Tensor:
    """Hidden states of the conditioning layer for each 77-token chunk of encoder ``enc``:
    (n, 77, width) in one batched call, with the same layer options ``CLIP.encode_from_tokens``
    sets (comfy/sd.py CLIP.encode_from_tokens: reset_clip_options, set_clip_options({"layer": …}),
    load_model; comfy/sd1_clip.py SDClipModel.encode_token_weights). 0.3.75, 0.33.0."""
    if not chunks:
        raise ValueError("nothing to encode")
    cm = clip.cond_stage_model
    cm.reset_clip_options()
    if clip.layer_idx is not None:
        cm.set_clip_options({"layer": clip.layer_idx})
    clip.load_model()
    out = text_encoder(clip, enc).encode_token_weights([[(t[0], 1.0) for t in c] for c in chunks])[0]
    return out.reshape(len(chunks), -1, out.shape[-1]).float()


def pooled_token_chunks(clip, enc: str, chunks: list) -> torch.Tensor:
    """The pooled output of encoder ``enc`` for each 77-token chunk, (n, width), in one batched call —
    projected for encoders with ``return_projected_pooled`` (SDXL CLIP-G: ``text_embeds``).
    comfy/sd1_clip.py SDClipModel.encode(tokens) → (hidden states, pooled); 0.3.75, 0.33.0."""
    if not chunks:
        raise ValueError("nothing to encode")
    cm = clip.cond_stage_model
    cm.reset_clip_options()
    clip.load_model()
    out = text_encoder(clip, enc).encode([[t[0] for t in c] for c in chunks])
    if out[1] is None:
        raise ValueError(f"text encoder clip_{enc} returns no pooled output")
    return out[1].reshape(len(chunks), -1).float()


def clip_patcher(clip):
    return clip.patcher  # comfy/sd.py CLIP.patcher: the ModelPatcher of the text encoders


def clip_model(clip):
    return clip.cond_stage_model  # comfy/sd.py CLIP.cond_stage_model (SD1ClipModel / SDXLClipModel)


def clip_state_dict(clip) -> dict:
    """The CLIP's stored text-encoder weights keyed relative to its model (``clip_l.transformer.…``) —
    the originals even while a patched clone sharing the modules is loaded (patches applied in place;
    comfy/model_patcher.py ModelPatcher.get_key_patches reads the shared ``backup``; 0.3.75, 0.33.0)."""
    return {k: v[0][0] for k, v in clip.patcher.get_key_patches().items()}


def load_device(model):
    return model.load_device  # comfy/model_patcher.py ModelPatcher.load_device


def clip_patches_version(clip):
    """Identity of the CLIP's weight patches (ModelPatcher.patches_uuid), for caches."""
    return getattr(clip.patcher, "patches_uuid", None)


def clip_with_patcher(clip, patcher):
    """A CLIP sharing ``clip``'s tokenizer and options whose text encoder is ``patcher.model``
    (comfy/sd.py CLIP.clone copies patcher/cond_stage_model/tokenizer; 0.3.75, 0.33.0)."""
    c = clip.clone()
    c.patcher = patcher
    c.cond_stage_model = patcher.model
    return c


# =========================================================================== models
def unet(model) -> torch.nn.Module:
    return model.model.diffusion_model  # comfy/model_base.py BaseModel.diffusion_model


def latent_channels(model) -> int:
    return int(getattr(model.model.latent_format, "latent_channels", 4))  # comfy/latent_formats.py


def unet_config(model) -> dict:
    return model.model.model_config.unet_config  # comfy/supported_models_base.py


def process_latent_in(model, latent: torch.Tensor) -> torch.Tensor:
    return model.model.process_latent_in(latent)  # comfy/model_base.py BaseModel.process_latent_in


def predict_eps(model, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor,
                pooled: torch.Tensor | None, width: int, height: int) -> torch.Tensor:
    """ε prediction of the MODEL at noisy x = x0 + σ·ε (k-diffusion convention).

    comfy/model_base.py ``BaseModel.apply_model`` (input scaling, timestep mapping, ε/v) and, for
    models with an ADM input (SDXL), ``encode_adm`` for the pooled + size vector. 0.3.75, 0.33.0."""
    bm = model.model
    b = x.shape[0]
    ctx = cond.expand(b, -1, -1) if cond.shape[0] == 1 else cond
    kwargs = {}
    if bm.adm_channels:
        pooled_b = pooled.expand(b, -1) if pooled.shape[0] == 1 else pooled
        kwargs["y"] = bm.encode_adm(pooled_output=pooled_b, width=width * 8, height=height * 8,
                                    target_width=width * 8, target_height=height * 8,
                                    prompt_type="positive").to(x)
    den = bm.apply_model(x, sigma.to(x), c_crossattn=ctx, **kwargs)
    return (x - den) / sigma.to(x).view(-1, *([1] * (x.ndim - 1)))


def base_weights(model, prefix: str) -> dict[str, torch.Tensor]:
    """{key: the base's own tensor} under ``prefix``, even while a patched clone sharing the module is
    loaded (comfy/model_patcher.py ModelPatcher.get_key_patches: ``{key: [(weight, convert), patches…]}``;
    0.3.75, 0.33.0)."""
    return {k: v[0][0] for k, v in model.get_key_patches(prefix).items()}


def lora_in_out(patch) -> tuple[int, int] | None:
    """(out, in) features of a LoRA weight adapter made by comfy/lora.py ``load_lora``
    (comfy/weight_adapter/lora.py LoRAAdapter: ``name == "lora"``, ``weights = (up, down, …)``)."""
    w = getattr(patch, "weights", None)
    if getattr(patch, "name", "") == "lora" and w and w[0] is not None and w[1] is not None:
        return (int(w[0].shape[0]), int(w[1].shape[1]))
    return None


def apply_patch_once(patch, weight: torch.Tensor, key: str) -> torch.Tensor:
    """``weight`` (a float32 copy) with one ModelPatcher patch applied at strength 1, as ComfyUI applies it
    (comfy/lora.py calculate_weight: weight adapters and ("diff"/"set", …) tuples). ComfyUI logs and skips
    an adapter whose shapes do not fit; the caller compares the result with the base."""
    import comfy.lora
    return comfy.lora.calculate_weight([(1.0, patch, 1.0, None, None)], weight, key,
                                       intermediate_dtype=torch.float32)


def adapter_shapes(patch) -> str:
    """Shapes of a patch's tensors, for messages."""
    w = getattr(patch, "weights", None)
    if w is None and isinstance(patch, tuple) and len(patch) == 2:
        w = patch[1]
    return ", ".join(str(tuple(t.shape)) for t in (w or ()) if isinstance(t, torch.Tensor)) or "?"


# =========================================================================== LoRA / weight files
def weight_adapter_base():
    """comfy/weight_adapter/base.py WeightAdapterBase: a patch class whose ``calculate_weight`` ComfyUI
    calls when it applies patches (0.3.75, 0.33.0)."""
    from comfy.weight_adapter.base import WeightAdapterBase
    return WeightAdapterBase


def lora_key_map(model) -> dict[str, str]:
    """LoRA module name → model key (comfy/lora.py ``model_lora_keys_unet``)."""
    import comfy.lora
    return comfy.lora.model_lora_keys_unet(model.model, {})


def diffusers_to_ldm_names(model) -> dict[str, str]:
    """diffusers UNet names → LDM names for this model's config (comfy/utils.py ``unet_to_diffusers``)."""
    import comfy.utils
    return comfy.utils.unet_to_diffusers(unet_config(model))


def convert_lora(sd: dict) -> dict:
    """LoRA key conventions normalised (comfy/lora_convert.py ``convert_lora``)."""
    import comfy.lora_convert
    return comfy.lora_convert.convert_lora(sd)


def lora_patches(lora: dict, key_map: dict) -> dict:
    """{model key: weight adapter} of a LoRA state dict (comfy/lora.py ``load_lora``)."""
    import comfy.lora
    return comfy.lora.load_lora(lora, key_map, log_missing=False)


def load_unet_state_dict(sd: dict, metadata: dict | None):
    """A MODEL from a full UNet state dict, type detected by ComfyUI (comfy/sd.py
    ``load_diffusion_model_state_dict``; None when undetected)."""
    import comfy.sd
    return comfy.sd.load_diffusion_model_state_dict(sd, metadata=metadata)


# =========================================================================== training
def _alias(t: torch.Tensor) -> torch.Tensor:
    """A normal tensor sharing ``t``'s memory (no copy): autograd refuses inference tensors."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(
        t.untyped_storage(), t.storage_offset(), t.size(), t.stride())


def _clone_params_supported(patcher) -> set:
    try:
        return set(inspect.signature(patcher.clone).parameters)
    except (TypeError, ValueError):
        return set()


def trainable_clone(patcher):
    """(clone, mode): a clone of ``patcher`` to train through, obtained as core's TrainLoraNode does
    in this ComfyUI (comfy_extras/nodes_train.py):

    * 0.12+ (``clone(force_deepcopy=…, disable_dynamic=…)``, comfy/model_patcher.py): a plain
      ModelPatcher over a freshly loaded copy of the model (``cached_patcher_init``), created under
      ``torch.inference_mode(False)`` so its weights are normal tensors; a ``ModelPatcherDynamic``
      (NVIDIA, weights streamed) is turned into a plain one with ``disable_dynamic``.
    * older ComfyUI (0.3.75: ``clone()`` only), or a model whose loader registered no
      ``cached_patcher_init``: a plain clone sharing the weights; :func:`trainable` then aliases the
      loaded inference tensors (no copy). A dynamic patcher without a factory cannot be trained.
    Must be called under ``torch.inference_mode(False)``."""
    params = _clone_params_supported(patcher)
    dynamic = bool(getattr(patcher, "is_dynamic", lambda: False)())
    factory = getattr(patcher, "cached_patcher_init", None)
    if "force_deepcopy" in params and factory is not None:
        kw = {"force_deepcopy": True}
        if "disable_dynamic" in params:
            kw["disable_dynamic"] = True
        clone = patcher.clone(**kw)
        drop_orphaned_entries(clone.model)
        return clone, "fresh copy"
    if dynamic:
        raise RuntimeError(
            "SafeGen: this model streams its weights (ComfyUI dynamic VRAM) and its loader registered no way "
            "to load a trainable copy (cached_patcher_init). Load it with a core loader (Load Checkpoint, "
            "Load Diffusion Model, Load CLIP) or start ComfyUI with --disable-dynamic-vram.")
    return patcher.clone(), "shared weights"


def drop_orphaned_entries(model) -> int:
    """Remove the loaded-model entries of ``model`` whose patcher is gone (comfy/model_management.py
    ``current_loaded_models``, ``LoadedModel.is_dead``; 0.3.75 and 0.33.0). ``clone(force_deepcopy=True)``
    builds the copy with the model's loader (``cached_patcher_init``); for a CLIP that loader loads a
    temporary CLIP at construction and drops it, leaving an entry whose patcher is collected while its
    model lives on as the clone's. ComfyUI then takes it for a leak and runs a full ``gc.collect()`` on
    every later ``load_models_gpu`` (``cleanup_models_gc``): measured on 0.33.0, ~150 ms twice per
    inversion step. The clone is loaded under its own entry right after, so nothing is lost."""
    import comfy.model_management as mm
    entries = mm.current_loaded_models
    dropped = 0
    for i in reversed(range(len(entries))):
        ref = getattr(entries[i], "real_model", None)
        if callable(ref) and entries[i].model is None and ref() is model:
            entries.pop(i)
            dropped += 1
    return dropped


@contextlib.contextmanager
def trainable(*patchers):
    """Load trainable clones (:func:`trainable_clone`) for autograd inside a prompt.

    "fresh copy" clones hold normal tensors already. For "shared weights" clones, after loading
    (patches and weight wrappers applied) each inference parameter/buffer of the shared module is
    swapped for a normal tensor sharing its memory (``torch.nn.Module._parameters``/``_buffers``;
    no copy) and restored in ``finally``. Weights stay frozen (``requires_grad=False``).
    CLIP layers add in place (comfy/clip_model.py CLIPLayer.forward ``x +=``, 0.3.75 and 0.33.0),
    which autograd cannot differentiate (layer_norm1 saved ``x``): while active, each CLIPLayer of
    the clones gets the same computation out of place as an instance ``forward`` (removed in
    ``finally``). ``torch.autograd.graph.allow_mutation_on_saved_tensors`` would avoid that, but its
    dispatch mode made CLIP training several times slower here."""
    import comfy.model_management as mm
    swaps, frozen, overrides = [], [], []
    with torch.inference_mode(False):
        try:
            mm.load_models_gpu(list(patchers), memory_required=1e20, force_full_load=True)
            for p in patchers:
                for mod in p.model.modules():
                    for kind in ("_parameters", "_buffers"):
                        table = mod.__dict__.get(kind, {})
                        for n, t in list(table.items()):
                            if t is None:
                                continue
                            if not t.is_inference():
                                if kind == "_parameters" and t.requires_grad:
                                    frozen.append(t)  # never train the model's own weights
                                    t.requires_grad_(False)
                                continue
                            a = _alias(t)
                            if kind == "_parameters":
                                a = torch.nn.Parameter(a, requires_grad=False)
                            table[n] = a
                            swaps.append((table, n, t, a))
                    if type(mod).__name__ == "CLIPLayer":
                        mod.forward = _out_of_place_clip_layer(mod)
                        overrides.append(mod)
            yield
        finally:
            for mod in overrides:
                mod.__dict__.pop("forward", None)
            for table, n, orig, a in swaps:
                if table.get(n) is a:  # ComfyUI may have re-patched meanwhile: keep its tensor then
                    table[n] = orig
            for t in frozen:
                t.requires_grad_(True)


def _out_of_place_clip_layer(layer):
    """comfy/clip_model.py CLIPLayer.forward (0.3.75, 0.33.0) without the in-place adds."""
    def forward(x, mask=None, optimized_attention=None):
        x = x + layer.self_attn(layer.layer_norm1(x), mask, optimized_attention)
        return x + layer.mlp(layer.layer_norm2(x))
    return forward


def release(patcher, mode: str, wrappers=()) -> None:
    """Give a trainable clone back. A "fresh copy" is unloaded and freed
    (comfy/model_management.py ``unload_model_and_clones``, 0.33). A "shared weights" clone's weight
    wrappers stay in the shared modules' ``weight_function``/``bias_function`` lists after its load
    (comfy/model_patcher.py ModelPatcher.load extends them; 0.3.75): remove them, so the cached model
    computes with its own weights again."""
    import comfy.model_management as mm
    if mode == "fresh copy":
        if hasattr(mm, "unload_model_and_clones"):
            mm.unload_model_and_clones(patcher)
    else:
        fns = {id(f) for f in wrappers}
        for m in patcher.model.modules():
            for lst in ("weight_function", "bias_function"):
                cur = m.__dict__.get(lst)
                if cur and any(id(f) in fns for f in cur):
                    setattr(m, lst, [f for f in cur if id(f) not in fns])
    mm.cleanup_models_gc()
    mm.soft_empty_cache()


# =========================================================================== sampling
def sample_sigmas(model_options: dict):
    """The running sampler's schedule (transformer_options["sample_sigmas"], set by
    comfy/samplers.py KSampler.sample / CFGGuider.sample)."""
    return model_options.get("transformer_options", {}).get("sample_sigmas")


def guider_of(executor):
    """The CFGGuider running an OUTER_SAMPLE wrapper (comfy/patcher_extension.py WrapperExecutor.class_obj)."""
    return executor.class_obj


def guider_conds(guider) -> dict | None:
    """The guider's processed conds dict during a run (comfy/samplers.py CFGGuider.conds)."""
    conds = getattr(guider, "conds", None)
    return conds if isinstance(conds, dict) else None


def guider_cfg(guider):
    return getattr(guider, "cfg", None)  # comfy/samplers.py CFGGuider.cfg


def convert_cond(cond):
    import comfy.sampler_helpers
    return comfy.sampler_helpers.convert_cond(cond)


def conditioning_set_values(cond, values: dict):
    import node_helpers
    return node_helpers.conditioning_set_values(cond, values)


def prepare_conds(model_base, conds: list[dict], x: torch.Tensor, prompt_type: str) -> list[dict]:
    """Conds prepared like comfy/samplers.py ``process_conds`` does for one list (start/end timesteps,
    ``encode_model_conds``), as comfy_extras/nodes_perpneg.py's model patch does."""
    import comfy.samplers
    comfy.samplers.calculate_start_end_timesteps(model_base, conds)
    return comfy.samplers.encode_model_conds(model_base.extra_conds, conds, x, x.device, prompt_type)


def calc_cond_batch(model, conds, x, sigma, model_options):
    import comfy.samplers
    return comfy.samplers.calc_cond_batch(model, conds, x, sigma, model_options)


def cfg_function(model, cond_pred, uncond_pred, cfg, x, timestep, model_options, cond, uncond):
    import comfy.samplers
    return comfy.samplers.cfg_function(model, cond_pred, uncond_pred, cfg, x, timestep,
                                       model_options=model_options, cond=cond, uncond=uncond)


def cfg_guider_class():
    """comfy/samplers.py CFGGuider, base of the SLD guider (inner_set_conds, conds, original_conds,
    inner_model, cfg, predict_noise; 0.3.75, 0.33.0)."""
    import comfy.samplers
    return comfy.samplers.CFGGuider


def outer_sample_wrapper_type():
    import comfy.patcher_extension
    return comfy.patcher_extension.WrappersMP.OUTER_SAMPLE


def outer_sample_sigmas(args: tuple, kwargs: dict):
    """``sigmas`` of an OUTER_SAMPLE wrapper's call: comfy/samplers.py CFGGuider.outer_sample(noise,
    latent_image, sampler, sigmas, ...)."""
    return kwargs["sigmas"] if "sigmas" in kwargs else args[3]


def outer_sample_hook(key: str, wrapper):
    """A HookGroup that, set as a conditioning's ``hooks``, installs ``wrapper`` as an OUTER_SAMPLE
    wrapper on the model that samples with it (comfy/hooks.py TransformerOptionsHook with
    EnumHookScope.AllConditioning, registered by comfy/sampler_helpers.py prepare_model_patcher
    before CFGGuider.sample builds its OUTER_SAMPLE executor; 0.3.75, 0.33.0)."""
    import comfy.hooks
    import comfy.patcher_extension
    hook = comfy.hooks.TransformerOptionsHook(
        transformers_dict={"wrappers": {comfy.patcher_extension.WrappersMP.OUTER_SAMPLE: {key: [wrapper]}}},
        hook_scope=comfy.hooks.EnumHookScope.AllConditioning)
    group = comfy.hooks.HookGroup()
    group.add(hook)
    return group


# =========================================================================== UI feedback
def send_progress_text(text: str) -> None:
    """Show text on the running node (comfy_execution/utils.py get_executing_context,
    server.py PromptServer.send_progress_text); no-op outside a server."""
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer
        ctx = get_executing_context()
        if ctx is not None and PromptServer.instance is not None:
            PromptServer.instance.send_progress_text(text, ctx.node_id)
    except Exception:  # never let UI feedback break training
        log.debug("progress text not sent", exc_info=True)
