"""The ``hf`` backend: transformers models, whatever their ``attn_implementation``.

transformers (≥ 4.48) routes every attention layer through one function ``f(module, query, key,
value, attention_mask, scaling=..., dropout=..., **kwargs)``: the model file's own eager function for
``"eager"`` (``eager_attention_forward``, or another module-level function whose name ends in
``eager_attention_forward``: ``text_…``, ``vision_…``, ``simple_…``), else the entry of the global
registry ``AttentionInterface._global_mapping`` (``sdpa``, ``flash_attention_*``, ``flex_attention``,
``paged|eager``, …). While any block is open all of them are replaced by wrappers that call the
original with the same arguments. The wrappers are shared by all blocks and record only for the blocks
open in the calling thread; in a thread without one they call the original straight away.

What the wrapper records, by implementation:
- anything that ends in ``F.scaled_dot_product_attention`` (``sdpa``): the SDPA call itself, seen by
  the capture mode, with the exact mask and causal flag SDPA received, named after the module
  (transformers folds ``position_bias`` into that mask). transformers' grouped-query decode step packs
  the query ``[B, H, 1, d]`` as ``[B, Hkv, n_rep, d]`` before SDPA; :func:`sdpa_layout` maps the call
  back to ``[B, H, 1, d]`` from the query the wrapper received, and raises rather than guess when the
  query SDPA got is no known rearrangement of it;
- ``eager``: query, key, the additive 4-D mask (padding, causality, sliding window are in it), scaling;
- ``flash_attention_*``: the 2-D padding mask ``[B, Nk]`` (or None) plus the module's causality,
  bottom-right aligned as flash-attention aligns it, and ``sliding_window`` if given;
- ``flex_attention``: the dense mask of its ``BlockMask`` or its float mask.

What else shapes the scores is read from the call, when the function takes it (a named parameter):
``position_bias=`` (T5, mT5, UMT5, Switch, Pix2Struct, wav2vec2-BERT/Conformer, …; folded into the
record's ``bias``, masked entries into its ``mask``), ``softcap=`` (Gemma 2/3), and attention sinks:
``sinks=`` (one logit per query row), ``s_aux=`` (flex, flash), or ``module.sinks`` when the function's
code reads it (GPT-OSS and the other eager sink functions), kept as the record's ``sinks``. One of these
passed to a function that does not take it (e.g. ``s_aux`` to ``sdpa``, which ignores sinks) gives one
warning per block and argument, naming the module: the record then holds what the function computed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import re
import sys
import threading
import warnings

import torch

from .threads import active_recorders, compiling, patch_entry

__all__ = ["install_hf", "sdpa_layout"]

# module-level eager functions of the model files: eager_attention_forward, text_/vision_/simple_… variants
_EAGER_NAME = re.compile(r"\w*eager_attention_forward")
# arguments that change the scores, read only when the attention function takes them
_SCORE_ARGS = ("position_bias", "softcap", "sinks", "s_aux")


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
    files = {type(m).__module__ for m in recorder.modules if type(m).__module__.startswith("transformers.")}
    for modname in sorted(files):
        table = vars(sys.modules[modname]) if modname in sys.modules else {}
        for fname in sorted(n for n, fn in table.items() if _EAGER_NAME.fullmatch(n) and callable(fn)):
            stack.callback(patch_entry(table, fname, functools.partial(_wrap, impl="eager")))
    stack.callback(_warned.pop, id(recorder), None)


@dataclasses.dataclass(eq=False)
class _Origin:
    """One running attention function call, as the wrapper received it (for :func:`sdpa_layout`)."""

    module: object
    query: torch.Tensor
    calls: tuple  # the recorders' FunctionCall objects of this call


_local = threading.local()  # .origins: the running wrapped calls of this thread, innermost last
_warned: dict[int, set] = {}  # id(recorder) -> keys already warned about in its open block


def _origins() -> list:
    origins = getattr(_local, "origins", None)
    if origins is None:
        origins = _local.origins = []
    return origins


def _parameters(fn) -> frozenset | None:
    """Names of ``fn``'s named parameters, or None when unknown (unreadable, or only ``*args, **kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    named = frozenset(p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
    return named or None


