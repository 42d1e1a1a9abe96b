"""attnstats.cuda_graphs.GraphCache's policy, on the CPU: when a call runs eagerly, is captured or is
replayed, what a replay returns, and what happens when a capture fails.

CUDA graphs need a GPU, so the capture itself is replaced here by one that records what the function does
on the graph's own input buffers and redoes it on replay, as a CUDA graph replays its kernels on the
addresses they were captured with; everything around it (the keys, the counts, the eviction, copying the
inputs in and the outputs out) is GraphCache's own code. The real capture is checked on the GPU against
eager launches by ``benchmarks/record_gpu.py`` (its ``check`` part).
"""
import pytest
import torch

from attnstats import cuda_graphs
from attnstats.cuda_graphs import GraphCache


class _Replay:
    """Stands for a captured graph: replays ``fn`` on the static inputs into the static outputs."""

    def __init__(self, fn, static, outputs):
        self.fn, self.static, self.outputs = fn, static, outputs
        self.replays = 0

    def replay(self):
        self.replays += 1
        for out, new in zip(self.outputs, self.fn(*self.static)):
            if isinstance(out, torch.Tensor):
                out.copy_(new)


class CPUGraphs(GraphCache):
    def __init__(self, *args, fail=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.captures, self.fail = 0, fail

    def _applies(self, inputs):
        return cuda_graphs.ENABLED and sum(t.numel() * t.element_size() for t in inputs) <= self.max_input_bytes

    @staticmethod
    def _stream(device):
        return 0

    @staticmethod
    def _new_pool(device):
        return None, None

    def _capture(self, entry, fn, inputs, pool, side):
        self.captures += 1
        if self.fail:  # as a function that reads the device: the capture raises
            entry.graph = False
            return
        static = tuple(t.clone() for t in inputs)
        outputs = tuple(fn(*static))
        entry.graph, entry.inputs, entry.outputs = _Replay(fn, static, outputs), static, outputs


def _counting():
    calls = []

    def fn(a, b):
        calls.append(1)
        return (a * 2 + b, a.sum(-1), "a constant")

    return fn, calls


def test_eager_then_captured_then_replayed_with_fresh_values():
    cache = CPUGraphs()
    fn, calls = _counting()
    a, b = torch.arange(6.0).reshape(2, 3), torch.ones(2, 3)
    first = cache("k", fn, a, b)
    assert (len(calls), cache.captures, len(cache)) == (1, 0, 0)  # seen once: eager, nothing captured
    second = cache("k", fn, a, b)
    assert cache.captures == 1 and len(cache) == 1
    for x, y in zip(first[:2], second[:2]):
        assert torch.equal(x, y)
    graph = next(iter(cache._entries.values())).graph
    replays = graph.replays
    a2 = a + 10.0
    third = cache("k", fn, a2, b)  # a replay of the graph's buffers, refilled with the new inputs
    assert graph.replays == replays + 1
    assert torch.equal(third[0], a2 * 2 + b) and torch.equal(third[1], a2.sum(-1))
    assert third[2] == "a constant"  # not a tensor: returned as the captured call gave it
    assert torch.equal(second[0], a * 2 + b)  # an earlier result is a copy, not the graph's buffer
    assert third[0].data_ptr() != graph.outputs[0].data_ptr()


def test_another_shape_or_key_is_another_graph():
    cache = CPUGraphs()
    fn, _ = _counting()
    a, b = torch.ones(2, 3), torch.ones(2, 3)
    for _ in range(2):
        cache("k", fn, a, b)
        cache("k", fn, a[:1], b[:1])
        cache("other", fn, a, b)
    assert cache.captures == 3 and len(cache) == 3


def test_failed_capture_runs_eagerly_from_then_on():
    cache = CPUGraphs(fail=True)
    fn, calls = _counting()
    a, b = torch.ones(2, 3), torch.ones(2, 3)
    outs = [cache("k", fn, a, b) for _ in range(4)]
    assert cache.captures == 1 and len(cache) == 0 and len(calls) == 4
    assert all(torch.equal(o[0], a * 2 + b) for o in outs)


def test_least_recently_used_graph_is_dropped():
    cache = CPUGraphs(size=2)
    fn, _ = _counting()
    x = [torch.ones(n) for n in (1, 2, 3)]
    for t in x[:2]:
        cache("k", fn, t, t)
        cache("k", fn, t, t)
    cache("k", fn, x[0], x[0])  # x[0] used last: x[1]'s entry goes when a third shape arrives
    cache("k", fn, x[2], x[2])
    assert len(cache._entries) == 2 and len(cache) == 1
    cache("k", fn, x[1], x[1])  # seen afresh: eager again, not a replay
    assert cache.captures == 2


@pytest.mark.parametrize("why", ["disabled", "too large"])
def test_eager_when_disabled_or_inputs_too_large(why, monkeypatch):
    cache = CPUGraphs(max_input_bytes=4 * 6 - 1 if why == "too large" else 1 << 20)
    if why == "disabled":
        monkeypatch.setattr(cuda_graphs, "ENABLED", False)
    fn, calls = _counting()
    a = torch.ones(6)  # 24 bytes of float32
    for _ in range(3):
        cache("k", fn, a[:3], a[3:])
    assert len(calls) == 3 and cache.captures == 0


def test_cpu_inputs_always_run_eagerly():
    cache = GraphCache()  # the real policy: CUDA tensors only
    fn, calls = _counting()
    a = torch.ones(3)
    outs = [cache("k", fn, a, a) for _ in range(3)]
    assert len(calls) == 3 and len(cache) == 0
    assert all(isinstance(o, tuple) and torch.equal(o[0], a * 3) and o[2] == "a constant" for o in outs)
