"""The ``module`` backend: a user function reads q, k off any module, for attention computed by hand.

``capture(module, args, kwargs, output)`` runs as a forward hook on the chosen modules (every module of
the model by default). It returns None for modules that are not attention, else
``(q, k, mask, causal, scale)``: ``q: [B, H, Nq, d]``, ``k: [B, H|Hkv, Nk, d]``, ``mask`` None, bool
(True = attend) or additive float, broadcastable to ``[B, H, Nq, Nk]``, ``causal`` bool, ``scale``
float or None (``1/sqrt(d)``). SDPA calls made inside modules selected with ``modules=`` are left to
this function, so they are not captured twice.
"""
from __future__ import annotations

import contextlib
import fnmatch

import torch

from .threads import compiling

__all__ = ["install_module_capture"]


def _chosen(model, spec):
    for name, module in model.named_modules():
        if spec is None:
            yield name, module
        elif isinstance(spec, str):
            if fnmatch.fnmatchcase(name, spec):
                yield name, module
        elif isinstance(spec, type) or (isinstance(spec, tuple) and all(isinstance(t, type) for t in spec)):
            if isinstance(module, spec):
                yield name, module
        else:
            raise TypeError(
                f"modules: expected None, a module class, a tuple of classes or a str glob over module paths, "
                f"got {type(spec).__name__}"
            )


def install_module_capture(recorder, stack: contextlib.ExitStack, fn, modules) -> None:
    """Register ``fn`` (``record``'s ``capture=``) as a forward hook (with kwargs) on the chosen modules.

    ``modules`` is ``record``'s ``modules=``; modules chosen by it are claimed
    (:meth:`~attnstats.capture.recorder.Recorder.own_module`), so SDPA calls inside them are left to ``fn``.
    """

    def hook(module, args, kwargs, output):
        if compiling() or not recorder.is_recording():  # another thread's forward, or dynamo tracing
            return None
        name = recorder.module_name(module)
        if name is None:
            return None
        with torch.no_grad():
            got = fn(module, args, kwargs, output)
        if got is None:
            return None
        if not isinstance(got, (tuple, list)) or len(got) != 5:
            raise TypeError(
                f"capture: for module {name!r} expected None or a tuple (q, k, mask, causal, scale), "
                f"got {type(got).__name__}{'' if not isinstance(got, (tuple, list)) else f' of length {len(got)}'}"
            )
        q, k, mask, causal, scale = got
        for arg, t in (("q", q), ("k", k)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise TypeError(f"capture: for module {name!r}, {arg} must be a floating-point tensor, got {type(t).__name__}")
        if q.dim() != 4 or k.dim() != 4:
            raise ValueError(
                f"capture: for module {name!r}, expected q [B, H, Nq, d] and k [B, H, Nk, d], "
                f"got {tuple(q.shape)} and {tuple(k.shape)}"
            )
        recorder.capture(name, q, k, mask, bool(causal), scale, backend="module")
        return None

    for name, module in _chosen(recorder.model, modules):
        if modules is not None:
            recorder.own_module(module)
        stack.callback(module.register_forward_hook(hook, with_kwargs=True).remove)
