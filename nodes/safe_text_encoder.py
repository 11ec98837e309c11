"""Safe Text Encoder Trainer (SafeText) and Safe Text Encoder (apply deltas / DES / AdvUnlearn files) —
schemas only; the runtime is ``safegen_comfy.safetext``."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..safegen_comfy import safetext


class SafeTextEncoderTrainer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SafeGen_SafeTextEncoderTrainer",
            display_name="Safe Text Encoder Trainer",
            category="SafeGen/text encoder",
            description=(
                "SafeText: fine-tunes the text encoder so UNSAFE prompts' embeddings move away from their "
                "originals (1 − cosine, bounded) while SAFE prompts' embeddings stay (squared distance relative to the "
                "originals' energy): "
                "L = L_u − λ·L_e. Only the chosen layers train, as deltas; originals are encoded once. Saves "
                "models/text_encoders/<name>.safetensors holding the weight DIFFERENCES (trained − original) "
                "and returns the patched CLIP. SD1.x (CLIP-L) and SDXL (CLIP-L + CLIP-G)."),
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP to align (SD1.x CLIP-L or SDXL CLIP-L + CLIP-G)."),
                io.String.Input("unsafe_prompts", default="", multiline=True,
                                tooltip="Unsafe prompts, one per line; empty = the pack's default nudity list "
                                        "(safegen_core/prompts/nudity_unsafe.txt)."),
                io.String.Input("safe_prompts", default="", multiline=True,
                                tooltip="Safe prompts, one per line; empty = the pack's default benign list "
                                        "(safegen_core/prompts/benign_safe.txt)."),
                io.Float.Input("lambda_", default=1.0, min=0.0, max=100.0, step=0.05,
                               tooltip="λ: weight of the effectiveness term (pushing unsafe embeddings away)."),
                io.Int.Input("steps", default=200, min=1, max=100000, tooltip="Optimisation steps."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-6,
                               tooltip="AdamW learning rate of the weight deltas."),
                io.Combo.Input("layers", options=list(safetext.LAYER_CHOICES), default=safetext.LAYER_CHOICES[0],
                               tooltip="Which tensors train: the last 2 encoder layers + final norm; all "
                                       "attention projections; or all encoder layers + final norm."),
                io.Int.Input("batch_size", default=4, min=1, max=256,
                             tooltip="Unsafe and safe prompts drawn per step (each)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of the per-step prompt draws."),
                io.Int.Input("checkpoint_every", default=0, min=0, max=100000,
                             tooltip="Save a resumable checkpoint every N steps (0 = never)."),
                io.Boolean.Input("resume", default=False,
                                 tooltip="Continue from the newest compatible checkpoint of this name."),
                io.String.Input("name", default="safe_text_encoder",
                                tooltip="File name in models/text_encoders (sanitised); also the checkpoint folder."),
                io.String.Input("unsafe_file", default="", optional=True,
                                tooltip="Optional file under ComfyUI's input/: .csv (I2P 'prompt' column) or .txt."),
                io.String.Input("safe_file", default="", optional=True,
                                tooltip="Optional file under ComfyUI's input/: .csv ('prompt' column) or .txt."),
            ],
            outputs=[
                io.Clip.Output(display_name="CLIP", tooltip="The CLIP with the trained deltas applied."),
                io.Image.Output(display_name="loss_plot", tooltip="Training loss L = L_u − λ·L_e per step."),
                io.String.Output(display_name="info", tooltip="Saved file, steps, final losses."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, clip, unsafe_prompts, safe_prompts, lambda_, steps, learning_rate, layers, batch_size, seed,
                checkpoint_every, resume, name, unsafe_file="", safe_file=""):
        out_clip, plot, info = safetext.run_safetext_training(
            clip, unsafe_prompts=unsafe_prompts, safe_prompts=safe_prompts, unsafe_file=unsafe_file,
            safe_file=safe_file, name=name, lambda_=lambda_, steps=steps, learning_rate=learning_rate, layers=layers,
            batch_size=batch_size, seed=seed, checkpoint_every=checkpoint_every, resume=resume)
        return io.NodeOutput(out_clip, plot, info, ui=ui.PreviewText(info))


class SafeTextEncoder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SafeGen_SafeTextEncoder",
            display_name="Safe Text Encoder",
            category="SafeGen/text encoder",
            description=(
                "Applies a safe text encoder to a CLIP as weight patches (no second copy of the encoder) and "
                "encodes the text. Accepts SafeGen delta files (from the trainer), DES checkpoints "
                "(model_state_dict) and AdvUnlearn / transformers CLIPTextModel weights: full weights become "
                "differences against this CLIP's weights. strength 0 = the original encoder."),
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP to patch (SD1.x)."),
                io.Combo.Input("file", options=safetext.text_encoder_files(),
                               tooltip="File in models/text_encoders: SafeGen deltas, DES .pt or AdvUnlearn weights."),
                io.Float.Input("strength", default=1.0, min=-2.0, max=3.0, step=0.05,
                               tooltip="Scale of the weight differences (1 = as trained, 0 = original)."),
                io.String.Input("text", default="", multiline=True,
                                tooltip="Prompt to encode with the patched encoder."),
            ],
            outputs=[
                io.Clip.Output(display_name="CLIP", tooltip="The patched CLIP (use it for other encodes too)."),
                io.Conditioning.Output(display_name="CONDITIONING", tooltip="The text encoded with the patched CLIP."),
            ],
        )

    @classmethod
    def execute(cls, clip, file, strength, text):
        return io.NodeOutput(*safetext.apply_file(clip, file, strength, text))


NODES = [SafeTextEncoderTrainer, SafeTextEncoder]
