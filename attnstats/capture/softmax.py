"""The ``softmax`` backend: attention that a module computes by hand, recorded from its softmax as ``P``.

Many modeling files form the attention scores and call softmax themselves instead of calling SDPA or
transformers' attention functions: GPT-Neo, GPT-J, BLOOM (ALiBi), CodeGen, MPT, DeBERTa(-v2),
RoFormer, Falcon in eager mode, XLNet, XLM, and user code written the same way. A ``TorchFunctionMode``
open for the block sees every call of ``torch.softmax``, ``F.softmax`` and ``Tensor.softmax`` (so also
``nn.Softmax`` modules) and the operations that lead to it; the calls run unchanged and the softmax
output is copied afterwards, so the model's outputs are bit for bit those without ``record``.

**Which softmax calls are attention.** A call is recorded when all of these hold:

- its input descends from a product of two activations (``matmul``, ``@``, ``bmm``, ``baddbmm``,
  ``einsum``, no operand a parameter) through operations whose result keeps the product's last two
  axes ``(Nq, Nk)``: scaling, bias and mask additions, ``masked_fill``, ``where``, casts and views. This
  is the signature of ``q·kᵀ`` scores: a mixture-of-experts router's logits, a loss head's logits or a
  spline's bins come from a linear layer's weight and are not recorded;
- it runs over the last axis of a 4-D ``[B, H, Nq, Nk]`` or 3-D ``[B·H, Nq, Nk]`` tensor (GroupViT's
  assignment over ``dim=-2``, ConvBERT's span kernel over ``dim=1`` and 2-D routers are not attention);
- no other backend records it: it does not run inside a transformers attention function that the
  ``hf`` backend wraps (that backend records the call with its q and k), nor inside a module claimed by
  the ``module`` backend (``modules=``); ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``
  run with the capture modes taken off the stack (their fast paths) and belong to the ``mha`` backend.
  The call is handed to the recorder when the module's forward ends, and dropped if another backend
  captured that module in the same forward: SAM2's multi-scale attention computes a softmax it never uses
  (over heads, per token) next to the attention it hands to transformers' registry.

The record is named after the innermost module that holds both the product and the softmax: an
``nn.Softmax`` child, a child doing the matmul (SqueezeBERT's ``MatMulWrapper``) or a helper function
does not change the name.

**What a record holds.** The module's own ``P``, exactly: the softmax output before dropout, kept as
a float32 copy ``[B, H, Nq, Nk]`` in :attr:`AttentionRecord.p` (q = k = None: a *P-only* record;
``scale`` is NaN, unknown). Scaling, biases (ALiBi, relative positions, DeBERTa's disentangled terms)
and softcapping are inside ``P``; they cannot be told apart and are not kept separately. The mask is
read from the scores the softmax received: an entry is masked where its score is at most
:data:`MASKED_SCORE` (``-1e4``, ``-inf`` included). Every convention in use is at or below it:
``finfo.min`` (``masked_fill``, additive masks, ``where``), CodeGen's ``finfo.min/√d`` (the mask is
added before the scaling), XLNet's ``-1e30``, OpenAI-GPT's ``-1e4``; a genuine score that low has a
probability below ``e^-10⁴`` of the row's largest one, which is 0 in every float dtype. Causality
and key padding are recovered from that mask's pattern (:func:`attnstats.capture.record.normalize_mask`).
Pad tokens as queries: when the model's forward received a 2-D ``attention_mask [B, N]`` (1 = token,
0 = padding), a self-attention layer over those ``N`` tokens whose mask shows that padding (no real
token attends a pad key, and some pad key is masked where causality would allow it) has the rows of
the pad tokens masked too, so that they are absent from the statistics as in the other backends
(XLNet lets pad tokens attend themselves).

**Layout.** A 4-D input is ``[B, H, Nq, Nk]``. A 3-D ``[B·H, Nq, Nk]`` one is split with the head count
of the module that computed the product (its ``num_heads``, ``num_attention_heads``, ``n_heads``,
``n_head`` or ``num_attn_heads`` attribute). Where the head count is needed but missing, or where the
module's head count contradicts the 4-D layout (heads on axis 2), the call is not recorded and one
warning names the module and what was missing: never a matrix in a layout that was guessed.

**What P cannot give.** Everything attnstats derives from q and k: the temperature
(``sigma_q``, ``sigma_k``), :meth:`AttentionRecord.scores`, kernels alongside. The statistics of
:meth:`Recorder.frame` (entropy, spectral gap, log-normal fit, moments) come from ``P`` itself. Memory:
a P-only record holds ``B·H·Nq·Nk`` float32 numbers (the model built the same matrix); with
``store="stats"`` the statistics are computed from ``P`` during the forward and ``P`` is not kept.
"""
from __future__ import annotations

