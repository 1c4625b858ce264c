"""Build usp_npu: the Python package plus the C++ ring_attention_update extension.

Install with ``pip install --no-build-isolation .`` so the extension compiles against the torch
already installed (build isolation would download a different torch).
"""

import os
import sys
from pathlib import Path

from setuptools import find_packages, setup


def _extensions() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for the C++ ring_attention_update op library.

    Builds ``csrc/*.cpp`` into ``usp_npu/ops/_C*.so``, an op-only library (no Python.h, no
    ``PyInit``) that :mod:`usp_npu.ops._extension` loads with ``torch.ops.load_library``.
    OpenMP is needed: ``at::parallel_for`` is inline and runs serially without ``-fopenmp``.
    ``USP_NPU_NO_EXTENSION=1`` (or no importable torch) skips it: the package then falls back to
    the composed PyTorch formula.
    """
    if os.environ.get("USP_NPU_NO_EXTENSION", "0") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print(
            "usp_npu: torch is not importable, building without the C++ extension "
            "(install torch first, then `pip install --no-build-isolation .`)",
            file=sys.stderr,
        )
        return [], {}
    here = Path(__file__).resolve().parent
    # paths relative to the project root (pip runs setup.py from there), as setuptools expects
    sources = sorted(f"csrc/{p.name}" for p in (here / "csrc").glob("*.cpp"))
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    ext = CppExtension(
        name="usp_npu.ops._C",
        sources=sources,
        include_dirs=[str(here / "csrc")],
        extra_compile_args=["-O3", "-g0", "-Wno-unknown-pragmas", *openmp],
        extra_link_args=[*openmp],
        py_limited_api=True,  # no Python API used: do not link libtorch_python
    )
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="usp_npu",
    version="0.1.0",
    description="Unified Sequence Parallelism (Ulysses, ring, hybrid) for Ascend NPU, CUDA and CPU",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["usp_npu", "usp_npu.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.3", "numpy", "tqdm"],
    extras_require={
        "test": ["pytest", "ruff"],
        "plot": ["matplotlib"],  # usp-npu bench / plan --plot
        "integrations": ["transformers", "megatron-core", "einops"],
        "docs": ["sphinx", "myst-parser", "furo", "sphinx-intl"],
    },
    entry_points={"console_scripts": ["usp-npu=usp_npu.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
