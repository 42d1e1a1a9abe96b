"""The seam between the capture backends and Recorder: the public methods a backend uses, and nothing else.

References: a float64 softmax written out here for the records a call hands over; the source of the
backend modules, read with ``ast``, for what they touch on the recorder.
"""
from __future__ import annotations

import ast
import contextlib
import inspect
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnstats
from attnstats.capture import Recorder
from attnstats.capture.recorder import FunctionCall

CAPTURE = Path(attnstats.__file__).resolve().parent / "capture"
BACKEND_FILES = ("sdpa.py", "hf.py", "mha.py", "module.py", "stats_store.py", "alongside.py")


class Attention(nn.Module):
    """Self-attention by SDPA on an input already split in heads: ``x: [B, H, N, d]``."""

    probe = None  # called at the start of forward, from inside the module's forward

    def forward(self, x):
        if self.probe is not None:
            self.probe()
        return F.scaled_dot_product_attention(x, 2 * x, x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = Attention()
        self.second = Attention()

    def forward(self, x):
        return self.second(self.first(x))


def _x(seed=0, shape=(1, 2, 5, 4)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _softmax_reference(q, k, scale):
    """Dense float64 softmax(scale·q·kᵀ) ``[B, H, Nq, Nk]``."""
    s = torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) * scale
    return torch.softmax(s, dim=-1)


def test_backends_touch_only_the_public_interface_of_the_recorder():
    """Every attribute a backend reads or writes on a recorder is public (no leading underscore)."""
    private = []
    for file in BACKEND_FILES:
        tree = ast.parse((CAPTURE / file).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or not node.attr.startswith("_") or node.attr.startswith("__"):
                continue
            owner = node.value
            # the backends name a recorder `recorder` or `rec`, and CaptureMode keeps it as `self.recorder`
            is_recorder = (isinstance(owner, ast.Name) and owner.id in ("recorder", "rec")) or (
                isinstance(owner, ast.Attribute) and owner.attr == "recorder"
            )
            if is_recorder:
                private.append(f"{file}:{node.lineno}: .{node.attr}")
    assert private == []


def test_the_interface_is_documented():
    """Each method a backend uses has a docstring, and the module docstring describes the hand-over."""
    for name in ("is_recording", "module_name", "current_module", "capture", "own_module", "in_owned_module",
                 "function_call", "current_function_call", "push_encoder_padding", "pop_encoder_padding",
                 "encoder_padding"):
        assert inspect.getdoc(getattr(Recorder, name)), name
    doc = inspect.getdoc(attnstats.capture.recorder)
    assert "How a backend hands a call to the recorder" in doc


def test_record_is_recorder_with_one_docstring():
    """help(attnstats.record) shows Recorder's signature and its documentation of every argument."""
    params = list(inspect.signature(Recorder).parameters)
    assert list(inspect.signature(attnstats.record).parameters) == params
    assert attnstats.record.__doc__ == Recorder.__doc__
    for name in params:
        assert f"    {name}: " in Recorder.__doc__, name
    rec = attnstats.record(Net(), layers=1, backend="sdpa")
    assert isinstance(rec, Recorder) and rec.backends == ("sdpa",)
    with pytest.raises(TypeError, match="layer"):
        attnstats.record(Net(), layer=1)  # a misspelt option is refused, as by Recorder
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        attnstats.record("not a model")


def test_is_recording_only_in_the_block_and_its_thread():
    net = Net()
    rec = attnstats.record(net)
    assert not rec.is_recording()
    seen = []
    with rec:
        assert rec.is_recording()
        other = threading.Thread(target=lambda: seen.append(rec.is_recording()))
        other.start()
        other.join()
        net(_x())  # a forward, so that the block ends with records and no warning
    assert seen == [False]
    assert not rec.is_recording()


def test_capture_hands_over_one_call():
    """A call handed over by hand becomes a record whose probs() is the float64 softmax of its q, k."""
    q, k = _x(1, (1, 4, 5, 8)), _x(2, (1, 2, 6, 8))  # 2 key heads for 4 query heads
    rec = attnstats.record(Net(), layers=["a", "b#1"])
    with rec:
        got = rec.capture("a", q, k, scale=0.3, backend="custom", enable_gqa=True)
        assert rec.capture("b", q, k, backend="custom", enable_gqa=True) is None  # not selected by layers=
        second = rec.capture("b", q, k, backend="custom", enable_gqa=True)  # the second call of "b"
    assert [r.name for r in rec.records] == ["a", "b#1"]
    assert got is rec.records[0] and second is rec.records[1]
    assert (got.layer, second.layer, got.backend, got.scale, second.scale) == (0, 2, "custom", 0.3, 8**-0.5)
    k4 = k.repeat_interleave(2, dim=1)  # query head h uses key head h // 2
    assert torch.equal(got.q, q) and torch.equal(got.k, k4)
    # float64 inputs, probs() in float64 on the CPU: the two softmaxes differ only in rounding (≤ a few eps)
    torch.testing.assert_close(got.probs(dtype=torch.float64), _softmax_reference(q, k4, 0.3), rtol=0, atol=1e-14)


def test_function_call_names_the_sdpa_calls_inside_it():
    x = _x()
    rec = attnstats.record(Net(), backend="sdpa")
    with rec:
        assert rec.current_function_call() is None
        with rec.function_call("encoder.attn") as call:
            assert isinstance(call, FunctionCall) and rec.current_function_call() is call and not call.captured
            F.scaled_dot_product_attention(x, x, x)
            assert call.captured
        assert rec.current_function_call() is None
        # calls may end in any order (several recorders, nested functions): each removes itself
        outer_cm, inner_cm = rec.function_call("outer"), rec.function_call("inner")
        outer, inner = outer_cm.__enter__(), inner_cm.__enter__()
        outer_cm.__exit__(None, None, None)
        assert rec.current_function_call() is inner
        inner_cm.__exit__(None, None, None)
        assert rec.current_function_call() is None
    assert [(r.name, r.backend) for r in rec.records] == [("encoder.attn", "sdpa")]
    torch.testing.assert_close(rec.records[0].probs(dtype=torch.float64), _softmax_reference(x, x, 0.5),
                               rtol=0, atol=1e-14)


def test_own_module_leaves_its_sdpa_calls_to_its_backend():
    net, x = Net(), _x()
    rec = attnstats.record(net, backend="sdpa")
    inside = []
    net.first.probe = net.second.probe = lambda: inside.append(rec.in_owned_module())
    with rec:
        rec.own_module(net.first)
        net(x)
        assert not rec.in_owned_module()
    assert [r.name for r in rec.records] == ["second"]
    assert inside == [True, False]
    with rec:  # the claim ended with the block
        net(x)
    assert [r.name for r in rec.records] == ["first", "second"]
    assert inside == [True, False, False, False]


def test_module_backend_with_modules_captures_each_call_once():
    """capture= on modules chosen by modules=: their SDPA calls are not captured a second time."""
    net, x = Net(), _x()

    def capture(module, args, kwargs, output):
        return args[0], 2 * args[0], None, False, None

    with attnstats.record(net, capture=capture, modules=Attention) as rec:
        net(x)
    assert [(r.name, r.backend) for r in rec.records] == [("first", "module"), ("second", "module")]
    assert torch.equal(rec.records[0].q, x) and torch.equal(rec.records[0].k, 2 * x)
    assert torch.equal(rec.records[1].q, net.first(x))


def test_encoder_padding_stack():
    rec = attnstats.record(Net())
    pad = torch.tensor([[False, True]])
    assert rec.encoder_padding() is None
    rec.push_encoder_padding(pad)
    rec.push_encoder_padding(None)  # an inner encoder called without a mask
    assert rec.encoder_padding() is None
    rec.pop_encoder_padding()
    assert rec.encoder_padding() is pad
    rec.pop_encoder_padding()
    rec.pop_encoder_padding()  # nothing running: nothing happens
    assert rec.encoder_padding() is None


def test_one_torch_function_mode_runs_for_the_sdpa_and_softmax_backends():
    """Every torch call of the forward pays each open mode once: the default backends (sdpa and softmax)
    share one, which still captures the SDPA calls with their q and k."""
    from attnstats.capture.sdpa import CaptureMode

    model = Net()
    seen = []

    def probe():
        n = torch._C._len_torch_function_stack()
        seen.append(sum(isinstance(torch._C._get_function_stack_at(i), CaptureMode) for i in range(n)))

    model.first.probe = probe
    x = _x()
    with torch.no_grad(), attnstats.record(model) as rec:
        assert set(rec.backends) >= {"sdpa", "softmax"}
        model(x)
    assert seen == [1]
    assert [r.name for r in rec.records] == ["first", "second"]
    p = _softmax_reference(x, 2 * x, x.shape[-1] ** -0.5)
    assert torch.allclose(rec.records[0].probs().double(), p, atol=1e-12)  # float64 inputs: rounding only


def test_transformers_attention_functions_are_wrapped_once_for_all_blocks():
    """Entering a block reuses the wrapper made for each registered attention function before (making
    one copies the function's attributes, which cost about a millisecond per block)."""
    pytest.importorskip("transformers")
    from transformers.modeling_utils import AttentionInterface

    from attnstats.capture.hf import install_hf

    class Rec:  # what install_hf reads of a recorder
        modules: list = []

    mapping = AttentionInterface._global_mapping
    original = mapping["sdpa"]
    wrappers = []
    for _ in range(2):
        with contextlib.ExitStack() as stack:
            install_hf(Rec(), stack)
            wrappers.append(mapping["sdpa"])
    assert wrappers[0] is wrappers[1] and wrappers[0] is not original
    assert mapping["sdpa"] is original  # restored on exit