import contextlib
import inspect
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .record import normalize_mask, valid_tokens
from .sdpa import _SDPA, CaptureMode
from .threads import compiling

__all__ = ["SoftmaxMode", "install_softmax", "MASKED_SCORE"]

# A score at or below this (also -inf) is a mask value, not a score: see the module docstring.
MASKED_SCORE = -1e4

_SOFTMAX = frozenset({torch.softmax, F.softmax, torch.Tensor.softmax, torch.special.softmax})
_BADDBMM = frozenset({torch.baddbmm, torch.Tensor.baddbmm})
_PRODUCTS = frozenset(
    {
        torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__,
        torch.bmm, torch.Tensor.bmm, torch.einsum, *_BADDBMM,
    }
)
_HEAD_ATTRIBUTES = ("num_heads", "num_attention_heads", "n_heads", "n_head", "num_attn_heads")


class _Scores:
    """What a score tensor descends from: the product's last two axes and the module that computed it."""

    __slots__ = ("nq", "nk", "owner")

    def __init__(self, nq: int, nk: int, owner: str):
        self.nq, self.nk, self.owner = nq, nk, owner


def _is_weight(t: torch.Tensor) -> bool:
    """A parameter, or a view of one (``weight.T``): the operand of a linear layer, not an activation."""
    while t is not None:
        if isinstance(t, nn.Parameter):
            return True
        t = t._base
    return False


def _operands(func, args, kwargs) -> list:
    if func is torch.einsum:
        ops = list(args[1:])
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            ops = list(ops[0])
        return ops
    if func in _BADDBMM:  # baddbmm(input, batch1, batch2): input is the added term (ALiBi in BLOOM)
        return [args[1] if len(args) > 1 else kwargs.get("batch1"), args[2] if len(args) > 2 else kwargs.get("batch2")]
    return [args[0] if args else kwargs.get("input"), args[1] if len(args) > 1 else kwargs.get("other", kwargs.get("mat2"))]


def _softmax_dim(x: torch.Tensor, args, kwargs):
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    if dim is None:  # F.softmax's implicit dim (deprecated): 0 for 0-, 1- and 3-D inputs, else 1
        dim = 0 if x.dim() in (0, 1, 3) else 1
    return dim


