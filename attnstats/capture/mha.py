"""The ``mha`` backend: ``torch.nn.MultiheadAttention``, fast path included, outputs unchanged.

Also ``nn.TransformerEncoderLayer``, whose fast path (``torch._transformer_encoder_layer_fwd``) never
calls its ``self_attn`` and is refused as soon as any forward hook sits on the layer or its children:
those layers get no hook at all, but an instance-level ``forward`` wrapper (one per layer, shared by the
open blocks of all threads) that captures ``<layer>.self_attn`` from the layer's input (after ``norm1``
when ``norm_first``) and then calls the original ``forward``. ``nn.TransformerEncoder`` may turn a padded batch into a nested tensor for its
layers; its key-padding mask is kept for them while it runs.

The fast path (``torch._native_multi_head_attention``) never exposes its q and k, so a forward
pre-hook recomputes them from the call's inputs and the module's projection weights, exactly as
``F.multi_head_attention_forward`` does (``in_proj`` or separate ``q/k_proj_weight``, ``bias_k``,
``add_zero_attn``), and rebuilds the mask from ``key_padding_mask`` (True = ignore) and ``attn_mask``
(bool True = not allowed, or additive; ``[Nq, Nk]`` or ``[B·H, Nq, Nk]``). The module itself runs
untouched. ``scale`` is ``1/sqrt(head_dim)``; dropout on the weights is not part of the record.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

from .threads import MISSING, active_recorders, compiling, patch_entry

__all__ = ["install_fast_path_guards", "hook_free_modules", "mha_qk"]

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)
_TEL_SIGNATURE = inspect.signature(nn.TransformerEncoderLayer.forward)
_ENC_SIGNATURE = inspect.signature(nn.TransformerEncoder.forward)


def hook_free_modules(modules) -> set[int]:
    """ids of the modules that must carry no forward hook: every ``TransformerEncoderLayer`` among ``modules``
    (a model's modules) and its children."""
    ids: set[int] = set()
    for module in modules:
        if isinstance(module, nn.TransformerEncoderLayer):
            ids.update(id(m) for m in module.modules())
    return ids


def install_fast_path_guards(recorder, stack: contextlib.ExitStack) -> None:
    """Hooks and wrappers on ``MultiheadAttention``, ``TransformerEncoderLayer``, ``TransformerEncoder``.

    With the ``mha`` backend they capture, for calls made in the thread that opened the block; in every
    thread they also take the capture modes of that thread off the mode stack while these modules run,
    so that their fast paths stay as they would be without record.
    """
    from .sdpa import resume_capture_modes, suspend_capture_modes

    capture = "mha" in recorder.backends
    hook_free = recorder.hook_free
    suspended = threading.local()  # per thread: the modes each running module took off the stack

    def suspend(module, *args):
        if compiling():
            return
        if not hasattr(suspended, "stack"):
            suspended.stack = []
        suspended.stack.append(suspend_capture_modes())

    def resume(module, *args):
        if compiling():
            return
        if getattr(suspended, "stack", None):
            resume_capture_modes(suspended.stack.pop())

    def pre(module, args, kwargs):
        if not capture or compiling() or not recorder.is_recording():
            return None
        name = recorder.module_name(module)
        if name is None:
            return None
        call = _SIGNATURE.bind(module, *args, **kwargs)
        call.apply_defaults()
        a = call.arguments
        with torch.no_grad():
            q, k, mask, causal = mha_qk(
                module, a["query"], a["key"], a["key_padding_mask"], a["attn_mask"], a["need_weights"], a["is_causal"]
            )
        recorder.capture(name, q, k, mask, causal, module.head_dim**-0.5, backend="mha")
        return None

    def encoder_pre(module, args, kwargs):
        suspend(module)
        if compiling() or not recorder.is_recording():
            return
        call = _ENC_SIGNATURE.bind(module, *args, **kwargs)
        recorder.push_encoder_padding(call.arguments.get("src_key_padding_mask"))

    def encoder_post(module, args, kwargs, output):
        if not compiling() and recorder.is_recording():
            recorder.pop_encoder_padding()
        resume(module)

    for module in recorder.modules:
        if id(module) in hook_free:
            if isinstance(module, nn.TransformerEncoderLayer):
                stack.callback(patch_entry(module.__dict__, "forward", functools.partial(_encoder_layer_forward, module)))
            continue
        if isinstance(module, nn.MultiheadAttention):
            stack.callback(module.register_forward_pre_hook(suspend).remove)
            stack.callback(module.register_forward_hook(resume, always_call=True).remove)
            stack.callback(module.register_forward_pre_hook(pre, with_kwargs=True).remove)
        elif isinstance(module, nn.TransformerEncoder):
            stack.callback(module.register_forward_pre_hook(encoder_pre, with_kwargs=True).remove)
            stack.callback(module.register_forward_hook(encoder_post, with_kwargs=True, always_call=True).remove)


def _encoder_layer_forward(layer: nn.TransformerEncoderLayer, original):
    """The instance ``forward`` of ``layer`` while blocks are open (no hook: it would turn the fast path off).

    Shared by every open block (:func:`attnstats.capture.threads.patch_entry`); ``original`` is the
    instance attribute it replaces, or ``MISSING`` for the class's ``forward``. It takes the calling
    thread's capture modes off the stack, captures ``<layer>.self_attn`` for the calling thread's blocks
    with the ``mha`` backend, then runs the layer unchanged.
    """
    from .sdpa import resume_capture_modes, suspend_capture_modes

    def call(*args, **kwargs):
        if original is MISSING:
            return type(layer).forward(layer, *args, **kwargs)
        return original(*args, **kwargs)

    def forward(*args, **kwargs):
        if compiling():
            return call(*args, **kwargs)
        popped = suspend_capture_modes()
        try:
            for recorder in active_recorders():
                name = recorder.module_name(layer)
                if name is None or "mha" not in recorder.backends or not recorder.is_recording():
                    continue
                bound = _TEL_SIGNATURE.bind(layer, *args, **kwargs)
                bound.apply_defaults()
                with torch.no_grad():
                    _capture_encoder_layer(
                        recorder, layer, f"{name}.self_attn" if name else "self_attn", bound.arguments
                    )
            return call(*args, **kwargs)
        finally:
            resume_capture_modes(popped)

    return forward


def _capture_encoder_layer(recorder, layer, attn_name: str, a: dict) -> None:
    src, kpm = a["src"], a["src_key_padding_mask"]
    if src.is_nested:
        # TransformerEncoder's fast path: a left-aligned nested batch, its padding mask kept aside
        kpm = recorder.encoder_padding()
        if kpm is None:
            raise ValueError(f"record(): {attn_name} got a nested tensor without the encoder's src_key_padding_mask")
        b, n = kpm.shape
        src = src.to_padded_tensor(0.0, (b, n, src.size(-1)))
        if kpm.dtype != torch.bool:
            kpm = kpm < 0
    x = layer.norm1(src) if layer.norm_first else src
    q, k, mask, causal = mha_qk(layer.self_attn, x, x, kpm, a["src_mask"], False, bool(a["is_causal"]))
    recorder.capture(attn_name, q, k, mask, causal, layer.self_attn.head_dim**-0.5, backend="mha")


def _float_mask(mask, dtype, name: str):
    """MHA's masks as additive float (``-inf`` where bool True = not allowed), as torch canonicalises them."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, -math.inf)
    if not mask.is_floating_point():
        raise TypeError(f"{name}: expected a bool or float mask, got {mask.dtype}")
    return mask.to(dtype)


def mha_qk(mha: nn.MultiheadAttention, query, key, key_padding_mask=None, attn_mask=None, need_weights=True, is_causal=False):
    """Queries, keys and SDPA-style mask of one ``nn.MultiheadAttention`` call.

    Returns:
        ``q: [B, H, Nq, d]``, ``k: [B, H, Nk', d]`` (``Nk' = Nk`` + 1 for ``bias_k`` + 1 for
        ``add_zero_attn``), ``mask``: additive float ``[B, H|1, Nq|1, Nk']`` or None, ``causal``: bool.
    """
    batched = query.dim() == 3
    if not batched:
        query, key = query.unsqueeze(1), key.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    if mha.batch_first and batched:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    # now [N, B, E] as in F.multi_head_attention_forward
    nq, b, e = query.shape
    h, d = mha.num_heads, mha.head_dim
    if mha._qkv_same_embed_dim:
        w_q, w_k, _ = mha.in_proj_weight.chunk(3)
    else:
        w_q, w_k = mha.q_proj_weight, mha.k_proj_weight
    b_q = b_k = None
    if mha.in_proj_bias is not None:
        b_q, b_k, _ = mha.in_proj_bias.chunk(3)
    q = F.linear(query, w_q, b_q)
    k = F.linear(key, w_k, b_k)
    dtype = q.dtype
    kpm = _float_mask(key_padding_mask, dtype, "key_padding_mask")
    am = _float_mask(attn_mask, dtype, "attn_mask")
    if mha.bias_k is not None:
        k = torch.cat([k, mha.bias_k.repeat(1, b, 1)])
        am = None if am is None else F.pad(am, (0, 1))
        kpm = None if kpm is None else F.pad(kpm, (0, 1))
    q = q.reshape(nq, b * h, d).transpose(0, 1)
    k = k.reshape(k.shape[0], b * h, d).transpose(0, 1)
    if mha.add_zero_attn:
        k = torch.cat([k, torch.zeros((b * h, 1, d), dtype=k.dtype, device=k.device)], dim=1)
        am = None if am is None else F.pad(am, (0, 1))
        kpm = None if kpm is None else F.pad(kpm, (0, 1))
    nk = k.shape[1]
    q = q.reshape(b, h, nq, d)
    k = k.reshape(b, h, nk, d)
    # the SDPA branch of F.multi_head_attention_forward uses is_causal=True and drops attn_mask here
    if is_causal and kpm is None and not need_weights and am is not None:
        return q, k, None, True
    mask = None
    if am is not None:
        mask = am.reshape(b, h, nq, nk) if am.dim() == 3 else am.reshape(1, 1, nq, nk)
    if kpm is not None:
        kp = kpm.reshape(b, 1, 1, nk)
        mask = kp if mask is None else mask + kp
    return q, k, mask, False
