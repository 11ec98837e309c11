"""A conditioning evaluated in the SAME batched UNet call as the sampler's positive and negative.

SLD needs the safety concept's prediction at every step; SAFREE's latent re-attention needs the
original prompt's features next to the filtered prompt's. Both install an :class:`ExtraCond` on a
cloned MODEL:

* a ``WrappersMP.OUTER_SAMPLE`` wrapper adds the conditioning to the guider's ``conds`` dict at the
  start of every sampling run, so ComfyUI's own ``process_conds`` prepares it exactly like
  positive/negative (areas/masks, start/end percent, ``extra_conds`` → c_crossattn, SDXL ``y``,
  inpaint concat); a ControlNet on the positive or negative (``control_from``) is applied to it too;
* a ``sampler_calc_cond_batch_function`` evaluates ``conds + [extra]`` with ONE ``calc_cond_batch``
  call (ComfyUI concatenates compatible conds into the same UNet batch; the extra one is labelled
  ``len(conds)`` in ``transformer_options["cond_or_uncond"]``), hands the extra prediction to
  ``consume`` and returns the others. An earlier function of the same kind (another patch) is
  chained, so SLD and re-attention compose.

ComfyUI internals go through :mod:`.compat` (comfy/samplers.py, comfy/sampler_helpers.py,
comfy/patcher_extension.py).
"""
from __future__ import annotations

from typing import Callable, Optional

from . import compat


class ExtraCond:
    def __init__(self, key: str, conditioning, prompt_type: str = "negative", control_from: str = "negative"):
        self.key = key
        self.prompt_type = prompt_type
        self.control_from = control_from
        cond = compat.conditioning_set_values(conditioning, {"prompt_type": prompt_type})
        self.conds = compat.convert_cond(cond)
        self.guider = None
        self.label: Optional[int] = None  # its index in cond_or_uncond during the current evaluation
        self._fallback = {}

    def for_run(self, conds: dict) -> list[dict]:
        """Fresh copies of the extra conds; the ControlNet of ``control_from`` is applied to them too,
        so they see the same control as that prediction (and batch with it)."""
        out = [c.copy() for c in self.conds]
        ctrl = next((c["control"] for c in (conds.get(self.control_from) or []) if c.get("control") is not None),
                    None)
        if ctrl is not None:
            for c in out:
                c.setdefault("control", ctrl)
        return out

    def processed(self, model_base, x):
        conds = compat.guider_conds(self.guider) if self.guider is not None else None
        if conds is not None and self.key in conds:
            return conds[self.key]
        # Sampling that did not go through CFGGuider.sample: prepare it as Perp-Neg's model patch does.
        key = (tuple(x.shape), str(x.device), id(model_base))
        if key not in self._fallback:
            self._fallback.clear()
            self._fallback[key] = compat.prepare_conds(model_base, [c.copy() for c in self.conds], x,
                                                       self.prompt_type)
        return self._fallback[key]

    def install(self, m, *, consume: Callable, wants: Callable | None = None,
                on_run_start: Callable | None = None, on_run_end: Callable | None = None):
        """Install on the ModelPatcher ``m`` (a clone the caller owns). ``wants(args)``: whether to
        evaluate the extra cond at this call (``args`` of ``sampler_calc_cond_batch_function``);
        ``consume(args, prediction)`` receives its prediction. Returns the installed function."""
        prev_calc = m.model_options.get("sampler_calc_cond_batch_function")

        def outer_sample_wrapper(executor, *args, **kwargs):
            guider = compat.guider_of(executor)
            self.guider = guider
            if on_run_start is not None:
                on_run_start(guider, args, kwargs)
            conds = compat.guider_conds(guider)
            if conds is not None:
                conds[self.key] = self.for_run(conds)
            try:
                return executor(*args, **kwargs)
            finally:
                self.guider = None
                if on_run_end is not None:
                    on_run_end()

        def calc_cond_batch(args):
            conds = list(args["conds"])

            def evaluate(cs):
                if prev_calc is not None:
                    return prev_calc({**args, "conds": cs})
                return compat.calc_cond_batch(args["model"], cs, args["input"], args["sigma"], args["model_options"])

            if len(conds) < 2 or conds[0] is None or conds[1] is None:  # cfg == 1 optimisation: no CFG
                return evaluate(conds)
            if wants is not None and not wants(args):
                return evaluate(conds)
            self.label = len(conds)
            try:
                out = evaluate(conds + [self.processed(args["model"], args["input"])])
            finally:
                self.label = None
            consume(args, out[len(conds)])
            return list(out[:len(conds)])

        m.add_wrapper_with_key(compat.outer_sample_wrapper_type(), self.key, outer_sample_wrapper)
        m.set_model_sampler_calc_cond_batch_function(calc_cond_batch)
        return calc_cond_batch