class SoftmaxMode(CaptureMode):
    """Torch-function mode that hands each softmax over attention scores of the recorded block to its recorder.

    A :class:`attnstats.capture.sdpa.CaptureMode`, so that the fast-path guards of ``nn.MultiheadAttention``
    and ``nn.TransformerEncoderLayer`` take it off the mode stack as they take the ``sdpa`` mode. With
    ``sdpa=True`` it also does that mode's work (the SDPA calls), so a block runs one mode, not two.
    """

    def __init__(self, recorder, sdpa: bool = False):
        super().__init__(recorder)
        self.sdpa = sdpa
        self._scores: dict[int, tuple] = {}  # id(tensor) -> (weakref, _Scores): live score tensors
        self._modules = {name: m for m in recorder.modules if (name := recorder.module_name(m)) is not None}
        self._warned: set[str] = set()
        # (module path, P, attend, None) or (module path, None, None, why the layout is unknown) of the
        # softmax calls whose module still runs
        self.pending: list[tuple] = []
        self.input_padding: torch.Tensor | None = None  # bool [B, N], True = pad, of the running model forward

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # Every torch call of the forward passes here: the common case (no product, softmax or SDPA,
        # no score tensor alive) does nothing but the call, and asks dynamo nothing (it is traced as is).
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is _SDPA:
            if self.sdpa and not compiling():
                self._capture(args, kwargs)
        elif func in _PRODUCTS:
            if not compiling():
                self._product(func, args, kwargs, out)
        elif func in _SOFTMAX:
            if not compiling():
                self._softmax(args, kwargs, out)
        elif self._scores and not compiling():
            self._follow(args, kwargs, out)
        return out

    # ----- score tensors: which tensors descend from a product of two activations ----------------
    def _info(self, t) -> _Scores | None:
        entry = self._scores.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else None

    def _mark(self, t: torch.Tensor, info: _Scores) -> None:
        key = id(t)
        if self._info(t) is not None:
            return

        def forget(ref, key=key):  # the tensor is freed: its id may be reused
            entry = self._scores.get(key)
            if entry is not None and entry[0] is ref:
                del self._scores[key]

        self._scores[key] = (weakref.ref(t, forget), info)

    def _product(self, func, args, kwargs, out) -> None:
        if not isinstance(out, torch.Tensor) or out.dim() < 3 or not out.is_floating_point():
            return
        rec = self.recorder
        if not rec.is_recording():
            return
        ops = [t for t in _operands(func, args, kwargs) if isinstance(t, torch.Tensor)]
        if len(ops) < 2 or any(_is_weight(t) for t in ops):
            return
        self._mark(out, _Scores(out.shape[-2], out.shape[-1], rec.current_module()))

    def _follow(self, args, kwargs, out) -> None:
        """A result that keeps the last two axes of a score tensor among the arguments is one too."""
        if not isinstance(out, torch.Tensor) or out.dim() < 3:
            return
        for a in (*args, *kwargs.values()):
            items = a if isinstance(a, (list, tuple)) else (a,)
            for t in items:
                info = self._info(t) if isinstance(t, torch.Tensor) else None
                if info is not None:
                    if out.shape[-2] == info.nq and out.shape[-1] == info.nk:
                        self._mark(out, info)
                    return

    # ----- the softmax --------------------------------------------------------------------------
    def _softmax(self, args, kwargs, out) -> None:
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor):
            return
        info = self._info(x)
        if info is None or not out.is_floating_point():
            return
        dim = _softmax_dim(x, args, kwargs)
        if dim % x.dim() != x.dim() - 1:
            return
        rec = self.recorder
        if not rec.is_recording() or rec.in_owned_module() or rec.current_function_call() is not None:
            return
        # the attention module: the one holding both the product and the softmax (an nn.Softmax child,
        # or a child that does the matmul, as SqueezeBERT's MatMulWrapper, is part of it)
        owner = _common_module(info.owner, rec.current_module())
        with torch._C.DisableTorchFunction(), torch.no_grad():  # our own tensor work is no call of the model
            layout = self._layout(x, owner, info.owner)
            if isinstance(layout, str):
                self.pending.append((owner, None, None, layout))
                return
            b, h = layout
            nq, nk = x.shape[-2:]
            p = out.detach().reshape(b, h, nq, nk)
            scores = x.detach().reshape(b, h, nq, nk)
            attend = ~(scores <= MASKED_SCORE)  # NaN scores stay entries: a NaN in P is shown, not hidden
            attend = self._without_pad_queries(attend)
            self.pending.append((owner, p.clone(), attend, None))  # a copy: the model may change P in place later

    def flush(self, name: str | None = None) -> None:
        """Hand over the pending calls of module ``name`` (all with None), whose forward has ended.

        A module that another backend captured in the same forward (:meth:`Recorder.calls_in_forward`
        counts those calls; ours are handed over only here) is not recorded a second time, nor warned about.
        """
        rec = self.recorder
        done = [c for c in self.pending if name is None or c[0] == name]
        if not done:
            return
        self.pending = [c for c in self.pending if not (name is None or c[0] == name)]
        if rec.calls_in_forward(done[0][0]) > 0 and name is not None:
            return
        with torch._C.DisableTorchFunction(), torch.no_grad():
            for owner, p, attend, unknown in done:
                if unknown is not None:
                    self._warn(owner, unknown)
                else:
                    rec.capture_probs(owner, p, attend, backend="softmax")

    def _heads(self, *names: str) -> int | None:
        """The head count attribute of the first of the modules ``names`` that has one, else None."""
        for name in names:
            module = self._modules.get(name)
            for attr in _HEAD_ATTRIBUTES:
                value = getattr(module, attr, None)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    return value
        return None

    def _layout(self, x: torch.Tensor, owner: str, product: str):
        """``(B, H)`` of the score tensor ``x``, or a str saying why its layout cannot be decided."""
        if x.dim() not in (3, 4):
            return (f"scores of shape {tuple(x.shape)} are neither [B, H, Nq, Nk] nor [B·H, Nq, Nk] "
                    "(blocked, windowed or n-gram attention)")
        heads = self._heads(owner, product)
        if x.dim() == 4:
            if heads is not None and x.shape[1] != heads and x.shape[2] == heads:
                return f"scores of shape {tuple(x.shape)} have the module's {heads} heads on axis 2, not axis 1 ([B, H, Nq, Nk])"
            return x.shape[0], x.shape[1]
        if heads is None:
            return (f"scores of shape {tuple(x.shape)} are [B·H, Nq, Nk], but the module has no head count "
                    f"(none of the attributes {', '.join(_HEAD_ATTRIBUTES)})")
        if x.shape[0] % heads:
            return f"scores of shape {tuple(x.shape)} are not [B·H, Nq, Nk] with the module's {heads} heads"
        return x.shape[0] // heads, heads

    def _warn(self, owner: str, what: str) -> None:
        if owner in self._warned:
            return
        self._warned.add(owner)
        warnings.warn(
            f"record(): module {owner!r} computes a softmax over attention scores, but its layout cannot be decided: "
            f"{what}. It is not recorded; pass capture=fn(module, args, kwargs, output) for it (the 'module' backend)",
            stacklevel=2,
        )

    def _without_pad_queries(self, attend: torch.Tensor) -> torch.Tensor:
        """``attend [B, H, N, N]`` with the rows of the model's pad tokens masked, where the layer shows that padding."""
        pad = self.input_padding
        b, h, nq, nk = attend.shape
        if pad is None or nq != nk or tuple(pad.shape) != (b, nk) or not bool(pad.any()):
            return attend
        pad = pad.to(attend.device)
        pad_q, pad_k = pad[:, None, :, None], pad[:, None, None, :]
        if bool((attend & ~pad_q & pad_k).any()):
            return attend  # a real token attends a pad key: these are not the model's input tokens
        mask, _, causal = normalize_mask(attend, False, nq, nk)
        if not bool((valid_tokens(mask, causal, attend.shape, attend.device)[0] & pad[:, None, :]).any()):
            return attend  # the pad rows are absent already (no valid key, or key padding in self-attention)
        allowed = torch.ones((nq, nk), dtype=torch.bool, device=attend.device).tril()
        if not bool((~attend & pad_k & allowed).any()):
            return attend  # nothing here shows the padding (e.g. causal attention over other tokens)
        return attend & ~pad_q


