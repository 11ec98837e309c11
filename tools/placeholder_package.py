"""Import-only placeholder packages -- for the SafeGen *test host* only.

The one implementation behind ``tools/torchvision_stub/torchvision`` and
``tools/torchaudio_stub/torchaudio``. Each of those ``__init__.py`` files loads this file (by
path, as module ``_safegen_placeholder_package``) and calls :func:`make_placeholder` on its own
globals. The stub folders are put on ``PYTHONPATH``/``sys.path`` only when no working copy of
the real package imports (``tools/comfy_host.py`` for the server, ``tools/tiny_models.py``
in-process); a placeholder must never shadow a real installation. For a package ``NAME``:

* ``import NAME.<anything>`` works (a meta-path finder for the ``NAME.`` prefix creates an empty
  placeholder package for every submodule);
* attribute access on any of these modules returns a placeholder object; attribute access on a
  placeholder returns another placeholder (``torchvision.transforms.InterpolationMode.BILINEAR``),
  and a placeholder is a class, so ``class X(NAME.something.Y): ...`` works;
* *calling* anything (a placeholder, a subclass of one, or a placeholder module) raises
  ``RuntimeError("NAME placeholder: ... install a real NAME")``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
from typing import Iterable

VERSION = "0.0.0+placeholder"


def _is_dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__")


def make_placeholder(package_globals: dict, submodule_names: Iterable[str], stub_dir: str) -> None:
    """Turn the package whose module globals are ``package_globals`` into a placeholder.

    ``submodule_names``: names of real subpackages/submodules; attribute access with one of
    these names imports the placeholder submodule (so ``from NAME import functional`` yields a
    module, as with the real package). ``stub_dir``: named in error messages.
    """
    pkg = package_globals["__name__"]
    prefix = pkg + "."
    submodules = frozenset(submodule_names)
    marker = f"_safegen_{pkg}_placeholder"

    def fail(what: str) -> RuntimeError:
        return RuntimeError(
            f"{pkg} placeholder: {what} was called, but only an import-only stand-in for "
            f"{pkg} is present ({stub_dir}, used by the SafeGen test host); install a real {pkg}"
        )

    class _PlaceholderMeta(type):
        """Metaclass of every placeholder: missing attributes give placeholders, calls raise."""

        def __getattr__(cls, name: str):
            if _is_dunder(name):
                # Keep introspection (inspect, typing, pickle, mock, doctest) sane.
                raise AttributeError(name)
            return placeholder(f"{cls.__ph_qualname__}.{name}")

        def __call__(cls, *args, **kwargs):
            raise fail(cls.__ph_qualname__)

        def __repr__(cls) -> str:
            return f"<{pkg} placeholder {cls.__ph_qualname__}>"

    class _Placeholder(metaclass=_PlaceholderMeta):
        __ph_qualname__ = f"{pkg}.<placeholder>"

        def __init_subclass__(cls, **kwargs):
            # A subclass defined by user code keeps a readable name for error messages.
            super().__init_subclass__(**kwargs)
            if "__ph_qualname__" not in cls.__dict__:
                cls.__ph_qualname__ = (
                    f"{cls.__module__}.{cls.__qualname__} (subclass of a {pkg} placeholder)"
                )

    cache: dict[str, type] = {}

    def placeholder(qualname: str) -> type:
        obj = cache.get(qualname)
        if obj is None:
            module, _, name = qualname.rpartition(".")
            obj = _PlaceholderMeta(
                name or qualname,
                (_Placeholder,),
                {"__ph_qualname__": qualname, "__module__": module or pkg, "__qualname__": name},
            )
            cache[qualname] = obj
        return obj

    def module_getattr(module_name: str, name: str):
        if _is_dunder(name):
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        if name in submodules:
            return importlib.import_module(f"{module_name}.{name}")
        return placeholder(f"{module_name}.{name}")

    class _PlaceholderModule(types.ModuleType):
        """Type of every ``NAME.*`` submodule created by the finder."""

        def __getattr__(self, name: str):
            return module_getattr(self.__name__, name)

        def __call__(self, *args, **kwargs):
            raise fail(self.__name__)

        def __repr__(self) -> str:
            return f"<{pkg} placeholder module {self.__name__!r}>"

    class _PlaceholderFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        """Meta-path finder + loader that creates a placeholder package for ``NAME.*``."""

        def find_spec(self, fullname, path=None, target=None):
            if not fullname.startswith(prefix):
                return None
            top = sys.modules.get(pkg)
            if top is None or not getattr(top, "__placeholder__", False):
                return None  # never interfere with a real installation
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

        def create_module(self, spec):
            module = _PlaceholderModule(spec.name)
            module.__version__ = VERSION
            module.__placeholder__ = True
            return module

        def exec_module(self, module):
            return None

    setattr(_PlaceholderFinder, marker, True)

    package_globals["__version__"] = VERSION
    package_globals["__placeholder__"] = True

    def __getattr__(name: str):  # PEP 562: attribute access on the top-level package
        return module_getattr(pkg, name)

    package_globals["__getattr__"] = __getattr__

    for finder in list(sys.meta_path):
        if getattr(finder, marker, False):
            sys.meta_path.remove(finder)
    # Appended: the regular path finders are tried first (they find nothing below this package).
    sys.meta_path.append(_PlaceholderFinder())


def load_into(package_globals: dict, submodule_names: Iterable[str]) -> None:
    """Called by a stub's ``__init__.py``: see the module docstring."""
    import os

    stub_dir = os.path.dirname(os.path.dirname(os.path.abspath(package_globals["__file__"])))
    make_placeholder(package_globals, submodule_names,
                     os.path.relpath(stub_dir, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