def _reading(fn) -> tuple:
    """``(signature or None, named parameters, reads module.sinks, name)`` of an attention function (read
    once per function, with its wrapper: ``inspect.signature`` is slow)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        signature = None
    code = getattr(inspect.unwrap(fn), "__code__", None)
    # eager sink functions read the sink logits from the module (module.sinks), not from an argument
    reads_module_sinks = code is not None and "sinks" in code.co_names
    fname = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", repr(fn))
    return signature, _parameters(fn), reads_module_sinks, fname


def _wrap(fn, impl: str):
    """The wrapper of one attention function (the same object each time for the same ``fn`` and ``impl``)."""
    try:
        return _wrapper(fn, impl)
    except TypeError:  # an unhashable callable: a wrapper of its own
        return _wrapper.__wrapped__(fn, impl)


@functools.lru_cache(maxsize=256)
def _wrapper(fn, impl: str):
    """The wrapper of one attention function: records for the blocks open in the calling thread only.

    Made once per function: every ``record`` block wraps the same registered functions again, and
    copying a function's attributes onto its wrapper cost a block about a millisecond on entry.
    """
    signature, params, reads_module_sinks, fname = _reading(fn)

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
            origin = _Origin(module, query, tuple(running_call for _, running_call in running))
            origins = _origins()
            origins.append(origin)
            try:
                out = fn(module, query, key, value, attention_mask, *args, **kwargs)
            finally:
                origins.remove(origin)
        # the call's arguments by name; only the keyword ones can be score arguments when no positional
        # argument follows the first five (transformers passes the rest by keyword), and binding the
        # signature costs more than the rest of the wrapper
        call = {}
        if signature is not None and args:
            try:
                call = dict(signature.bind_partial(module, query, key, value, attention_mask, *args, **kwargs).arguments)
            except TypeError:
                call = {}
        extra = call.pop("kwargs", None) or {}
        call.update(kwargs)
        call.update(extra)
        read = _read_score_args(call, params, reads_module_sinks, module)
        for recorder, running_call in running:
            _warn_unread(recorder, running_call.name, impl, fname, call, read)
            if not running_call.captured:
                _capture_call(recorder, running_call.name, impl, module, query, key, attention_mask, call, read)
        return out

    attention.__wrapped_by_attnstats__ = fn
    return attention


def _read_score_args(call: dict, params, reads_module_sinks: bool, module) -> dict:
    """The score-changing arguments the function uses: ``{"position_bias", "softcap", "sinks"}`` -> value."""

    def takes(arg):
        return params is None or arg in params

    read = {arg: call[arg] for arg in ("position_bias", "softcap") if call.get(arg) is not None and takes(arg)}
    for arg in ("sinks", "s_aux"):  # explicit per-row (sinks=) or per-head (s_aux=) sink logits
        if call.get(arg) is not None and takes(arg):
            read["sinks"] = call[arg]
            break
    else:
        sinks = getattr(module, "sinks", None)
        if reads_module_sinks and isinstance(sinks, torch.Tensor):
            read["sinks"] = sinks
    return read


def _warn_unread(recorder, name, impl, fname, call, read) -> None:
    """One warning per block and argument when a score-changing argument is passed but not used."""
    for arg in _SCORE_ARGS:
        used = arg in read or (arg in ("sinks", "s_aux") and "sinks" in read)
        if call.get(arg) is None or used:
            continue
        seen = _warned.setdefault(id(recorder), set())
        if (impl, arg) in seen:
            continue
        seen.add((impl, arg))
        what = "the attention sinks" if arg in ("sinks", "s_aux") else f"the {arg}"
        warnings.warn(
            f"record(): {name} passes {arg}= to its attention function {fname} ({impl!r}), which has no such "
            f"parameter (transformers' own functions then ignore it): the record leaves {what} out "
            f"(one warning per block, whichever modules pass it)",
            stacklevel=4,
        )


def _warn_layout(recorder, name, impl, what: str) -> None:
    seen = _warned.setdefault(id(recorder), set())
    if (name, "layout") in seen:
        return
    seen.add((name, "layout"))
    warnings.warn(f"record(): {name} ({impl!r} attention) is not recorded: {what}", stacklevel=4)


def _capture_call(recorder, name, impl, module, query, key, attention_mask, call, read) -> None:
    if query.dim() != 4 or key.dim() != 4 or query.shape[-1] != key.shape[-1] or query.shape[1] % key.shape[1]:
        _warn_layout(
            recorder, name, impl,
            f"its attention function got query {tuple(query.shape)} and key {tuple(key.shape)}, expected "
            f"[B, H, Nq, d] and [B, Hkv, Nk, d] with Hkv dividing H",
        )
        return
    scaling = call.get("scaling")
    softcap = read.get("softcap")
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
    elif attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[-1] > nk:
        mask = attention_mask[..., :nk]  # older eager functions slice a mask built for a longer cache to their keys
    if read.get("position_bias") is not None:
        mask = _fold_bias(mask, read["position_bias"])
    sinks = read.get("sinks")
    if sinks is not None:
        sinks = _sink_logits(sinks, name, query.shape[0], query.shape[1], nq)
    recorder.capture(name, query, key, mask, causal, scaling, backend="hf", softcap=softcap, sinks=sinks)


def _masked(m: torch.Tensor) -> torch.Tensor:
    """Bool: the entries of an additive mask or bias that mean "masked" (``-inf``, or ≤ half the dtype's min)."""
    if m.dtype == torch.bool:
        return ~m
    return torch.isneginf(m) | (m <= torch.finfo(m.dtype).min / 2)


def _fold_bias(mask, bias: torch.Tensor) -> torch.Tensor:
    """One float32 additive mask: ``bias`` plus the call's mask (bool or additive), masked entries ``-inf``.

    Each term's masked entries are found in its own dtype (a float16 mask's ``-65504`` plus a bias
    must not become a finite bias), then :func:`attnstats.capture.record.normalize_mask` splits the
    result back into the record's bool mask and finite float32 bias.
    """
    bias = bias.detach()
    blocked = _masked(bias)
    total = bias.to(torch.float32)
    if mask is not None:
        mask = mask.detach()
        blocked = blocked | _masked(mask)
        if mask.dtype != torch.bool:
            total = total + mask.to(torch.float32)
    return total.masked_fill(blocked, float("-inf"))


def _sink_logits(sinks: torch.Tensor, name: str, b: int, h: int, nq: int) -> torch.Tensor:
    """Sink logits as ``[B|1, H|1, Nq|1]``: per head ``[H]`` (``s_aux``, ``module.sinks``) or per row
    ``[B, H, Nq, 1]`` (the ``sinks=`` argument: one logit per query, concatenated as the last column)."""
    s = sinks.detach()
    if s.dim() == 1:
        s = s.reshape(1, -1, 1)
    elif s.dim() == 4 and s.shape[-1] == 1:
        s = s[..., 0]
    if s.dim() != 3 or any(n not in (1, full) for n, full in zip(s.shape, (b, h, nq))):
        raise ValueError(
            f"record(): {name}: attention sinks of shape {tuple(sinks.shape)} do not fit [B={b}, H={h}, Nq={nq}]; "
            f"expected [H] (one logit per head) or [B, H, Nq, 1] (one per query row)"
        )
    return s


def sdpa_layout(function_call, query: torch.Tensor, key: torch.Tensor, attn_mask):
    """An SDPA call inside a transformers attention function, in the function's ``[B, H, Nq, d]`` layout.

    ``function_call`` is the recorder's :class:`FunctionCall` running around the SDPA call. When SDPA got
    the query the function received, everything is returned unchanged. transformers' grouped-query
    decode step (one query token, a mask, ``n_rep = H/Hkv`` query heads per key head; its
    ``sdpa_attention_forward``) calls SDPA with the query packed as ``[B, Hkv, n_rep, d]``
    and the mask as ``[B|1, Hkv|1, n_rep|1, Nk]``: the query is then the function's own ``[B, H, 1, d]``
    and the mask is unpacked to ``[B|1, H|1, 1, Nk]`` (key ``[B, Hkv, Nk, d]`` unchanged; the recorder
    repeats its heads as ``repeat_kv`` does: query head ``h`` uses key head ``h // n_rep``).

    Returns:
        ``(query, key, attn_mask)``.

    Raises:
        ValueError: SDPA got a query that is neither the function's nor its packed form (the layout
            cannot be decided), naming the module.
    """
    origin = next((o for o in reversed(_origins()) if any(c is function_call for c in o.calls)), None)
    if origin is None or not isinstance(origin.query, torch.Tensor) or query.shape == origin.query.shape:
        return query, key, attn_mask
    oq = origin.query
    packed = (
        oq.dim() == 4 and query.dim() == 4 and key.dim() == 4 and oq.shape[2] == 1
        and query.shape[0] == oq.shape[0] and query.shape[3] == oq.shape[3]
        and query.shape[1] * query.shape[2] == oq.shape[1] and key.shape[1] == query.shape[1]
        and torch.equal(query.reshape(oq.shape), oq)
    )
    if not packed:
        raise ValueError(
            f"record(): {function_call.name}: its attention function received query {tuple(oq.shape)} "
            f"[B, H, Nq, d] but called scaled_dot_product_attention with query {tuple(query.shape)}, which is no "
            f"layout record knows how to map back to [B, H, Nq, d]; record the model with attn_implementation='eager', "
            f"or with backend='sdpa' to keep each SDPA call in the layout SDPA got"
        )
    b, h = oq.shape[0], oq.shape[1]
    if attn_mask is not None:
        m = attn_mask
        while m.dim() < 4:
            m = m.unsqueeze(0)
        if m.shape[1] != 1 or m.shape[2] != 1:  # per packed head or query row: one row per original head
            m = m.expand(m.shape[0], query.shape[1], query.shape[2], m.shape[-1]).reshape(m.shape[0], h, 1, m.shape[-1])
        attn_mask = m
    return oq, key, attn_mask


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
    if block_mask is None:
        return None
    if isinstance(block_mask, torch.Tensor):  # a float score mask: flex reads its first nk keys
        return block_mask[..., :nk]
    from torch.nn.attention.flex_attention import create_mask

    mod = block_mask.mask_mod
    return create_mask(mod, b, h, nq, nk, device=device)
