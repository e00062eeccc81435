"""How many compiled variants this process's Triton kernels hold: each first use of a kernel
at a new specialization (constexprs, dtypes, an integer argument that is or is not a multiple of
16) adds one, and compiles it then (from Triton's disk cache, or from scratch on a new machine).
Tests and benchmarks count what a step compiles that a warm-up did not."""

from __future__ import annotations

import sys

PACKAGES = ("qwen3vl_kernels", "qwen3vl_backend")


def compiled_by_kernel() -> dict[str, int]:
    """{module.kernel: compiled variants} for the kernels of PACKAGES' imported modules."""
    from triton.runtime.jit import JITFunction

    seen, out = set(), {}
    for name, module in list(sys.modules.items()):
        if module is None or name.split(".")[0] not in PACKAGES:
            continue
        for attr, obj in list(vars(module).items()):
            if isinstance(obj, JITFunction) and id(obj) not in seen:
                seen.add(id(obj))
                out[f"{name}.{attr}"] = sum(len(entry[0]) for entry in obj.device_caches.values())
    return out


def compiled_kernels() -> int:
    return sum(compiled_by_kernel().values())
