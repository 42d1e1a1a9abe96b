"""The ``hf`` backend: transformers models, whatever their ``attn_implementation``.

transformers (≥ 4.48) routes every attention layer through one function ``f(module, query, key,
value, attention_mask, scaling=..., dropout=..., **kwargs)``: the model file's own
``eager_attention_forward`` for ``"eager"``, else the entry of the global registry
``AttentionInterface._global_mapping`` (``sdpa``, ``flash_attention_*``, ``flex_attention``, …). While
any block is open both are replaced by wrappers that call the original with the same arguments. The
wrappers are shared by all blocks and record only for the blocks open in the calling thread; in a
thread without one they call the original straight away.

What the wrapper records, by implementation:
- anything that ends in ``F.scaled_dot_product_attention`` (``sdpa``): the SDPA call itself, seen by
  the capture mode, with the exact mask and causal flag SDPA received, named after the module;
- ``eager``: query, key, the additive 4-D mask (padding, causality, sliding window are in it), scaling;
- ``flash_attention_*``: the 2-D padding mask ``[B, Nk]`` (or None) plus the module's causality,
  bottom-right aligned as flash-attention aligns it, and ``sliding_window``, ``softcap`` if given;
- ``flex_attention``: the dense mask of its ``BlockMask`` (a ``score_mod`` is not represented).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import warnings

import torch

from .threads import active_recorders, compiling, patch_entry

__all__ = ["install_hf"]


def _transformers():
    try:
        import transformers  # noqa: F401
        from transformers.modeling_utils import AttentionInterface
    except ImportError:
        raise ImportError(
            "backend 'hf' needs transformers: pip install 'attnstats[hf]' (or use backend='sdpa')"
        ) from None
    return AttentionInterface


def install_hf(recorder, stack: contextlib.ExitStack) -> None:
    """Wrap the registry entries and the model files' eager functions until ``stack`` closes.

    The wrappers are global and shared by every open block (:func:`attnstats.capture.threads.patch_entry`):
    the first block installs them, the last one to end restores the original objects.
    """
    interface = _transformers()
    mapping = interface._global_mapping
    for key, fn in list(mapping.items()):
        if callable(fn):
            stack.callback(patch_entry(mapping, key, functools.partial(_wrap, impl=key)))
    files = {type(m).__module__ for m in recorder.model.modules() if type(m).__module__.startswith("transformers.")}
    for modname in sorted(files):
        mod = sys.modules.get(modname)
        if callable(getattr(mod, "eager_attention_forward", None)):
            stack.callback(patch_entry(vars(mod), "eager_attention_forward", functools.partial(_wrap, impl="eager")))


def _wrap(fn, impl: str):
    """The wrapper of one attention function: records for the blocks open in the calling thread only."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        signature = None

    @functools.wraps(fn)
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        if compiling():
            return fn(module, query, key, value, attention_mask, *args, **kwargs)
        recorders = []
        for recorder in active_recorders():
            name = recorder.module_name(module)
            if name is not None and "hf" in recorder.backends and recorder.is_recording():
                recorders.append((recorder, name))
        if not recorders:
            return fn(module, query, key, value, attention_mask, *args, **kwargs)
        # while fn runs, an SDPA call inside it is captured by the sdpa backend under the module's name
        with contextlib.ExitStack() as stack:
            running = [(recorder, stack.enter_context(recorder.function_call(name))) for recorder, name in recorders]
            out = fn(module, query, key, value, attention_mask, *args, **kwargs)
        pending = [(recorder, running_call) for recorder, running_call in running if not running_call.captured]
        if pending:
            call = {}
            if signature is not None:
                try:
                    call = dict(signature.bind_partial(module, query, key, value, attention_mask, *args, **kwargs).arguments)
                except TypeError:
                    call = {}
            extra = call.pop("kwargs", None) or {}
            call.update(kwargs)
            call.update(extra)
            for recorder, running_call in pending:
                _capture_call(recorder, running_call.name, impl, module, query, key, attention_mask, call)
        return out

    attention.__wrapped_by_attnstats__ = fn
    return attention


def _capture_call(recorder, name, impl, module, query, key, attention_mask, call) -> None:
    scaling = call.get("scaling")
    softcap = call.get("softcap")
    nq, nk = query.shape[-2], key.shape[-2]
    mask, causal = attention_mask, False
    if impl.startswith("flash"):
        causal_flag = call.get("is_causal")
        causal_flag = causal_flag if causal_flag is not None else getattr(module, "is_causal", False)
        window = call.get("sliding_window")
        mask = _flash_mask(attention_mask, bool(causal_flag) and nq > 1, window, query.shape[0], nq, nk, query.device)
    elif impl == "flex_attention":
        mask = _flex_mask(attention_mask, query.shape[0], query.shape[1], nq, nk, query.device)
        if call.get("score_mod") is not None:
            warnings.warn(
                f"record(): {name} uses flex_attention with a score_mod, which the record does not represent; "
                f"its probs() leave the score_mod out",
                stacklevel=3,
            )
    elif attention_mask is not None and attention_mask.dim() == 2:
        mask = attention_mask.bool()[:, None, None, :]
    recorder.capture(name, query, key, mask, causal, scaling, backend="hf", softcap=softcap)


def _flash_mask(padding, causal: bool, window, b: int, nq: int, nk: int, device) -> torch.Tensor | None:
    """Bool ``[B|1, 1, Nq, Nk]`` mask of a flash-attention call (causal bottom-right, as flash aligns it)."""
    mask = None
    if causal or window is not None:
        i = torch.arange(nq, device=device)[:, None] + (nk - nq)
        j = torch.arange(nk, device=device)[None, :]
        allowed = torch.ones((nq, nk), dtype=torch.bool, device=device)
        if causal:
            allowed = allowed & (j <= i)
        if window is not None:
            allowed = allowed & (j > i - int(window))
        mask = allowed[None, None]
    if padding is not None and padding.dim() == 2:
        pad = padding.bool()[:, -nk:][:, None, None, :]
        mask = pad if mask is None else mask & pad
    return mask


def _flex_mask(block_mask, b: int, h: int, nq: int, nk: int, device):
    if block_mask is None or isinstance(block_mask, torch.Tensor):
        return block_mask
    from torch.nn.attention.flex_attention import create_mask

    mod = block_mask.mask_mod
    return create_mask(mod, b, h, nq, nk, device=device)
