"""Compile the C++ CPU kernels on first use (cached), or say in one warning why they can't be used.

The build goes through torch's own extension toolchain (``torch.utils.cpp_extension``, ninja, the system C++
compiler) with ``-march=native``: AVX2 + FMA + F16C where the CPU has them, the scalar code elsewhere. The
library lands in torch's extension cache (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``)
under a name carrying a hash of the sources, so an edited kernel rebuilds and a cached one loads in
milliseconds. ``LLMPRUNE_CPU_KERNELS=0`` turns the kernels off (the pure-torch path runs).
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from pathlib import Path

import torch

CSRC = Path(__file__).with_name("csrc")
CFLAGS = ["-O3", "-march=native", "-fopenmp"]  # -fopenmp: at::parallel_for uses torch's own OpenMP pool


def _name() -> str:
    digest = hashlib.sha256()
    for path in sorted(CSRC.iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    digest.update(" ".join(CFLAGS).encode())
    return f"llmprune_cpu_{digest.hexdigest()[:10]}"


@functools.cache
def available() -> bool:
    """True once the ops ``torch.ops.llmprune_cpu.*`` are loaded; builds them on the first call (about a minute)."""
    if os.environ.get("LLMPRUNE_CPU_KERNELS", "1") == "0":
        return False
    try:
        from torch.utils import cpp_extension

        cpp_extension.load(name=_name(), sources=[str(CSRC / "ops.cpp")], extra_cflags=CFLAGS,
                           extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    except Exception as exc:  # a missing compiler, ninja or header: fall back, say why once
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]
        warnings.warn(f"llmprune: the C++ CPU kernels could not be built ({reason}); pruned layers run the slower "
                      "pure-torch path", RuntimeWarning, stacklevel=2)
        return False
    return True


def isa() -> str:
    """The instruction set the kernels were compiled for: ``"avx2"``, ``"scalar"``, or ``"none"`` (not built)."""
    return torch.ops.llmprune_cpu.isa() if available() else "none"
