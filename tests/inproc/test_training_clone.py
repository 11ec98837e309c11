"""compat.drop_orphaned_entries: a loaded-model entry whose patcher was collected while its model lives on
(what ``clone(force_deepcopy=True)`` leaves for a CLIP on ComfyUI 0.33) is removed, so ComfyUI does not run a
full ``gc.collect()`` on every later load (measured: ~150 ms twice per inversion step). Entries of other
models and live entries stay."""
from __future__ import annotations

import gc

import torch

from tests.packload import comfy_ready, pack_module

comfy_ready()
import comfy.model_management as mm  # noqa: E402
import comfy.sd  # noqa: E402

from tools.tiny_models import ensure  # noqa: E402


def test_orphaned_entry_of_a_model_is_dropped_and_no_other():
    compat = pack_module("safegen_comfy.compat")
    with torch.inference_mode():
        model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(
            str(ensure("sd1")), output_vae=False, output_clip=True, embedding_directory=[])
    # what a fresh copy's loader does on 0.33: a temporary CLIP is built (and loaded at construction),
    # its text model is kept, the CLIP itself dropped
    with torch.inference_mode():
        _, temp, _, _ = comfy.sd.load_checkpoint_guess_config(
            str(ensure("sd1")), output_model=False, output_vae=False, output_clip=True, embedding_directory=[])
    mm.load_models_gpu([temp.patcher], force_full_load=True)
    text_model = temp.patcher.model
    del temp
    gc.collect()
    dead = [e for e in mm.current_loaded_models if e.model is None and e.real_model() is text_model]
    assert dead, "the temporary patcher's entry should now be orphaned (its model lives on)"
    live_before = [e for e in mm.current_loaded_models if e.model is not None]
    assert compat.drop_orphaned_entries(text_model) == len(dead)
    assert not [e for e in mm.current_loaded_models if e.model is None and e.real_model() is text_model]
    assert [e for e in mm.current_loaded_models if e.model is not None] == live_before
    assert compat.drop_orphaned_entries(model.model) == 0
