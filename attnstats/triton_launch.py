"""Launching compiled Triton kernels directly, without Triton's per-call argument binding.

Shared by the attention kernels (:mod:`attnstats.kernels`) and the statistics' kernels
(:mod:`attnstats.stats.online_triton` and its neighbours), hence here, under both.
"""
from __future__ import annotations

import contextlib
import os
import re
import threading

import torch

try:  # Triton is an optional extra
    import triton

    HAVE_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    HAVE_TRITON = False


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``, read when a kernel is
    decorated): on CPU tensors, how the tests check the kernels without a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def on_device(x: torch.Tensor):
    """The CUDA device of ``x`` as the current one while a kernel is launched: Triton launches on the
    current device, and a tensor on another GPU (a model split over GPUs) would be read from the wrong
    one. A no-op for CPU tensors (the interpreter)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


# Launching. Triton's own launch (``kernel[grid](...)``) binds and specialises every argument in Python on
# each call: about 50 µs of host time for a kernel of 20 arguments on an H100 host, against 17 µs for the
# compiled kernel launched directly (benchmarks/host_lln.py, benchmarks/RESULTS.md §4). At a few thousand
# tokens LLN's kernels take less GPU time than that, so :func:`launch` keeps each compiled kernel under a
# key of everything Triton specialises on (tensor dtypes and 16-byte alignment, integer values) and
# launches it directly; a new key goes through Triton's launch once. The direct call is the one Triton's
# own launch makes (checked in the installed Triton's source, see _same_convention); where it differs,
# under the interpreter, or with FAST_LAUNCH off, every launch is Triton's own.
FAST_LAUNCH = True
_COMPILED: dict = {}
_COMPILED_LOCK = threading.Lock()
_MAX_COMPILED = 4096


def _triton_version() -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", triton.__version__)[:2]) if HAVE_TRITON else (0, 0)


def _arg_key(a):
    # what Triton's specialisation reads from an argument: a tensor's dtype and 16-byte alignment, an
    # integer's value (Triton keys on == 1, % 16 == 0 and its width: the value decides all three)
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % 16 == 0
    if isinstance(a, bool):
        return "bool", a
    if isinstance(a, float):  # not specialised: typed fp32 whatever its value
        return float
    return a


def _tail(kernel, args: tuple, meta: dict):
    """The names of the parameters after the positional ``args``, in the kernel's order (the launcher takes
    every parameter, constexprs included, which it skips), or None when one of them is not in ``meta``."""
    names = list(kernel.arg_names)[len(args):]
    return tuple(names) if len(args) <= len(kernel.arg_names) and all(n in meta for n in names) else None


_OPTIONS = ("num_warps", "num_stages", "num_ctas")


def launch(kernel, grid: tuple, *args, **meta) -> None:
    """``kernel[grid](*args, **meta)``, launched directly when it has been compiled for this key before
    (see the comment above :data:`FAST_LAUNCH`). ``meta``: constexpr values by name, and Triton's launch
    options (``num_warps``, ``num_stages``)."""
    driver = _fast_driver() if FAST_LAUNCH and not interpreting() else None
    if driver is None:
        kernel[grid](*args, **meta)
        return
    device = driver.get_current_device()
    key = (kernel, device, tuple(_arg_key(a) for a in args), tuple(meta.items()))
    hit = _COMPILED.get(key)
    if hit is None or hit[0] is None:
        compiled = kernel[grid](*args, **meta)
        if hit is None:
            options = {name: meta.pop(name) for name in _OPTIONS if name in meta}
            tail = _tail(kernel, args, meta)
            direct = (compiled is not None and tail is not None
                      and all(getattr(compiled.metadata, name, value) == value for name, value in options.items()))
            with _COMPILED_LOCK:
                if len(_COMPILED) >= _MAX_COMPILED:  # many distinct lengths: start over rather than grow
                    _COMPILED.clear()
                _COMPILED[key] = (compiled, tail) if direct else (None, None)
        return
    compiled, tail = hit
    bound = args + tuple(meta[name] for name in tail)  # every parameter in order; the options left out
    stream = driver.get_current_stream(device)
    hooks = triton.knobs.runtime
    enter, exit_ = hooks.launch_enter_hook, hooks.launch_exit_hook
    grid = tuple(grid) + (1,) * (3 - len(grid))
    metadata = compiled.launch_metadata(grid, stream, *bound) if enter is not None else None
    compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata, metadata,
                 enter, exit_, *bound)


_DRIVER = []


def _fast_driver():
    """Triton's active driver where direct launches are known to work, else None: Triton ≥ 3.4 (its knobs
    hold the launch hooks) whose own launch passes the compiled kernel the call convention used here."""
    if not _DRIVER:
        driver = None
        if HAVE_TRITON and _triton_version() >= (3, 4) and hasattr(triton, "knobs") and _same_convention():
            try:
                from triton.runtime.driver import driver as drivers

                driver = drivers.active
                driver.get_current_device()
            except Exception:  # no GPU driver here: Triton's own launches (which will say why)
                driver = None
        _DRIVER.append(driver)
    return _DRIVER[0]


def _same_convention() -> bool:
    # Triton's JIT launch, read from the installed source: the call launch() makes on the compiled kernel
    import inspect

    from triton.runtime.jit import JITFunction

    try:
        source = " ".join(inspect.getsource(JITFunction.run).split())
    except (OSError, TypeError):
        return False
    return ("kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata, launch_metadata, "
            "knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *bound_args.values())") in source
