"""Import-only placeholder for ``torchvision`` -- for the SafeGen *test host* only.

PyPI's torchvision wheels do not work beside the CPU-only torch used on the test host, yet
ComfyUI 0.3.75 imports torchvision at module level (comfy/ldm/cascade, cosmos, ace) and
spandrel imports ``torchvision.transforms.functional``. SD1.x/SDXL inference never calls it.

This folder is put on ``PYTHONPATH``/``sys.path`` only when no working torchvision imports;
it must never shadow a real installation. What it provides:

* ``import torchvision.<anything>`` works (a meta-path finder for the ``torchvision.`` prefix
  creates an empty placeholder package for every submodule);
* attribute access on any of these modules returns a placeholder object; attribute access on
  a placeholder returns another placeholder (``torchvision.transforms.InterpolationMode.BILINEAR``),
  and a placeholder is a class, so ``class X(torchvision.something.Y): ...`` works;
* *calling* anything (a placeholder, a subclass of one, or a placeholder module) raises
  ``RuntimeError("torchvision placeholder: ... install a real torchvision")``.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+placeholder"
__placeholder__ = True

_PREFIX = "torchvision."

# Names that are real torchvision subpackages/submodules: attribute access on a placeholder
# module with one of these names imports the placeholder submodule (so
# ``from torchvision import transforms`` yields a module, as with the real package).
_SUBMODULE_NAMES = frozenset(
    {
        "_C", "_internally_replaced_utils", "_meta_registrations", "_utils", "datapoints", "datasets",
        "extension", "io", "models", "ops", "transforms", "tv_tensors", "utils", "version",
        # below torchvision.transforms / models / ops / io
        "functional", "v2", "_functional_tensor", "_functional_pil", "_functional_video", "_presets",
        "autoaugment", "_transforms_video", "detection", "segmentation", "video", "quantization",
        "optical_flow", "feature_extraction", "_api", "_utils", "boxes", "misc", "poolers", "roi_align",
        "roi_pool", "image", "video_reader",
    }
)


def _fail(what: str) -> RuntimeError:
    return RuntimeError(
        f"torchvision placeholder: {what} was called, but only an import-only stand-in for "
        "torchvision is present (tools/torchvision_stub, used by the SafeGen test host); "
        "install a real torchvision"
    )


def _is_dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__")


class _PlaceholderMeta(type):
    """Metaclass of every placeholder: missing attributes give placeholders, calls raise."""

    def __getattr__(cls, name: str):
        if _is_dunder(name):
            # Keep introspection (inspect, typing, pickle, mock, doctest) sane.
            raise AttributeError(name)
        return _placeholder(f"{cls.__tv_qualname__}.{name}")

    def __call__(cls, *args, **kwargs):
        raise _fail(cls.__tv_qualname__)

    def __repr__(cls) -> str:
        return f"<torchvision placeholder {cls.__tv_qualname__}>"


class _Placeholder(metaclass=_PlaceholderMeta):
    __tv_qualname__ = "torchvision.<placeholder>"

    def __init_subclass__(cls, **kwargs):
        # A subclass defined by user code keeps a readable name for error messages.
        super().__init_subclass__(**kwargs)
        if "__tv_qualname__" not in cls.__dict__:
            cls.__tv_qualname__ = (
                f"{cls.__module__}.{cls.__qualname__} (subclass of a torchvision placeholder)"
            )


_cache: dict[str, type] = {}


def _placeholder(qualname: str) -> type:
    obj = _cache.get(qualname)
    if obj is None:
        module, _, name = qualname.rpartition(".")
        obj = _PlaceholderMeta(
            name or qualname,
            (_Placeholder,),
            {"__tv_qualname__": qualname, "__module__": module or "torchvision", "__qualname__": name},
        )
        _cache[qualname] = obj
    return obj


def _module_getattr(module_name: str, name: str):
    if _is_dunder(name):
        raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
    if name in _SUBMODULE_NAMES:
        import importlib

        return importlib.import_module(f"{module_name}.{name}")
    return _placeholder(f"{module_name}.{name}")


class _PlaceholderModule(types.ModuleType):
    """Type of every ``torchvision.*`` submodule created by the finder."""

    def __getattr__(self, name: str):
        return _module_getattr(self.__name__, name)

    def __call__(self, *args, **kwargs):
        raise _fail(self.__name__)

    def __repr__(self) -> str:
        return f"<torchvision placeholder module {self.__name__!r}>"


class _PlaceholderFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Meta-path finder + loader that creates a placeholder package for ``torchvision.*``."""

    _safegen_torchvision_placeholder = True

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(_PREFIX):
            return None
        top = sys.modules.get("torchvision")
        if top is None or not getattr(top, "__placeholder__", False):
            return None  # never interfere with a real torchvision
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        module = _PlaceholderModule(spec.name)
        module.__version__ = __version__
        return module

    def exec_module(self, module):
        return None


def __getattr__(name: str):  # PEP 562: attribute access on the top-level package
    return _module_getattr(__name__, name)


def _install_finder() -> None:
    for finder in list(sys.meta_path):
        if getattr(finder, "_safegen_torchvision_placeholder", False):
            sys.meta_path.remove(finder)
    # Appended: the regular path finders are tried first (they find nothing below this package).
    sys.meta_path.append(_PlaceholderFinder())


_install_finder()
