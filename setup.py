"""Build usp_npu: the Python package plus the C++ ring_attention_update extension.

Install with ``pip install --no-build-isolation .`` so the extension compiles against the torch
already installed (build isolation would download a different torch).
"""

from pathlib import Path

from setuptools import find_packages, setup


def _extensions() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for the C++ extension; empty until csrc/ exists."""
    return [], {}


ext_modules, cmdclass = _extensions()

setup(
    name="usp_npu",
    version="0.1.0",
    description="Unified Sequence Parallelism (Ulysses, ring, hybrid) for Ascend NPU, CUDA and CPU",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["usp_npu", "usp_npu.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.3", "numpy"],
    extras_require={"test": ["pytest", "ruff"], "docs": ["sphinx", "myst-parser", "furo"]},
    entry_points={"console_scripts": ["usp-npu=usp_npu.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
