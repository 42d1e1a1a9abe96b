"""Replaying a function's device work as a CUDA graph, so that a repeated call costs one launch of host time.

At a few thousand tokens the statistics of one attention call are some twenty kernels whose host side
(Python, argument checks, launches) takes longer than the kernels themselves on many GPU hosts
(benchmarks/RESULTS.md §6). A :class:`GraphCache` runs such a function eagerly the first time it sees
a key, captures its kernels into a CUDA graph the second time, and from then on copies the inputs into
the graph's own buffers and replays it. The numbers are the eager call's, bit for bit: the same kernels
run on the same values (checked on the GPU by ``benchmarks/record_gpu.py``'s ``check`` part).

The function must be pure device work given its key: no host sync, no result read on the host, no
decision taken from a tensor's values. A capture that fails (an operation that syncs, or one CUDA
graphs do not support) is abandoned and its key runs eagerly from then on. On the CPU, and with
:data:`ENABLED` off, every call is eager.
"""
from __future__ import annotations

import collections
import threading

import torch

__all__ = ["ENABLED", "GraphCache", "SHARED"]

ENABLED = True  # False: every call eager (for comparisons and debugging)


class _Entry:
    __slots__ = ("graph", "inputs", "outputs", "seen")

    def __init__(self):
        self.graph = None  # the captured graph; None before capture, False where capture failed
        self.inputs = self.outputs = ()
        self.seen = 0


class GraphCache:
    """``cache(key, fn, *inputs)`` returns ``fn(*inputs)``: a tuple of fresh tensors (and of constants:
    an output that is not a tensor is returned as the captured call gave it).

    ``key`` (hashable) must name everything ``fn`` depends on besides the inputs' values: the inputs'
    shapes, strides, dtypes and devices, the current stream and CUDA autocast's state are added to it.
    Up to ``size`` graphs are kept (least recently used dropped first); each holds copies of its inputs
    on the device, and the graphs of one stream share one memory pool for their intermediate buffers (as
    large as the largest graph's). Calls whose inputs take more than ``max_input_bytes`` run eagerly: there the kernels
    outlast the host's launches anyway, and a graph would hold a copy of large inputs. :meth:`clear`
    gives all of it back.
    """

    def __init__(self, size: int = 8, max_input_bytes: int = 128 << 20):
        self.size = int(size)
        self.max_input_bytes = int(max_input_bytes)
        self._entries: collections.OrderedDict = collections.OrderedDict()
        self._pools: dict = {}  # (device, stream) -> the memory pool its graphs share
        self._lock = threading.Lock()

    def clear(self) -> None:
        """Drop every graph (their memory returns to torch's caching allocator)."""
        with self._lock:
            self._entries.clear()
            self._pools.clear()

    def __len__(self) -> int:
        return sum(1 for e in self._entries.values() if e.graph)

    def __call__(self, key, fn, *inputs: torch.Tensor) -> tuple:
        with torch.no_grad():  # a graph replays no autograd history: nothing here is differentiated
            return self._call(key, fn, inputs)

    def _applies(self, inputs) -> bool:
        return (ENABLED and bool(inputs) and all(t.is_cuda for t in inputs)
                and sum(t.numel() * t.element_size() for t in inputs) <= self.max_input_bytes)

    @staticmethod
    def _stream(device):
        return torch.cuda.current_stream(device).cuda_stream

    @staticmethod
    def _new_pool(device) -> tuple:
        """A memory pool for the graphs of one stream, and the side stream their captures run on."""
        return torch.cuda.graph_pool_handle(), torch.cuda.Stream(device)

    def _call(self, key, fn, inputs) -> tuple:
        if not self._applies(inputs):
            return tuple(fn(*inputs))
        # per stream: a graph's buffers are reused by each replay, which only the stream's order protects
        stream = self._stream(inputs[0].device)
        # autocast picks the kernels of matrix products: a graph captured under it is another graph
        autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        full = (key, stream, autocast, tuple((t.shape, t.stride(), t.dtype, t.device) for t in inputs))
        with self._lock:
            entry = self._entries.get(full)
            if entry is None:
                entry = self._entries[full] = _Entry()
                while len(self._entries) > self.size:
                    self._entries.popitem(last=False)
            self._entries.move_to_end(full)
            entry.seen += 1
            eager = entry.graph is False or entry.seen == 1  # seen once: eager (one-off shapes are not captured)
        if eager:  # outside the lock: other threads' calls go on meanwhile
            return tuple(fn(*inputs))
        # Capture, and each replay from copying the inputs in to copying the outputs out, under the lock:
        # two threads on one stream share the graph's buffers.
        with self._lock:
            if entry.graph is None:
                # One pool per stream for all its graphs: they never run at once (one stream), and none
                # reads another's output (each replay's outputs are copied out at once), so each may reuse
                # the others' scratch memory whatever the order of replays: the pool holds the largest
                # graph's working memory, not the sum of all.
                where = (inputs[0].device, stream)
                if where not in self._pools:
                    self._pools[where] = self._new_pool(inputs[0].device)
                self._capture(entry, fn, inputs, *self._pools[where])
            if entry.graph is not False:
                for static, t in zip(entry.inputs, inputs):
                    static.copy_(t)
                entry.graph.replay()
                # the next replay overwrites the graph's own outputs
                return tuple(o.clone() if isinstance(o, torch.Tensor) else o for o in entry.outputs)
        return tuple(fn(*inputs))  # not capturable (here or in another thread meanwhile): eager

    @staticmethod
    def _capture(entry: _Entry, fn, inputs, pool, side) -> None:
        device = inputs[0].device
        with torch.cuda.device(device):
            # the graph's inputs keep the callers' strides (empty_like preserves a dense layout); made as
            # normal tensors, so that a graph captured under torch.inference_mode() takes inputs outside it
            with torch.inference_mode(False):
                static = tuple(torch.empty_like(t) for t in inputs)
            for s, t in zip(static, inputs):
                s.copy_(t)
            graph = torch.cuda.CUDAGraph()
            here = torch.cuda.current_stream(device)
            side.wait_stream(here)  # the copies above, and whatever produced the inputs
            try:
                with torch.cuda.stream(side):
                    # thread-local: other threads' CUDA calls (a data loader's) go on undisturbed
                    graph.capture_begin(pool=pool, capture_error_mode="thread_local")
                    try:
                        outputs = tuple(fn(*static))
                    finally:
                        graph.capture_end()
            except Exception:  # not capturable: this key runs eagerly from now on
                entry.graph = False
                here.wait_stream(side)
                return
            here.wait_stream(side)
            entry.graph, entry.inputs, entry.outputs = graph, static, outputs


# The one cache of attnstats' own graphs (record(..., store="stats"): each layer's statistics and its q, k
# standard deviations; streaming_stats without a mask), keyed by the function's name and options: a
# model's layers share their shapes.
SHARED = GraphCache(size=16)
