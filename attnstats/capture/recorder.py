"""``attnstats.record``: capture every attention call of a model inside a ``with`` block.

One :class:`Recorder` drives several backends (one module each, see :mod:`attnstats.capture`):
``sdpa`` (a ``TorchFunctionMode`` over ``F.scaled_dot_product_attention``), ``hf`` (transformers'
attention-function registry and each model file's ``eager_attention_forward``), ``mha``
(``nn.MultiheadAttention``, fast path included), ``module`` (a user function on module outputs) and
``softmax`` (attention a module computes by hand, recorded from its softmax as P only).
The recorder owns what they share: the stack of module paths that names each call, the layer numbering,
the ``layers=`` selection, and the copy of q and k into an :class:`AttentionRecord`.

How a backend hands a call to the recorder: ``Recorder.__enter__`` calls the backend's ``install_*(recorder,
stack, ...)``, which puts its hooks, modes or patches in place and registers their removal on ``stack``.
When an attention call runs, the backend checks :meth:`Recorder.is_recording` (the block is open and the
calling thread opened it), names the call with :meth:`Recorder.module_name` (the attention module) or
:meth:`Recorder.current_module` (the innermost module running), and passes the call's arguments, q and k
as the attention function received them, to :meth:`Recorder.capture`, which applies ``layers=``, copies
q and k and appends the :class:`AttentionRecord` (a backend that sees only the probabilities, ``softmax``,
passes them to :meth:`Recorder.capture_probs` instead). Backends read ``model``, ``backends``,
``stats_metrics``, ``modules`` (the model's modules, walked once per block) and ``hook_free`` and nothing
private; a backend that must know when a module's forward ends registers with :meth:`Recorder.on_module_end`
rather than hooking every module again; what they must tell each other goes through the recorder:

- a backend that captures some modules itself (``module`` with ``modules=``) claims them with
  :meth:`Recorder.own_module`; the ``sdpa`` backend skips SDPA calls made while
  :meth:`Recorder.in_owned_module` is true, so no call is captured twice;
- the ``hf`` backend wraps each transformers attention function call in :meth:`Recorder.function_call`;
  an SDPA call inside it (:meth:`Recorder.current_function_call`) is named after that module and marks
  it captured, else ``hf`` captures the call from the function's own arguments afterwards;
- the ``softmax`` backend skips softmax calls made inside a transformers attention function call or an
  owned module, which the ``hf`` and ``module`` backends capture with their q and k, and hands its calls
  over when the module's forward ends, unless another backend captured the module in that forward
  (:meth:`Recorder.calls_in_forward`);
- the ``mha`` backend keeps the key-padding mask of each running ``nn.TransformerEncoder``
  (:meth:`Recorder.push_encoder_padding`, :meth:`Recorder.pop_encoder_padding`) for its layers, which
  may get a nested tensor without one (:meth:`Recorder.encoder_padding`).

Nothing that the model computes is changed: the backends read the arguments of the attention call
and pass them on untouched; every hook, mode and patch is removed when the block exits, also when the
forward raises.

Threads: a block records only the calls made in the thread that opened it. Other threads may run the
same model or others meanwhile, with or without blocks of their own; their calls pass through
unrecorded and unchanged. Global patches are shared and counted (:mod:`attnstats.capture.threads`), so
blocks in different threads may end in any order and leave the original functions in place.

``torch.compile``: a compiled module (``torch.compile(model)`` or ``model.compile()``) is refused with a
TypeError (a ValueError for a compiled submodule): its graphs do not call the Python functions and hooks
that record reads, and running it uncompiled instead could change its output in the last bits. Record
the uncompiled module (``compiled._orig_mod``). A compiled wrapper of the recorded model called inside
the block runs unchanged, since every hook and wrapper does nothing while dynamo traces, but its
attention is not recorded reliably (nothing, or SDPA calls without module names, by compile backend).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import inspect
import re
import sys
import threading
import warnings
from typing import Iterator

import torch
from torch import nn

from .. import cuda_graphs
from .record import AttentionRecord, expand_kv_heads, normalize_mask, to_4d, valid_tokens
from .threads import compiling, enter_thread, leave_thread

__all__ = ["record", "Recorder", "NothingCapturedWarning", "BACKENDS", "head_sigmas"]

BACKENDS = ("sdpa", "hf", "mha", "module", "softmax")
STORES = ("qk", "stats")


class NothingCapturedWarning(UserWarning):
    """A ``record()`` block ended without capturing any attention call."""


@dataclasses.dataclass(eq=False)
class FunctionCall:
    """A transformers attention function call in progress (:meth:`Recorder.function_call`).

    Attributes:
        name: path of the attention module that called the function.
        captured: set once an SDPA call inside it has been captured under ``name``.
    """

    name: str
    captured: bool = False


def _check_not_compiled(named: list) -> None:
    """Refuse compiled modules among ``named`` (the model's ``named_modules``, the model first): their graphs
    never call the hooks and functions the backends read."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # not imported: nothing can be compiled
    optimized = getattr(eval_frame, "OptimizedModule", None)
    for name, module in named:
        wrapped = optimized is not None and isinstance(module, optimized)
        if not wrapped and getattr(module, "_compiled_call_impl", None) is None:
            continue
        how = "torch.compile(...)" if wrapped else "nn.Module.compile()"
        fix = "the module it wraps (._orig_mod)" if wrapped else "a copy that was not compiled"
        if not name:
            raise TypeError(
                f"model: a module compiled with {how} cannot be recorded (its compiled graph bypasses the attention "
                f"functions record reads); record and call {fix} instead"
            )
        raise ValueError(
            f"model: its submodule {name!r} is compiled with {how}, which record cannot see into (the compiled "
            f"graph bypasses the attention functions record reads); use {fix} there while recording"
        )


def _selector(layers):
    """``layers=`` as a predicate ``(name, layer) -> bool``."""
    if layers is None:
        return lambda name, layer: True
    items = list(layers) if isinstance(layers, (list, tuple, set, frozenset)) else [layers]
    for i, item in enumerate(items):
        if isinstance(item, bool) or not isinstance(item, (int, str, re.Pattern)):
            raise TypeError(
                f"layers[{i}]: expected an int layer index, a str glob over module paths or a compiled regex, "
                f"got {type(item).__name__}"
            )
        if isinstance(item, int) and item < 0:
            raise ValueError(f"layers[{i}]: expected a layer index >= 0, got {item}")

    def select(name: str, layer: int) -> bool:
        for item in items:
            if isinstance(item, int) and item == layer:
                return True
            if isinstance(item, str) and fnmatch.fnmatchcase(name, item):
                return True
            if isinstance(item, re.Pattern) and item.search(name):
                return True
        return False

    return select


def head_sigmas(q: torch.Tensor, k: torch.Tensor, mask, is_causal: bool):
    """Standard deviations ``(sigma_q, sigma_k)``, each ``[B, H]`` float64, of the valid q and k entries.

    ``q: [B, H, Nq, d]``, ``k: [B, H, Nk, d]`` (without a mask also ``[B, H/g, Nk, d]``, grouped key heads,
    whose σ is then repeated to their query heads); valid tokens as :func:`attnstats.capture.record.valid_tokens`
    (pad tokens left out). Unbiased (``torch.std``) convention. The temperature of docs/theory.md §1 is
    ``1/(sigma_q·sigma_k)``.
    """
    b = max(q.shape[0], k.shape[0])
    if mask is None:  # every token valid (causal rows all have a key): no mask to weigh by
        def both(q, k):
            return _std(q), _std(k).repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # one per query head

        sigma_q, sigma_k = cuda_graphs.SHARED(("head_sigmas",), both, q, k)  # on a GPU: one replay per layer
        return sigma_q.expand(b, q.shape[1]), sigma_k.expand(b, q.shape[1])
    qv, kv = valid_tokens(mask, is_causal, (b, q.shape[1], q.shape[2], k.shape[2]), q.device)
    return _masked_std(q.expand(b, *q.shape[1:]), qv), _masked_std(k.expand(b, *k.shape[1:]), kv)


def _std(x: torch.Tensor) -> torch.Tensor:
    """``[B, H]`` unbiased std of ``x: [B, H, N, d]`` over ``N·d``, accumulated in float64 without a
    float64 copy of ``x`` on a GPU (at N = 32k, 32 heads of 64, that copy alone would be 0.5 GiB per
    tensor, and torch's float64 reductions of a half tensor make one: 2 ms per layer on an H100)."""
    from ..stats import online_triton

    n = x.shape[-2] * x.shape[-1]
    if x.is_cuda and online_triton.available():  # one pass; torch's float64 reductions cast x first
        s1, s2 = online_triton.head_sums(x).unbind(-1)  # [B, H] each: Σ x, Σ x²
        mean, sq = s1 / n, s2
    else:
        mean = torch.sum(x, (-2, -1), dtype=torch.float64) / n  # [B, H]
        sq = torch.linalg.vector_norm(x, 2, (-2, -1), dtype=torch.float64) ** 2  # [B, H] Σ x²
    # Σ(x − mean)² = Σx² − n·mean², in float64: exact enough unless |mean| ≫ std by ~1e7
    return torch.sqrt((sq - n * mean * mean).clamp_min(0.0) / (n - 1))


def _masked_std(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    x = x.to(torch.float64)
    w = valid.to(torch.float64)[..., None]
    n = w.sum((-2, -1)) * x.shape[-1]
    mean = (x * w).sum((-2, -1)) / n
    ss = (((x - mean[..., None, None]) ** 2) * w).sum((-2, -1))
    return torch.sqrt(ss / (n - 1))


def _remove_all(handles: list) -> None:
    """Remove every hook handle in ``handles``, also when one removal raises (the first error is re-raised)."""
    error = None
    for handle in handles:
        try:
            handle.remove()
        except BaseException as e:  # noqa: BLE001 - the others must still go
            error = error or e
    handles.clear()
    if error is not None:
        raise error


def _attention_free_leaf(module: nn.Module) -> bool:
    """True for a module of torch.nn itself with no children (Linear, Embedding, LayerNorm, Dropout,
    activations, convolutions …): no attention runs inside it, so the module stack needs no hook on it.

    Hooks turn a module call into PyTorch's slow path; leaving them off these, which are most of a
    transformer's modules, halves what the stack costs per forward. A leaf class of any other package
    keeps its hooks: it may compute attention itself.
    """
    return type(module).__module__.startswith("torch.nn.modules.") and next(module.children(), None) is None


class Recorder:
    """Capture the attention of ``model``: ``with attnstats.record(model) as rec: model(**inputs)``.

    ``attnstats.record(model, ...)`` is ``Recorder(model, ...)``. The recorder is a context manager;
    ``rec.records`` lists the captured calls (:class:`AttentionRecord`), in call order, and
    :meth:`frame` tabulates their statistics.

    Args:
        model: any ``nn.Module`` that is not compiled (a ``torch.compile`` module is refused with a
            TypeError: pass the uncompiled module, ``compiled._orig_mod``). The block records the calls
            made in the thread that opened it only.
        layers: which attention modules to keep (others are seen but not copied): None for all; an int
            (layer index, in the order the attention modules are first called), a ``str`` glob over the
            module path (``"encoder.layer.*.attention.self"``), a compiled regex, or a list of these.
        backend: ``"auto"`` (``sdpa`` always; ``hf`` for transformers models; ``mha`` when the model has
            ``nn.MultiheadAttention`` layers; ``module`` when ``capture`` is given, else ``softmax``,
            which records attention computed by hand as P only: a capture function covers those
            modules itself) or one name / a list of names from ``"sdpa", "hf", "mha", "module", "softmax"``.
        capture: for the ``module`` backend: ``capture(module, args, kwargs, output)`` returning None
            (not an attention module) or ``(q, k, mask, causal, scale)`` with ``q: [B, H, Nq, d]``,
            ``k: [B, H|Hkv, Nk, d]``, ``mask`` None / bool (True = attend) / float additive,
            broadcastable to ``[B, H, Nq, Nk]``, ``causal`` bool, ``scale`` float or None (1/sqrt(d)).
        modules: for the ``module`` backend, which modules ``capture`` is called on: None (every module),
            a module class or tuple of classes, or a glob over module paths.
        store: ``"qk"`` keeps detached copies of q and k (``probs()`` works; a P-only record of the
            ``softmax`` backend keeps its ``[B, H, Nq, Nk]`` P instead); ``"stats"`` computes the
            streaming statistics during the forward pass and keeps no q, k (O(N) memory per layer; for
            a P-only record, the dense statistics of its P, which is not kept).
        alongside: kernel names (``"lln"``, ``"relu"``, …, see :func:`attnstats.kernels.get_kernel`) or
            kernel objects evaluated on every captured q, k; :meth:`frame` then has a ``kernel``
            column with ``"softmax"`` for the captured attention.
        metrics: with ``store="stats"``, the metric groups computed during the forward pass (default
            all of ``"entropy", "spectral_gap", "lognormal", "moments"``; ``"temperature"`` is always
            kept). The log-normal fit samples ``ln P`` per head and dominates the cost at short N.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or it is compiled (``torch.compile`` /
            ``nn.Module.compile``).
        ValueError: a submodule of ``model`` is compiled.
    """

    def __init__(
        self, model, *, layers=None, backend="auto", capture=None, modules=None, store="qk", alongside=None, metrics=None
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        # one walk of the model for everything the constructor and the first block need (a walk of a large
        # model costs as much as a short forward's hooks)
        named = list(model.named_modules(remove_duplicate=False))
        _check_not_compiled(named)
        self._names: dict[int, str] = {}
        for name, m in named:
            self._names.setdefault(id(m), name)  # a module reachable by several paths: its first, as named_modules
        self._walked: list[nn.Module] | None = [m for _, m in named]  # the first block's model.modules()
        if store not in STORES:
            raise ValueError(f"store: expected one of {STORES}, got {store!r}")
        if capture is not None and not callable(capture):
            raise TypeError(f"capture: expected a callable (module, args, kwargs, output) -> tuple, got {type(capture).__name__}")
        self.model = model
        self.store = store
        if metrics is not None and store != "stats":
            raise ValueError("metrics: chooses what store='stats' computes during the forward; with store='qk' pass "
                             "metrics to rec.frame(metrics=...) instead")
        from ..metrics import check_metrics

        self.stats_metrics = check_metrics(
            metrics if metrics is not None else ("entropy", "spectral_gap", "lognormal", "moments", "sinks"))
        self.records: list[AttentionRecord] = []
        self._select = _selector(layers)
        self._capture_fn = capture
        self._modules_filter = modules
        self.backends = self._choose_backends(backend, capture, self._walked)
        from .alongside import resolve_kernels

        self.kernels = resolve_kernels(alongside)
        if self.kernels and store == "stats":
            raise ValueError(
                "alongside: kernels run on the captured q, k, which store='stats' does not keep; use store='qk'"
            )
        self.modules: list[nn.Module] = []  # while the block is open: the model's modules, each once
        self.hook_free: set[int] = set()  # while the block is open: ids of the modules that must carry no hook
        self._module_end: list = []  # on_module_end's functions
        self._hooked: list[nn.Module] = []
        self._layer_of: dict[str, int] = {}
        self._stack: list[str] = []
        self._calls_in_forward: dict[str, int] = {}
        self._function_calls: list[FunctionCall] = []  # transformers attention function calls in progress
        self._owned: set[int] = set()  # ids of modules a backend captures itself (sdpa calls inside are skipped)
        self._owned_depth = 0
        self._encoder_padding: list = []  # src_key_padding_mask of each nn.TransformerEncoder running
        self._exit_stack: contextlib.ExitStack | None = None
        self._active = False
        self._owner: int | None = None  # threading.get_ident() of the thread whose calls are recorded
        self._thread_list: list | None = None

    # ----- backends -----------------------------------------------------------------------------
    def _choose_backends(self, backend, capture, modules) -> tuple[str, ...]:
        if backend == "auto":
            chosen = ["sdpa"]
            if any(type(m).__module__.startswith("transformers.") for m in modules):
                chosen.append("hf")
            if any(isinstance(m, nn.MultiheadAttention) for m in modules):
                chosen.append("mha")
            # a capture function describes the hand-written attention itself: softmax would record it again
            chosen.append("module" if capture is not None else "softmax")
            return tuple(chosen)
        names = [backend] if isinstance(backend, str) else list(backend)
        for i, name in enumerate(names):
            if name not in BACKENDS:
                raise ValueError(f"backend[{i}]: expected 'auto' or one of {BACKENDS}, got {name!r}")
        if "module" in names and capture is None:
            raise ValueError("capture: the 'module' backend needs capture=fn(module, args, kwargs, output)")
        if not names:
            raise ValueError("backend: expected 'auto' or at least one backend name, got an empty list")
        return tuple(dict.fromkeys(names))

    def __enter__(self) -> "Recorder":
        if self._active:
            raise RuntimeError("record(): this recorder is already active; create a new one with attnstats.record(model)")
        self.records = []
        self._layer_of = {}
        self._stack = []
        self._encoder_padding = []
        self._owned, self._owned_depth = set(), 0
        self._owner = threading.get_ident()
        from .mha import hook_free_modules

        # one walk of the model for every backend (a large model has thousands of modules); the first
        # block reuses the constructor's
        walked, self._walked = self._walked, None
        self.modules = list(dict.fromkeys(walked if walked is not None else self.model.modules()))
        self.hook_free = hook_free_modules(self.modules)  # a hook there would turn the encoder fast path off
        # the modules that carry the module stack's hooks (the others cannot run attention, or must stay hook-free)
        self._hooked = [m for m in self.modules if id(m) not in self.hook_free and not _attention_free_leaf(m)]
        self._module_end: list = []
        stack = contextlib.ExitStack()
        try:
            self._install_module_starts(stack)
            from .mha import install_fast_path_guards

            # also without the mha backend: a capture mode would turn the MHA / encoder fast paths off
            install_fast_path_guards(self, stack)
            if "module" in self.backends:
                from .module import install_module_capture

                install_module_capture(self, stack, self._capture_fn, self._modules_filter)
            if "hf" in self.backends:
                from .hf import install_hf

                install_hf(self, stack)
            sdpa = "sdpa" in self.backends or "hf" in self.backends
            if "softmax" in self.backends:  # one torch-function mode for both: each mode costs every torch call
                from .softmax import install_softmax

                install_softmax(self, stack, sdpa=sdpa)
            elif sdpa:
                from .sdpa import install_sdpa

                install_sdpa(self, stack)
            self._install_module_ends(stack)
        except BaseException:
            stack.close()
            raise
        self._exit_stack = stack
        self._active = True
        self._thread_list = enter_thread(self)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        leave_thread(self._thread_list, self)
        self._active = False
        stack, self._exit_stack, self._thread_list = self._exit_stack, None, None
        self._stack = []
        self._function_calls = []
        self._encoder_padding = []
        stack.close()
        self._owned, self._owned_depth = set(), 0
        self.modules, self.hook_free, self._hooked, self._module_end = [], set(), [], []
        if exc_type is None and not self.records:
            warnings.warn(self._nothing_message(), NothingCapturedWarning, stacklevel=2)
        if exc_type is None:  # the hooks are gone: what store="stats" left for after the forward
            from .stats_store import finish_pending

            finish_pending(self.records)
        return False

    def _nothing_message(self) -> str:
        tried = {
            "sdpa": "sdpa (calls of F.scaled_dot_product_attention)",
            "hf": "hf (transformers attention functions)",
            "mha": "mha (nn.MultiheadAttention modules)",
            "module": "module (your capture function)",
            "softmax": "softmax (softmax over q·k scores computed by hand)",
        }
        names = ", ".join(tried[b] for b in self.backends)
        sel = "" if not self._layer_of else f" ({len(self._layer_of)} attention modules were seen but none matched layers=)"
        return (
            f"record(): no attention was captured from {type(self.model).__name__}{sel}. Backends tried: {names}. "
            f"If the model computes attention some other way (e.g. a softmax whose layout cannot be read), pass "
            f"capture=fn(module, args, kwargs, output) -> (q, k, mask, causal, scale) for the 'module' backend. "
            f"Only calls made in the thread that opened the block are recorded, and calls through torch.compile are not seen"
        )

    # ----- naming --------------------------------------------------------------------------------
    # The module stack: a pre-hook on each module of self._hooked pushes its path, registered before every
    # backend's hooks; one forward hook pops it and then calls on_module_end's functions, registered after
    # every backend's hooks (so that those run with the module still on the stack, and before on_module_end's).
    def _install_module_starts(self, stack: contextlib.ExitStack) -> None:
        def pre(module, args):
            if compiling() or not self.is_recording():  # dynamo tracing, or another thread's forward
                return
            name = self._names.get(id(module))
            if name is None:
                return
            self._stack.append(name)
            self._calls_in_forward[name] = 0
            if id(module) in self._owned:
                self._owned_depth += 1

        handles = []
        stack.callback(_remove_all, handles)  # one exit callback for all: a model has hundreds of modules
        for module in self._hooked:
            handles.append(module.register_forward_pre_hook(pre))

    def _install_module_ends(self, stack: contextlib.ExitStack) -> None:
        ended = self._module_end

        def post(module, args, output):
            if compiling() or not self.is_recording():
                return
            name = self._names.get(id(module))
            if name is None:
                return
            if id(module) in self._owned:
                self._owned_depth -= 1
            # pop down to this module: a forward that raised may have left inner entries behind
            while self._stack:
                if self._stack.pop() == name:
                    break
            for fn in ended:
                fn(name)

        handles = []
        stack.callback(_remove_all, handles)
        for module in self._hooked:
            handles.append(module.register_forward_hook(post, always_call=True))

    def _call_name(self, name: str) -> str:
        """``name``, suffixed ``#j`` for the j-th extra attention call in one forward of the same module."""
        count = self._calls_in_forward.get(name, 0)
        self._calls_in_forward[name] = count + 1
        return name if count == 0 else f"{name}#{count}"

    # ----- the interface of the backends (see the module docstring) ------------------------------
    def is_recording(self) -> bool:
        """True when the block is open and the calling thread is the one that opened it.

        Backends capture a call only then: other threads' calls, and calls outside the block, pass
        through unrecorded.
        """
        return self._active and self._owner == threading.get_ident()

    def module_name(self, module) -> str | None:
        """Path of ``module`` inside the recorded model (``""`` for the model itself), or None if not part of it."""
        return self._names.get(id(module))

    def current_module(self) -> str:
        """Path of the innermost module of the model whose forward is running ('' if none)."""
        return self._stack[-1] if self._stack else ""

    def calls_in_forward(self, name: str) -> int:
        """How many attention calls of module ``name`` were handed over in its current (or last) forward.

        The ``softmax`` backend reads it when a module's forward ends, so that it does not record the
        module's own softmax again when another backend captured the module in that forward.
        """
        return self._calls_in_forward.get(name, 0)

    def own_module(self, module) -> None:
        """Declare that a backend captures ``module`` itself: SDPA calls made inside its forward are skipped.

        For the rest of the block (the claim ends when it exits), :meth:`in_owned_module` is True while
        the forward of ``module`` runs, so the ``sdpa`` backend does not capture the same call twice.
        """
        self._owned.add(id(module))

    def on_module_end(self, fn) -> None:
        """Call ``fn(name)`` each time the forward of a module on the module stack ends (``name``: its path),
        while the block is open, after the forward hooks of every backend: for every module of the model
        except attention-free ``torch.nn`` leaves and the modules in :attr:`hook_free`. Call it while
        installing a backend."""
        self._module_end.append(fn)

    def in_owned_module(self) -> bool:
        """True while the forward of a module claimed with :meth:`own_module` runs in the recording thread."""
        return self._owned_depth > 0

    @contextlib.contextmanager
    def function_call(self, name: str) -> Iterator[FunctionCall]:
        """Mark a transformers attention function call of module ``name`` as running, for the ``with`` body.

        Yields its :class:`FunctionCall`; an SDPA call made inside it is named ``name`` and sets
        ``captured`` (see :meth:`current_function_call`), which tells the ``hf`` backend not to capture
        the call again from the function's arguments.
        """
        call = FunctionCall(name)
        self._function_calls.append(call)
        try:
            yield call
        finally:
            # by identity: with several recorders and nested calls, the list need not end with it
            for i in range(len(self._function_calls) - 1, -1, -1):
                if self._function_calls[i] is call:
                    del self._function_calls[i]
                    break

    def current_function_call(self) -> FunctionCall | None:
        """The innermost transformers attention function call running (:meth:`function_call`), or None."""
        return self._function_calls[-1] if self._function_calls else None

    def push_encoder_padding(self, key_padding_mask) -> None:
        """An ``nn.TransformerEncoder`` starts its forward with ``src_key_padding_mask`` (a tensor or None)."""
        self._encoder_padding.append(key_padding_mask)

    def pop_encoder_padding(self) -> None:
        """The innermost running ``nn.TransformerEncoder`` ends its forward (nothing happens if none runs)."""
        if self._encoder_padding:
            self._encoder_padding.pop()

    def encoder_padding(self):
        """``src_key_padding_mask`` of the innermost running ``nn.TransformerEncoder``, or None (also if none runs).

        Its layers may receive a nested tensor of the unpadded tokens and no mask; this is the
        ``[B, N]`` mask (bool True = pad, or float) that padded them.
        """
        return self._encoder_padding[-1] if self._encoder_padding else None

    # ----- capture -------------------------------------------------------------------------------
    def capture(
        self,
        name: str,
        q: torch.Tensor,
        k: torch.Tensor,
        attn_mask=None,
        is_causal: bool = False,
        scale: float | None = None,
        *,
        backend: str,
        enable_gqa: bool = False,
        softcap: float | None = None,
        bias: torch.Tensor | None = None,
        sinks: torch.Tensor | None = None,
    ) -> AttentionRecord | None:
        """Hand over one attention call: its :class:`AttentionRecord` is appended to ``records`` if selected.

        Backends call this once per attention call they see, from the recording thread. The arguments
        are those of ``F.scaled_dot_product_attention``, untouched.

        Args:
            name: path of the module the call belongs to; a second call of the same module in one of
                its forwards becomes ``name#1``, and so on. ``layers=`` selects on the result.
            q: ``[..., Nq, d]`` queries (missing leading dims become 1, extra ones fold into B).
            k: ``[..., Hkv, Nk, d]`` keys; ``Hkv`` key heads dividing ``H`` are repeated to ``H``.
            attn_mask: None, bool (True = attend) or float additive, broadcastable to ``[B, H, Nq, Nk]``.
            is_causal: the call's causal flag (top-left aligned, as SDPA's).
            scale: the factor applied to ``q·k``, None for ``1/sqrt(d)``.
            backend: name of the backend, kept in the record.
            enable_gqa: SDPA's flag for grouped key heads (they are repeated to ``H`` either way).
            softcap: ``s → softcap·tanh(s/softcap)`` on the scaled scores, or None.
            bias: a float additive term added to the one ``attn_mask`` holds, or None.
            sinks: attention-sink logits broadcastable to ``[B, H, Nq]`` (one extra softmax column per
                row that attends to nothing, see :attr:`AttentionRecord.sinks`), or None.

        Returns:
            The new record, or None when ``layers=`` does not select the call.
        """
        name = self._call_name(name)
        layer = self._layer_of.setdefault(name, len(self._layer_of))
        if not self._select(name, layer):
            return None
        with torch.no_grad():
            q4 = to_4d(q.detach(), "query")
            k4 = to_4d(k.detach(), "key")
            nq, nk, d = q4.shape[2], k4.shape[2], q4.shape[3]
            mask, mbias, causal = normalize_mask(attn_mask, is_causal, nq, nk)
            # Grouped key heads stay grouped where nothing needs them repeated: the statistics of an
            # unmasked call read each key head for its group (no copy of K per layer); elsewhere they
            # are repeated to one per query head.
            grouped = self.store == "stats" and mask is None and k4.shape[1] != q4.shape[1]
            if k4.shape[1] != q4.shape[1] and not grouped:
                if k4.shape[1] == 1 and not enable_gqa:
                    k4 = k4.expand(k4.shape[0], q4.shape[1], *k4.shape[2:])
                else:
                    k4 = expand_kv_heads(k4, q4.shape[1])
            elif q4.shape[1] % k4.shape[1]:
                raise ValueError(f"key: {k4.shape[1]} key/value heads do not divide the {q4.shape[1]} query heads")
            if bias is not None:
                bias = bias.detach().to(torch.float32)
                mbias = bias if mbias is None else mbias + bias
            scale = float(scale) if scale is not None else d**-0.5
            sigma_q, sigma_k = head_sigmas(q4, k4, mask, causal)
            stats = None
            if sinks is not None:
                sinks = sinks.detach().to(torch.float32).clone()
            if self.store == "stats":
                from .stats_store import capture_stats

                stats = capture_stats(self, q4, k4, mask, causal, scale, mbias, softcap, name, sinks=sinks)
                keep_q = keep_k = None
            else:
                keep_q = q4.clone()
                keep_k = k4.clone() if k4.data_ptr() == k.data_ptr() or not k4.is_contiguous() else k4
            rec = AttentionRecord(
                name=name,
                layer=layer,
                q=keep_q,
                k=keep_k,
                mask=mask,
                is_causal=causal,
                scale=scale,
                bias=mbias,
                softcap=softcap,
                backend=backend,
                call=len(self.records),
                sigma_q=sigma_q,
                sigma_k=sigma_k,
                stats=stats,
                sinks=sinks,
            )
        self.records.append(rec)
        return rec

    def capture_probs(self, name: str, p: torch.Tensor, attn_mask=None, *, backend: str) -> AttentionRecord | None:
        """Hand over one attention call known only by its probabilities: a P-only record (q = k = None).

        For backends that see the attention matrix but not the q and k it came from (``softmax``).

        Args:
            name: path of the module the call belongs to, numbered and selected as in :meth:`capture`.
            p: ``[B, H, Nq, Nk]`` float probabilities as the layer computed them (before dropout); the
                record keeps a float32 copy (:attr:`AttentionRecord.p`).
            attn_mask: None or bool, True = attend, broadcastable to ``[B, H, Nq, Nk]``: the entries the
                layer masked. Normalised like :meth:`capture`'s masks (key padding ``[B, 1, 1, Nk]``, a
                causal pattern becomes ``is_causal=True``).
            backend: name of the backend, kept in the record.

        Returns:
            The new record, or None when ``layers=`` does not select the call. With ``store="stats"``
            its statistics are computed from ``p`` now (every group of ``metrics=``; no temperature,
            which needs q and k) and ``p`` is not kept.
        """
        if not isinstance(p, torch.Tensor) or not p.is_floating_point() or p.dim() != 4:
            got = f"shape {tuple(p.shape)} {p.dtype}" if isinstance(p, torch.Tensor) else type(p).__name__
            raise ValueError(f"p: expected float probabilities [B, H, Nq, Nk], got {got}")
        if attn_mask is not None and (not isinstance(attn_mask, torch.Tensor) or attn_mask.dtype != torch.bool):
            raise TypeError(f"attn_mask: expected None or a bool tensor (True = attend), got {getattr(attn_mask, 'dtype', type(attn_mask).__name__)}")
        name = self._call_name(name)
        layer = self._layer_of.setdefault(name, len(self._layer_of))
        if not self._select(name, layer):
            return None
        with torch.no_grad():
            b, h, nq, nk = p.shape
            mask, _, causal = normalize_mask(attn_mask, False, nq, nk)
            keep = p.detach().to(dtype=torch.float32, memory_format=torch.contiguous_format, copy=True)
            fields = dict(name=name, layer=layer, q=None, k=None, mask=mask, is_causal=causal, scale=float("nan"),
                          backend=backend, call=len(self.records))
            if self.store == "stats":
                from ..metrics import record_metrics
                from .stats_store import CapturedStats

                values = record_metrics(AttentionRecord(**fields, p=keep), self.stats_metrics)
                rec = AttentionRecord(**fields, stats=CapturedStats(shape=(b, h, nq, nk), values=values))
            else:
                rec = AttentionRecord(**fields, p=keep)
        self.records.append(rec)
        return rec

    # ----- results -------------------------------------------------------------------------------
    def frame(self, metrics=("entropy", "spectral_gap", "lognormal", "moments", "temperature", "sinks"), **options):
        """Tidy long-format DataFrame of statistics of every record.

        Args:
            metrics: some of ``"entropy", "spectral_gap", "lognormal", "moments", "temperature", "sinks"``
                (``sink_mass`` only for records with sinks).
            **options: ``batch="mean" | "each"``, ``head="each" | "mean"``, ``max_samples``, ``seed``
                (of the log-normal fit); see :func:`attnstats.frame.records_frame`.

        Returns:
            Columns ``call, layer, name, head, batch, metric, value`` (``kernel`` after ``name`` when
            kernels run alongside, ``"softmax"`` for the captured attention).
        """
        if not self.records:
            raise ValueError(self._nothing_message())
        from ..frame import records_frame
        from .stats_store import finish_pending

        finish_pending(self.records)  # frame() inside the with block

        return records_frame(self.records, metrics=metrics, kernels=self.kernels, **options)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i) -> AttentionRecord:
        return self.records[i]

    def __repr__(self) -> str:
        return f"Recorder(model={type(self.model).__name__}, backends={self.backends}, records={len(self.records)})"


def record(model: nn.Module, **options) -> Recorder:
    return Recorder(model, **options)


# Recorder's docstring and signature are the one source of record's: help(attnstats.record) shows both
record.__doc__ = Recorder.__doc__
record.__signature__ = inspect.signature(Recorder).replace(return_annotation="Recorder")


