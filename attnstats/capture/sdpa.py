"""The ``sdpa`` backend: every call of ``F.scaled_dot_product_attention``, via a ``TorchFunctionMode``.

The mode sees each call with its exact arguments (bool or additive ``attn_mask``, ``is_causal``,
``scale``, ``enable_gqa``), so it covers any code that calls SDPA: transformers' ``sdpa``
implementation, timm's fused attention, nanoGPT-style modules, user code. It passes the call on
unchanged and copies q and k afterwards. PyTorch keeps the mode stack per thread, so the mode sees
only the calls of the thread that opened the block. A call made inside a transformers attention
function is named after its module and recorded in that function's ``[B, H, Nq, d]`` layout
(:func:`attnstats.capture.hf.sdpa_layout`: the grouped-query decode step packs the query heads).

A torch-function mode makes ``torch.overrides.has_torch_function`` true, which turns off the fast
paths of ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` (their output would change in the
last bit). While those modules run, the capture modes are therefore taken off the mode stack and put
back afterwards (:func:`suspend_capture_modes`, used by :mod:`attnstats.capture.mha`).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .hf import sdpa_layout
from .threads import compiling

__all__ = ["CaptureMode", "install_sdpa", "suspend_capture_modes", "resume_capture_modes"]

_SDPA = F.scaled_dot_product_attention
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class CaptureMode(TorchFunctionMode):
    """Torch-function mode that hands each SDPA call of the recorded block to its recorder."""

    def __init__(self, recorder):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is _SDPA and not compiling():
            self._capture(args, kwargs)
        return out

    def _capture(self, args, kwargs) -> None:
        rec = self.recorder
        if not rec.is_recording() or rec.in_owned_module():
            return
        call = dict(zip(_SDPA_PARAMS, args))
        call.update(kwargs)
        query, key, attn_mask = call["query"], call["key"], call.get("attn_mask")
        hf = rec.current_function_call()  # inside a transformers attention function: named after its module
        if hf is not None:
            hf.captured = True
            name = hf.name
            # transformers may pack the query heads (GQA decode step): back to the function's [B, H, Nq, d]
            query, key, attn_mask = sdpa_layout(hf, query, key, attn_mask)
        elif "sdpa" in rec.backends:
            name = rec.current_module()
        else:
            return
        rec.capture(
            name,
            query,
            key,
            attn_mask,
            bool(call.get("is_causal", False)),
            call.get("scale"),
            backend="hf" if hf is not None and "sdpa" not in rec.backends else "sdpa",
            enable_gqa=bool(call.get("enable_gqa", False)),
        )


def suspend_capture_modes() -> list[CaptureMode]:
    """Pop the capture modes at the top of the torch-function mode stack; return them, innermost first."""
    popped = []
    while torch._C._len_torch_function_stack() > 0:
        top = torch._C._get_function_stack_at(torch._C._len_torch_function_stack() - 1)
        if not isinstance(top, CaptureMode):
            break
        popped.append(torch._C._pop_torch_function_stack())
    return popped


def resume_capture_modes(popped: list[CaptureMode]) -> None:
    """Push back what :func:`suspend_capture_modes` popped, in the original order."""
    for mode in reversed(popped):
        torch._C._push_on_torch_function_stack(mode)


def install_sdpa(recorder, stack: contextlib.ExitStack) -> None:
    """Enter a :class:`CaptureMode` for the block (the fast-path guards are installed by the recorder)."""
    stack.enter_context(CaptureMode(recorder))
