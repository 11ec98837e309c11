"""Import-only placeholder for ``torchvision`` -- for the SafeGen *test host* only.

PyPI's torchvision wheels do not work beside the CPU-only torch used on the test host, yet
ComfyUI 0.3.75 imports torchvision at module level (comfy/ldm/cascade, cosmos, ace) and
spandrel imports ``torchvision.transforms.functional``. SD1.x/SDXL inference never calls it.

This folder is put on ``PYTHONPATH``/``sys.path`` only when no working torchvision imports;
it must never shadow a real installation. Every ``torchvision.*`` submodule imports, attribute
access works, *calling* anything raises ``RuntimeError("torchvision placeholder: ...")``. The
implementation is shared with tools/torchaudio_stub: ``tools/placeholder_package.py``.
"""

import importlib.util as _ilu
import os as _os
import sys as _sys

# Names that are real torchvision subpackages/submodules: attribute access on a placeholder
# module with one of these names imports the placeholder submodule (so
# ``from torchvision import transforms`` yields a module, as with the real package).
_SUBMODULE_NAMES = (
    "_C", "_internally_replaced_utils", "_meta_registrations", "_utils", "datapoints", "datasets",
    "extension", "io", "models", "ops", "transforms", "tv_tensors", "utils", "version",
    # below torchvision.transforms / models / ops / io
    "functional", "v2", "_functional_tensor", "_functional_pil", "_functional_video", "_presets",
    "autoaugment", "_transforms_video", "detection", "segmentation", "video", "quantization",
    "optical_flow", "feature_extraction", "_api", "boxes", "misc", "poolers", "roi_align",
    "roi_pool", "image", "video_reader",
)


def _implementation():
    name = "_safegen_placeholder_package"
    mod = _sys.modules.get(name)
    if mod is None:
        path = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))),
                             "placeholder_package.py")
        spec = _ilu.spec_from_file_location(name, path)
        mod = _ilu.module_from_spec(spec)
        _sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return mod


_implementation().load_into(globals(), _SUBMODULE_NAMES)
