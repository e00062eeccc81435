"""Every distinct Triton kernel launch the interpreter runs in this test session, recorded so that
tests/test_zz_sm90_compile.py can compile each for an H100/H200 (sm_90) at the session's end:
the argument types (tensors' dtypes as pointer types, ints, floats), the constexpr values and the
launch's num_warps / num_stages (and maxnreg where it sets one), and which arguments the launch specialized (`_specialized`); a
kernel taking USE_PDL or ASM also with them on, as the GPU launches it. The interpreter runs a
kernel's Python, so what only the compiler refuses (a loop-carried variable changing type, a
constexpr branch compiled past a return) passes every CPU test and fails on the GPU."""

from __future__ import annotations

import inspect
import itertools
import json

import torch

TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
         torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
         torch.bool: "i1", torch.float8_e4m3fn: "fp8e4nv", torch.float8_e5m2: "fp8e5"}
RECORDS: dict[str, dict] = {}
GPU_ONLY = {"USE_PDL": None, "ASM": ("HALF2", "BITS", "L2_PREFETCH")}     # flag: the flags that use it (None: always)
_ONLY = []          # only_recording()'s: launches recorded there, and not run


def _arg_type(value) -> str | None:
    """Triton's signature type for a runtime argument; None: passed as a constexpr None."""
    if value is None:
        return None
    if hasattr(value, "block_shape") and hasattr(value, "base"):       # a host-side TMA TensorDescriptor
        return f"tensordesc<{TYPES.get(value.base.dtype, '?')}[{', '.join(map(str, value.block_shape))}]>"
    if hasattr(value, "data_ptr") and hasattr(value, "dtype"):
        return "*" + TYPES.get(value.dtype, "?")
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    return "?"


def _specialized(value) -> str | None:
    """How Triton 3.6's launch specializes an argument: "aligned" (tt.divisibility 16: a tensor's
    address or an int, not a bool, that 16 divides), "one" (an int equal to 1 becomes a
    constexpr), else None. A compile told these makes the GPU's code (a unit stride known, vector
    loads, the loops it pipelines, its registers); without them, scalar loads and other counts."""
    if hasattr(value, "data_ptr") and hasattr(value, "dtype"):
        return "aligned" if value.data_ptr() % 16 == 0 else None
    if type(value) is not int:
        return None
    return "aligned" if value % 16 == 0 else "one" if value == 1 else None


def _constant(value):
    value = getattr(value, "value", value)           # tl.constexpr(...)
    return value if value is None or isinstance(value, (bool, int, float, str)) else f"?{type(value).__name__}"


def record(fn, args: tuple, kwargs: dict) -> None:
    sig = inspect.signature(fn)
    bound = sig.bind(*args, **{k: v for k, v in kwargs.items() if k in sig.parameters})
    bound.apply_defaults()
    types, consts, aligned, ones = {}, {}, [], []
    for name, param in sig.parameters.items():
        value = bound.arguments[name]
        kind = None if "constexpr" in str(param.annotation) else _arg_type(value)
        if kind is None:
            consts[name] = _constant(value)
        else:
            types[name] = kind
            spec = _specialized(value)
            if spec is not None:
                (aligned if spec == "aligned" else ones).append(name)
    rec = {"module": fn.__module__, "name": fn.__name__, "types": types, "consts": consts,
           "num_warps": kwargs.get("num_warps", 4), "num_stages": kwargs.get("num_stages", 3),
           **({"maxnreg": kwargs["maxnreg"]} if kwargs.get("maxnreg") else {})}
    into = _ONLY[-1] if _ONLY else RECORDS
    # what the GPU turns on and a CPU never asks for: PDL (qwen3vl_kernels.pdl) and inline PTX (ASM, whose
    # interpreted launches run an emulation of it; only where a flag that uses it is on), each twin
    # also recorded
    gpu_only = [name for name, users in GPU_ONLY.items()
                if consts.get(name) is False and (users is None or any(consts.get(u) for u in users))]
    for on in itertools.product((False, True), repeat=len(gpu_only)):
        twin = {**rec, "consts": {**consts, **dict(zip(gpu_only, on))}}
        # the first launch's alignment, outside the key: the same kernel variant is not compiled again
        into.setdefault(json.dumps(twin, sort_keys=True), {**twin, "aligned": aligned, "ones": ones})


def install() -> None:
    """Record every interpreted launch from now on (the interpreter's InterpretedFunction.run)."""
    from triton.runtime import interpreter

    run = interpreter.InterpretedFunction.run
    if getattr(run, "_records_launches", False):
        return

    def recording_run(self, *args, **kwargs):
        if not kwargs.get("warmup"):
            try:
                record(self.fn, args, {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")})
            except (TypeError, ValueError):           # a launch the signature cannot bind fails below anyway
                if _ONLY:
                    raise
            if _ONLY:
                return None
        return run(self, *args, **kwargs)

    recording_run._records_launches = True
    interpreter.InterpretedFunction.run = recording_run


class only_recording:
    """Inside: interpreted launches are recorded (into `.records`) and not run, so that launch
    functions can be called at a GPU's real shapes and launch tables on a CPU (their outputs stay
    unwritten)."""

    def __enter__(self):
        install()
        self.records: dict[str, dict] = {}
        _ONLY.append(self.records)
        return self

    def __exit__(self, *exc):
        _ONLY.remove(self.records)
        return False


class Counted:
    """A kernel whose launches (kernel[grid](...)) append their grid to `launched`, then run: for
    tests that check which kernel a path launched (monkeypatched over the module's name)."""

    def __init__(self, kernel, launched: list):
        self.kernel, self.launched = kernel, launched

    def __getitem__(self, grid):
        self.launched.append(grid)
        return self.kernel[grid]
