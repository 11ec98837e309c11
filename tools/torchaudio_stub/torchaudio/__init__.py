"""Import-only placeholder for ``torchaudio`` -- for the SafeGen *test host* only.

PyPI's torchaudio wheels do not load beside the CPU-only torch used on the test host, yet
ComfyUI >= 0.20 imports torchaudio at module level from ``comfy/sd.py`` (through
comfy/ldm/lightricks/vae/audio_vae.py), and the audio nodes and encoders import it too.
Image generation never calls it.

This folder is put on ``PYTHONPATH``/``sys.path`` only when no working torchaudio imports;
it must never shadow a real installation. Every ``torchaudio.*`` submodule imports, attribute
access works, *calling* anything raises ``RuntimeError("torchaudio placeholder: ...")``. The
implementation is shared with tools/torchvision_stub: ``tools/placeholder_package.py``.
"""

import runpy as _runpy
from os.path import abspath as _abs, dirname as _dir, join as _join

# Real torchaudio subpackages/submodules (attribute access imports the placeholder submodule,
# so ``from torchaudio import functional`` / ``import torchaudio.functional as AF`` give modules).
_SUBMODULE_NAMES = (
    "_extension", "_internal", "backend", "compliance", "datasets", "functional", "io", "kaldi_io",
    "lib", "models", "pipelines", "prototype", "sox_effects", "transforms", "utils", "version",
    # below them
    "filtering", "kaldi", "wav2vec2", "decoder", "common", "soundfile_backend", "sox_io_backend",
)


# the one implementation: tools/placeholder_package.py
_runpy.run_path(_join(_dir(_dir(_dir(_abs(__file__)))), "placeholder_package.py"),
                run_name="_safegen_placeholder_package")["load_into"](globals(), _SUBMODULE_NAMES)
