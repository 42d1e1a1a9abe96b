"""Run a transformers model with an attnstats kernel in place of its attention (evaluate or fine-tune).

The swap goes through transformers' attention-function registry (``AttentionInterface``): attnstats
registers one attention function, ``"attnstats"``, which calls the kernel attached to each attention
module, and switches the model to it with ``model.set_attn_implementation``. Restoring switches back
to the previous implementation and detaches the kernels, so outputs are again bit-identical.
"""
from __future__ import annotations

import inspect

import torch

from .base import Kernel, get_kernel

__all__ = ["use_kernel", "KernelSwap", "ATTN_IMPLEMENTATION"]

ATTN_IMPLEMENTATION = "attnstats"
_ATTR = "attnstats_kernel"


def _transformers():
    try:
        import transformers
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError:
        raise ImportError("use_kernel swaps attention inside transformers models: pip install 'attnstats[hf]'") from None
    return transformers, AttentionInterface, AttentionMaskInterface, ALL_MASK_ATTENTION_FUNCTIONS


def _bool_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """transformers' 4-d mask as bool (True = attend); additive masks must hold only 0 and -inf/min."""
    if attention_mask is None or attention_mask.dtype == torch.bool:
        return attention_mask
    low = torch.finfo(attention_mask.dtype).min / 2
    keep = attention_mask > low
    if bool((attention_mask[keep] != 0).any()):
        raise ValueError("attention_mask: an additive attention bias (values other than 0 and -inf) cannot be "
                         "expressed by an attnstats kernel; only padding and causal masks are supported")
    return keep


