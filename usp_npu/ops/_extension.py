"""Find and load the compiled ``usp_npu`` op library (the fused ring_attention_update), once.

The library is op-only (no Python bindings): loading it registers ``torch.ops.usp_npu.*``.
Where it comes from, in order:

1. ``USP_NPU_EXTENSION_PATH``: a library built elsewhere, e.g. with the root ``CMakeLists.txt``
   (``build/cmake/libusp_npu_ops.so``). When set, only that file is tried.
2. ``usp_npu/ops/_C*.so`` next to this module, built by ``pip install --no-build-isolation .``
   (or ``-e .``, or ``python setup.py build_ext --inplace``).

Only one library may ever be loaded: two libraries that both register the ``usp_npu`` namespace
abort the process. If the ops are already registered (someone loaded a library by hand), nothing
is loaded again. :mod:`usp_npu.ops` loads it on import (outside any torch.compile trace); the
loader is idempotent and thread safe.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

__all__ = [
    "ENV_PATH",
    "extension_available",
    "extension_error",
    "extension_path",
    "find_library",
    "load_extension",
]

#: environment variable that names a library to load instead of the packaged one
ENV_PATH = "USP_NPU_EXTENSION_PATH"

_BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` (or `python setup.py build_ext "
    "--inplace`) in the usp_npu checkout, or build the CMake target and point "
    f"{ENV_PATH} at the library"
)

_lock = threading.Lock()
_state: dict[str, object] = {"done": False, "ok": False, "error": None, "path": None}


def _ops_registered() -> bool:
    """True when ``torch.ops.usp_npu.ring_attention_update`` already exists."""
    try:
        torch.ops.usp_npu.ring_attention_update  # noqa: B018 - attribute lookup is the probe
    except (AttributeError, RuntimeError):
        return False
    return True


def find_library() -> tuple[Path | None, str | None]:
    """The library to load and, when there is none, why: ``(path, None)`` or ``(None, error)``.

    ``USP_NPU_EXTENSION_PATH`` wins when set (and must name a file); otherwise the first
    ``_C*.so`` (``.pyd``, ``.dylib``) next to this module.
    """
    env = os.environ.get(ENV_PATH)
    if env:
        path = Path(env)
        if not path.is_file():
            return None, f"{ENV_PATH}={env!r} is not a file"
        return path, None
    here = Path(__file__).resolve().parent
    for pattern in ("_C*.so", "_C*.pyd", "_C*.dylib"):
        found = sorted(here.glob(pattern))
        if found:
            return found[0], None
    return None, f"no compiled library usp_npu/ops/_C*.so found; {_BUILD_HINT}"


def load_extension() -> bool:
    """Load the library if not done yet; return whether the ops are available."""
    if _state["done"]:
        return bool(_state["ok"])
    with _lock:
        if _state["done"]:
            return bool(_state["ok"])
        ok, error, path = False, None, None
        if _ops_registered():
            ok, path = True, "<already registered>"
        else:
            lib, error = find_library()
            if lib is not None:  # exactly one: two would register one namespace twice
                try:
                    torch.ops.load_library(str(lib))
                except (OSError, RuntimeError) as exc:
                    error = f"loading {lib} failed: {exc}; {_BUILD_HINT}"
                else:
                    if _ops_registered():
                        ok, path = True, str(lib)
                    else:
                        error = f"{lib} loaded but registered no torch.ops.usp_npu ops"
        _state.update(done=True, ok=ok, error=None if ok else error, path=path)
        return ok


def extension_available() -> bool:
    """Whether the compiled ``torch.ops.usp_npu.ring_attention_update(_)`` ops can be used."""
    return load_extension()


def extension_error() -> str | None:
    """Why the extension is unavailable (None when it loaded), including how to build it."""
    load_extension()
    return _state["error"]  # type: ignore[return-value]


def extension_path() -> str | None:
    """The library that was loaded (None when unavailable)."""
    load_extension()
    return _state["path"]  # type: ignore[return-value]
