"""Import-only placeholder for ``torchvision`` -- for the SafeGen *test host* only.

PyPI's torchvision wheels do not work beside the CPU-only torch used on the test host, yet
ComfyUI 0.3.75 imports torchvision at module level (comfy/ldm/cascade, cosmos, ace) and
spandrel imports ``torchvision.transforms.functional``. SD1.x/SDXL inference never calls it.

This folder is put on ``PYTHONPATH``/``sys.path`` only when no working torchvision imports;
it must never shadow a real installation. Every ``torchvision.*`` submodule imports, attribute
access works, *calling* anything raises ``RuntimeError("torchvision placeholder: ...")``. The
implementation is shared with tools/torchaudio_stub: ``tools/placeholder_package.py``.
"""

import runpy as _runpy
from os.path import abspath as _abs, dirname as _dir, join as _join

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


# the one implementation: tools/placeholder_package.py
_runpy.run_path(_join(_dir(_dir(_dir(_abs(__file__)))), "placeholder_package.py"),
                run_name="_safegen_placeholder_package")["load_into"](globals(), _SUBMODULE_NAMES)