def attnstats_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention function attnstats registers with transformers (signature of AttentionInterface).

    ``query: [B, H, N, d]``, ``key, value: [B, H_kv, M, d]`` (shared key heads are repeated); returns
    ``(output [B, N, H, d_v], None)``. Attention dropout is not applied (the kernels have none).
    """
    kernel = getattr(module, _ATTR, None)
    if kernel is None:
        raise RuntimeError(
            f"{type(module).__name__}: no attnstats kernel is attached; call attnstats.use_kernel(model, name) "
            "rather than setting attn_implementation='attnstats' by hand"
        )
    if key.shape[1] != query.shape[1]:
        rep = query.shape[1] // key.shape[1]
        key = key.repeat_interleave(rep, dim=1)
        value = value.repeat_interleave(rep, dim=1)
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = bool(getattr(module, "is_causal", False))
    is_causal = bool(is_causal) and query.shape[2] > 1
    if is_causal and query.shape[2] != key.shape[2]:
        raise ValueError(
            f"query, key: causal attention with {query.shape[2]} queries and {key.shape[2]} keys (a key-value "
            "cache) is not supported by attnstats kernels; run the full sequence without a cache"
        )
    mask = _bool_mask(attention_mask)
    if mask is not None and mask.shape[-2] == 1 and query.shape[2] > 1:
        mask = mask.expand(*mask.shape[:-2], query.shape[2], mask.shape[-1])
    out = kernel(query, key, value, causal=is_causal, mask=mask)
    return out.transpose(1, 2).contiguous(), None


def _attention_modules(model) -> list:
    """Submodules whose forward dispatches on ``config._attn_implementation`` (transformers ≥ 4.48)."""
    found = []
    seen: dict = {}
    for name, mod in model.named_modules():
        cls = type(mod)
        if cls not in seen:
            try:
                src = inspect.getsource(cls.forward)
            except (OSError, TypeError):
                src = ""
            seen[cls] = "ALL_ATTENTION_FUNCTIONS" in src or "_attn_implementation" in src and "interface" in src
        if seen[cls] and mod is not model and not any(mod is m for _, m in found):
            found.append((name, mod))
    return found


class KernelSwap:
    """A model running an attnstats kernel; :meth:`restore` (or leaving the ``with`` block) undoes it.

    Attributes:
        model: the swapped model.
        kernels: ``{module name: Kernel}``, one kernel per attention module (so a learnable kernel
            has its own parameters per layer; they are submodules of the model while swapped, named
            ``<module>.attnstats_kernel``, and an optimizer created after the swap sees them).
        previous: the attention implementation the model had before.
    """

    def __init__(self, model, kernels: dict, previous):
        self.model = model
        self.kernels = kernels
        self.previous = previous
        self.active = True

    def restore(self) -> None:
        """Switch the model back to its previous attention implementation and detach the kernels."""
        if not self.active:
            return
        self.model.set_attn_implementation(self.previous)
        for name, mod in self.model.named_modules():
            if name in self.kernels and hasattr(mod, _ATTR):
                delattr(mod, _ATTR)
        self.active = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()
        return False

    def __repr__(self) -> str:
        kinds = sorted({k.name for k in self.kernels.values()})
        return f"KernelSwap(kernel={', '.join(kinds)}, modules={len(self.kernels)}, active={self.active})"


def use_kernel(model, kernel, **kwargs) -> KernelSwap:
    """Make a transformers model compute its attention with an attnstats kernel.

    Args:
        model: a transformers ``PreTrainedModel`` whose attention uses the ``AttentionInterface``
            registry (BERT, RoBERTa, Llama, GPT-2, … in transformers ≥ 4.48).
        kernel: a name from :data:`attnstats.kernels.KERNEL_NAMES` (a new kernel per attention module,
            built with ``kwargs``), or a :class:`~attnstats.kernels.Kernel` instance shared by all
            modules.
        **kwargs: keyword arguments of the kernel class. ``lln_diag`` with a learnable mode gets
            ``num_heads`` and ``head_dim`` from the model config unless given.

    Returns:
        a :class:`KernelSwap`, already applied. Use it as a context manager (restored on exit) or
        call ``.restore()``. Attention weights are not returned (``output_attentions`` gives None);
        key-value-cache decoding is not supported.

    Example::

        model, tok = attnstats.app.models.load_model()
        with attnstats.use_kernel(model, "lln"):
            out = model(**tok(["a sentence"], return_tensors="pt")).last_hidden_state
    """
    _, attention_interface, mask_interface, all_masks = _transformers()
    if isinstance(kernel, Kernel):
        if kwargs:
            raise ValueError(f"kwargs: {sorted(kwargs)} apply to a kernel name, not to a Kernel instance")
        make = lambda: kernel  # noqa: E731 - one shared instance
    elif isinstance(kernel, str):
        config = getattr(model, "config", None)
        if kernel == "lln_diag" and kwargs.get("mode", "average") != "average" and config is not None:
            heads = config.num_attention_heads
            kwargs.setdefault("num_heads", heads)
            kwargs.setdefault("head_dim", getattr(config, "head_dim", None) or config.hidden_size // heads)
        get_kernel(kernel, **kwargs)  # fail early on a bad name or argument
        make = lambda: get_kernel(kernel, **kwargs)  # noqa: E731
    else:
        raise TypeError(f"kernel: expected a kernel name (str) or an attnstats Kernel, got {type(kernel).__name__}")
    if not hasattr(model, "set_attn_implementation") or not hasattr(model, "config"):
        raise TypeError(f"model: expected a transformers PreTrainedModel, got {type(model).__name__}")
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(f"model: {type(model).__name__} has no attention module that dispatches through "
                         "transformers' AttentionInterface, so its attention cannot be swapped")
    if any(hasattr(m, _ATTR) for _, m in modules):
        raise ValueError("model: an attnstats kernel is already swapped in; restore it first")
    attention_interface.register(ATTN_IMPLEMENTATION, attnstats_attention)
    # the sdpa mask builder gives bool masks (True = attend) and None when nothing is masked
    mask_interface.register(ATTN_IMPLEMENTATION, all_masks["sdpa"])
    previous = model.config._attn_implementation
    kernels = {}
    ref = next(model.parameters(), None)
    for name, mod in modules:
        k = make()
        if ref is not None:
            k = k.to(device=ref.device)
        mod.add_module(_ATTR, k)
        kernels[name] = k
    try:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    except Exception:
        for _, mod in modules:
            delattr(mod, _ATTR)
        raise
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        for _, mod in modules:
            delattr(mod, _ATTR)
        raise ValueError(f"model: {type(model).__name__} does not allow setting its attention implementation")
    return KernelSwap(model, kernels, previous)
