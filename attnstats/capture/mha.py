"""The ``mha`` backend: ``torch.nn.MultiheadAttention``, fast path included, outputs unchanged.

Also ``nn.TransformerEncoderLayer``, whose fast path (``torch._transformer_encoder_layer_fwd``) never
calls its ``self_attn`` and is refused as soon as any forward hook sits on the layer or its children:
those layers get no hook at all, but an instance-level ``forward`` wrapper that captures
``<layer>.self_attn`` from the layer's input (after ``norm1`` when ``norm_first``) and then calls the
original ``forward``. ``nn.TransformerEncoder`` may turn a padded batch into a nested tensor for its
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
import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["install_mha", "install_fast_path_guards", "hook_free_modules", "mha_qk"]

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)
_TEL_SIGNATURE = inspect.signature(nn.TransformerEncoderLayer.forward)
_ENC_SIGNATURE = inspect.signature(nn.TransformerEncoder.forward)


def hook_free_modules(model: nn.Module) -> set[int]:
    """ids of the modules that must carry no forward hook: every ``TransformerEncoderLayer`` and its children."""
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoderLayer):
            ids.update(id(m) for m in module.modules())
    return ids


def install_mha(recorder, stack: contextlib.ExitStack) -> None:
    """Kept for symmetry with the other backends: the work is done by :func:`install_fast_path_guards`."""
    install_fast_path_guards(recorder, stack)


def install_fast_path_guards(recorder, stack: contextlib.ExitStack) -> None:
    """Hooks and wrappers on ``MultiheadAttention``, ``TransformerEncoderLayer``, ``TransformerEncoder``.

    With the ``mha`` backend they capture; whenever a capture mode is active they also take it off the
    mode stack while these modules run, so that their fast paths stay as they would be without record.
    """
    from .sdpa import resume_capture_modes, suspend_capture_modes

    capture = "mha" in recorder.backends
    hook_free = hook_free_modules(recorder.model)
    suspended: list = []
    padding_stash: list = []

    def suspend(module, *args):
        suspended.append(suspend_capture_modes())

    def resume(module, *args):
        if suspended:
            resume_capture_modes(suspended.pop())

    def pre(module, args, kwargs):
        name = recorder.module_name(module)
        if not capture or name is None or not recorder._active:
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
        call = _ENC_SIGNATURE.bind(module, *args, **kwargs)
        padding_stash.append(call.arguments.get("src_key_padding_mask"))

    def encoder_post(module, args, kwargs, output):
        if padding_stash:
            padding_stash.pop()
        resume(module)

    for module in dict.fromkeys(recorder.model.modules()):
        if id(module) in hook_free:
            if isinstance(module, nn.TransformerEncoderLayer):
                _wrap_encoder_layer(recorder, module, stack, capture, padding_stash)
            continue
        if isinstance(module, nn.MultiheadAttention):
            stack.callback(module.register_forward_pre_hook(suspend).remove)
            stack.callback(module.register_forward_hook(resume, always_call=True).remove)
            stack.callback(module.register_forward_pre_hook(pre, with_kwargs=True).remove)
        elif isinstance(module, nn.TransformerEncoder):
            stack.callback(module.register_forward_pre_hook(encoder_pre, with_kwargs=True).remove)
            stack.callback(module.register_forward_hook(encoder_post, with_kwargs=True, always_call=True).remove)


def _wrap_encoder_layer(recorder, layer: nn.TransformerEncoderLayer, stack, capture: bool, padding_stash: list) -> None:
    """Replace ``layer.forward`` (instance attribute, no hook) by a capturing, mode-suspending wrapper."""
    from .sdpa import resume_capture_modes, suspend_capture_modes

    had_own = "forward" in layer.__dict__
    original = layer.forward
    name = recorder.module_name(layer)
    attn_name = f"{name}.self_attn" if name else "self_attn"

    def forward(*args, **kwargs):
        popped = suspend_capture_modes()
        try:
            if capture and recorder._active:
                call = _TEL_SIGNATURE.bind(layer, *args, **kwargs)
                call.apply_defaults()
                a = call.arguments
                with torch.no_grad():
                    _capture_encoder_layer(recorder, layer, attn_name, a, padding_stash)
            return original(*args, **kwargs)
        finally:
            resume_capture_modes(popped)

    layer.forward = forward

    def restore():
        if had_own:
            layer.forward = original
        else:
            del layer.__dict__["forward"]

    stack.callback(restore)


def _capture_encoder_layer(recorder, layer, attn_name: str, a: dict, padding_stash: list) -> None:
    src, kpm = a["src"], a["src_key_padding_mask"]
    if src.is_nested:
        # TransformerEncoder's fast path: a left-aligned nested batch, its padding mask kept aside
        kpm = padding_stash[-1] if padding_stash else None
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
