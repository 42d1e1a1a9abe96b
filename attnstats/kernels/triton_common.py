"""What attnstats' fused Triton kernels for attention share: whether Triton runs here, tile widths, the
products' precision, and the softmax of one block of tokens (forward and backward), which both
block-diagonal attention (:mod:`attnstats.kernels.block_diagonal_triton`) and LLN+Diag's fused path
(:mod:`attnstats.kernels.lln_triton`) compute.

Triton is optional (``pip install 'attnstats[triton]'``). The kernels run on CUDA tensors, and on CPU
tensors under ``TRITON_INTERPRET=1`` (set before Triton is first imported), which is how the tests check
them on machines without a GPU.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import threading

import torch

try:  # Triton is an optional extra: without it the kernels are simply unavailable
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    HAVE_TRITON = False

# the input dtypes the kernels take (float64 stays on the PyTorch paths)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pad(n: int) -> int:
    """Tile width for a head dim or a block: a power of two ≥ 16 (``tl.dot``'s smallest)."""
    return max(16, triton.next_power_of_2(n))


def precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision for float32 tiles made from inputs of ``dtype``.

    bf16 inputs: one TF32 product (~1e-3, under bf16's 2^-8 rounding of the output); float16 (2^-11)
    and float32: three TF32 products (hi·hi + hi·lo + lo·hi, about float32 accuracy; one measured 1.2e-3
    for float16, benchmarks/RESULTS.md §4); the interpreter computes in plain float32.
    """
    if interpreting():
        return "ieee"
    return "tf32" if dtype == torch.bfloat16 else "tf32x3"


# The kernels compute offsets in 32-bit integers: every tensor they read or write must stay below 2^31
# entries (larger calls take the PyTorch paths)
MAX_OFFSET = 2**31 - 1


def offsets_fit(*xs: torch.Tensor, buffers: int = 0) -> bool:
    """Whether 32-bit offsets reach every entry of ``xs`` (their whole storage: a view into a larger
    tensor is addressed from its storage) and ``buffers`` (the largest buffer a kernel allocates)."""
    return buffers <= MAX_OFFSET and all(
        x.untyped_storage().nbytes() // x.element_size() <= MAX_OFFSET for x in xs)


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


def on_device(x: torch.Tensor):
    """Launch on ``x``'s GPU (Triton launches on the current device); nothing for CPU tensors."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def launched_on_device(fn):
    """An autograd Function's ``forward(ctx, x, …)`` or ``backward(ctx, x)`` run with ``x``'s GPU current."""
    @functools.wraps(fn)
    def run(ctx, x, *args):
        with on_device(x):
            return fn(ctx, x, *args)

    return run


class MixWeights:
    """LLN+Diag's weights ``w_L, w_D`` as the kernels take them: floats (``wl``, ``wd``), or, when
    ``per_channel``, ``[H, d_v]`` tensors passed as contiguous float32 (``wl_t``, ``wd_t``; the floats
    are then 0) whose gradients the kernels return as per-program partials. ``on`` False: the call has
    no weighted sum (the kernels' flag off, every weight unused)."""

    def __init__(self, wl, wd, on: bool = True):
        self.on = on
        self.per_channel = on and isinstance(wl, torch.Tensor)
        self.wl = float(wl) if on and not self.per_channel else 0.0
        self.wd = float(wd) if on and not self.per_channel else 0.0
        self.wl_t, self.wd_t = ((w.detach().to(torch.float32).contiguous() for w in (wl, wd)) if self.per_channel
                                else (None, None))
        self.dtype = wl.dtype if self.per_channel else None

    def grads(self, parts, bsz: int, h: int, dv: int):
        """The weights' gradients ``[H, d_v]`` from the kernels' partials (two tensors ``[B·H, P, DV_PAD]``
        or ``[B, H, P, DV_PAD]``), or Nones when the weights are floats."""
        if not self.per_channel:
            return None, None
        return tuple(x.reshape(bsz, h, -1, x.shape[-1]).sum((0, 2))[:, :dv].to(self.dtype) for x in parts)


if HAVE_TRITON:

    @triton.jit
    def block_probs(q, k, rmask, scale, CAUSAL: tl.constexpr, C_PAD: tl.constexpr, PRECISION: tl.constexpr):
        # Softmax probabilities inside one block of tokens, p [C_PAD, C_PAD] (rows past the block: 0).
        # q, k [C_PAD, D_PAD] float32 tiles of the block's rows (0 past it); rmask [C_PAD]: the rows in
        # the block.
        return block_probs_of(tl.dot(q, tl.trans(k), input_precision=PRECISION), rmask, scale, CAUSAL, C_PAD)

    @triton.jit
    def block_probs_of(qk, rmask, scale, CAUSAL: tl.constexpr, C_PAD: tl.constexpr):
        # block_probs from the block's products q kᵀ [C_PAD, C_PAD] (float32). The whole score tile is on
        # chip: no running maximum. Every row in the block has its own key, so no row is empty.
        offs = tl.arange(0, C_PAD)
        valid = rmask[:, None] & rmask[None, :]
        if CAUSAL:
            valid = valid & (offs[None, :] <= offs[:, None])
        s = tl.where(valid, qk * scale, float("-inf"))
        top = tl.where(rmask, tl.max(s, 1), 0.0)  # rows past the block: no finite score, kept NaN-free
        e = tl.where(valid, tl.exp(s - top[:, None]), 0.0)
        return e / tl.where(rmask, tl.sum(e, 1), 1.0)[:, None]

    @triton.jit
    def block_softmax(q, k, v, rmask, scale, CAUSAL: tl.constexpr, C_PAD: tl.constexpr, PRECISION: tl.constexpr):
        # Softmax attention inside one block (block_probs): p [C_PAD, C_PAD] and p v [C_PAD, DV_PAD] for
        # v [C_PAD, DV_PAD] float32.
        p = block_probs(q, k, rmask, scale, CAUSAL, C_PAD, PRECISION)
        return p, tl.dot(p, v, input_precision=PRECISION)

    @triton.jit
    def block_softmax_grads(q, k, v, p, gd, scale, PRECISION: tl.constexpr):
        # The gradients of the block's output p v for its output gradient gd [C_PAD, DV_PAD]:
        # dv = pᵀ gd, ds = p ⊙ (gd vᵀ − δ), dq = scale·ds k, dk = scale·dsᵀ q, with δ_i = Σ_j p_ij (gd vᵀ)_ij,
        # which equals gd_i · (p v)_i: the output itself is not needed (one product fewer, one tile less
        # held in registers).
        return block_softmax_grads_of(q, k, p, gd, tl.dot(gd, tl.trans(v), input_precision=PRECISION), scale,
                                      PRECISION)

    @triton.jit
    def block_softmax_grads_of(q, k, p, gd, dp, scale, PRECISION: tl.constexpr):
        # block_softmax_grads given dp = gd vᵀ [C_PAD, C_PAD] (float32).
        dv = tl.dot(tl.trans(p), gd, input_precision=PRECISION)  # [C_PAD, DV_PAD]
        ds = p * (dp - tl.sum(p * dp, 1)[:, None]) * scale
        dq = tl.dot(ds, k, input_precision=PRECISION)  # [C_PAD, D_PAD]
        dk = tl.dot(tl.trans(ds), q, input_precision=PRECISION)
        return dq, dk, dv

    @triton.jit
    def mix_weights(WL, WD, h, DV, offs_e, emask, wl, wd, PER_CHANNEL: tl.constexpr):
        # LLN+Diag's (w_L, w_D) for head h: [DV_PAD] rows of [H, DV] float32 tensors, or the scalars wl, wd
        if PER_CHANNEL:
            wl_h = tl.load(WL + h * DV + offs_e, mask=emask, other=0.0)
            wd_h = tl.load(WD + h * DV + offs_e, mask=emask, other=0.0)
        else:
            wl_h = wl
            wd_h = wd
        return wl_h, wd_h