def _common_module(a: str, b: str) -> str:
    """The path of the innermost module holding both module paths ``a`` and ``b`` (``""``: the model)."""
    common = []
    for x, y in zip(a.split(".") if a else [], b.split(".") if b else []):
        if x != y:
            break
        common.append(x)
    return ".".join(common)


_SIGNATURES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # forward function -> _positional(...)


def _positional(forward) -> tuple[int | None, int]:
    """``(i, k)`` for the bound method ``forward``: ``attention_mask`` is its positional argument ``i`` (None
    if it cannot be passed by position), and it takes at most ``k`` positional arguments (a large number
    with ``*args``). Read once per method function, from the bound method's signature (``self`` left out,
    a wrapper's ``__wrapped__`` followed), as binding the call to it would read them."""
    function = forward.__func__
    if function in _SIGNATURES:
        return _SIGNATURES[function]
    try:
        params = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        params = None
    position, count = None, 0
    for prm in params or ():
        if prm.kind == prm.VAR_POSITIONAL:
            count = 1 << 30
            break
        if prm.kind not in (prm.POSITIONAL_ONLY, prm.POSITIONAL_OR_KEYWORD):
            break
        if prm.name == "attention_mask":
            position = count
        count += 1
    _SIGNATURES[function] = (position, count)
    return position, count


def _input_padding(model: nn.Module, args, kwargs) -> torch.Tensor | None:
    """The model call's 2-D ``attention_mask`` (1 = token, 0 = padding) as bool ``[B, N]``, True = pad; else None."""
    mask = kwargs.get("attention_mask")
    if mask is None and args:
        forward = model.forward
        if getattr(forward, "__func__", None) is not None and getattr(forward, "__self__", None) is model:
            i, most = _positional(forward)  # a method bound to the model: its signature read once
            mask = args[i] if i is not None and i < len(args) <= most else None  # else the call cannot bind
        else:  # an instance-level forward: read its own signature
            try:
                mask = inspect.signature(forward).bind_partial(*args, **kwargs).arguments.get("attention_mask")
            except (TypeError, ValueError):
                mask = None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    if not bool(((mask == 0) | (mask == 1)).all()):
        return None  # not a 0/1 token mask (e.g. an additive one)
    return mask == 0


def install_softmax(recorder, stack: contextlib.ExitStack, sdpa: bool = False) -> None:
    """Enter a :class:`SoftmaxMode` for the block (with ``sdpa``, it also captures the SDPA calls, in place
    of a second mode), and read each model call's 2-D ``attention_mask``."""
    mode = SoftmaxMode(recorder, sdpa=sdpa)
    model = recorder.model

    def ended(name):
        if mode.pending:
            mode.flush(name)

    # A softmax's record is named after a module on the recorder's module stack (never an attention-free
    # torch.nn leaf): the stack's own hooks say when that module's forward ends
    recorder.on_module_end(ended)
    if id(model) not in recorder.hook_free:
        saved: list = []

        def pre(module, args, kwargs):
            if compiling() or not recorder.is_recording():
                return None
            saved.append(mode.input_padding)
            mode.input_padding = _input_padding(module, args, kwargs)
            return None

        def post(module, args, kwargs, output):
            if compiling() or not recorder.is_recording() or not saved:
                return None
            mode.input_padding = saved.pop()
            return None

        stack.callback(model.register_forward_pre_hook(pre, with_kwargs=True).remove)
        stack.callback(model.register_forward_hook(post, with_kwargs=True, always_call=True).remove)
    stack.enter_context(mode)
    stack.callback(mode.flush)  # first on exit: what a forward left pending (none when every module ended)
