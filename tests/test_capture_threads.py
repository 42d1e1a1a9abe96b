"""record() with threads and with torch.compile.

Threads are forced to overlap with barriers and events (no sleeps, no timing): a block records exactly
the calls of its own thread, and after blocks in two threads end, in either order, transformers'
attention registry, the model files' ``eager_attention_forward`` and the layers' ``forward`` are the
very objects they were before (``is``). References: the same model recorded alone in the main thread
(q, k bit for bit) and its output computed without record (bit for bit).
"""
from __future__ import annotations

import importlib
import sys
import threading
import warnings

import pytest
import torch
from torch import nn

import attnstats

transformers = pytest.importorskip("transformers")
from transformers.modeling_utils import AttentionInterface  # noqa: E402

WAIT = 60  # seconds a thread waits for the other before the test fails (a deadlock guard, not a timing)
N_LAYERS = 2


def bert(impl: str, seed: int, layers: int = N_LAYERS):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64, vocab_size=100,
        attn_implementation=impl,
    )
    return transformers.BertModel(cfg).eval()


def inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    return dict(input_ids=torch.randint(0, 100, (2, 9), generator=g), attention_mask=mask)


def originals():
    """The objects record patches: registry entries and every loaded model file's eager_attention_forward."""
    files = {
        name: vars(mod)["eager_attention_forward"]
        for name, mod in list(sys.modules.items())
        if name.startswith("transformers.models.") and "eager_attention_forward" in vars(mod)
    }
    return dict(AttentionInterface._global_mapping), files


def assert_same_objects(before):
    mapping, files = originals()
    assert mapping.keys() == before[0].keys()
    for key, fn in mapping.items():
        assert fn is before[0][key], key
    assert files.keys() == before[1].keys()
    for name, fn in files.items():
        assert fn is before[1][name], name


def solo(model, x, forwards: int):
    """q and k of every attention call of ``forwards`` passes, recorded with no other thread running."""
    with torch.no_grad(), attnstats.record(model) as rec:
        for _ in range(forwards):
            model(**x)
    return [(r.name, r.q, r.k) for r in rec.records]


def assert_records_equal(rec, expected):
    got = [(r.name, r.q, r.k) for r in rec.records]
    assert [g[0] for g in got] == [e[0] for e in expected]
    for (_, q, k), (_, eq, ek) in zip(got, expected):
        assert torch.equal(q, eq) and torch.equal(k, ek)


def run_threads(*targets):
    """Run each target in its own thread; re-raise the first exception of any of them here."""
    errors = []

    def guarded(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001  # reported in the main thread
                errors.append(e)

        return run

    threads = [threading.Thread(target=guarded(t)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
        assert not t.is_alive(), "a thread is stuck"
    if errors:
        raise errors[0]


class PauseAt:
    """A forward pre-hook on one module that, in a chosen thread, runs ``action`` once, mid-forward."""

    def __init__(self, module: nn.Module):
        self.actions: dict[int, object] = {}
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        action = self.actions.pop(threading.get_ident(), None)
        if action is not None:
            action()


def wait(event: threading.Event):
    assert event.wait(WAIT), "the other thread did not get there"


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("exit_order", ["first_in_first_out", "first_in_last_out"])
def test_two_threads_two_models_overlap(impl, exit_order):
    """A's first forward waits before layer 1 while B runs all of its forwards, both blocks open."""
    model_a, model_b = bert(impl, 0), bert(impl, 1)
    xa, xb = inputs(0), inputs(1)
    expect_a, expect_b = solo(model_a, xa, 2), solo(model_b, xb, 3)
    before = originals()
    pause = PauseAt(model_a.encoder.layer[1])
    both_open, both_done = threading.Barrier(2, timeout=WAIT), threading.Barrier(2, timeout=WAIT)
    a_in, a_paused, b_done, a_out, b_out = (threading.Event() for _ in range(5))
    recs = {}

    def thread_a():
        with torch.no_grad(), attnstats.record(model_a) as rec:
            a_in.set()  # B enters while A's block is open
            both_open.wait()

            def let_b_run():
                a_paused.set()
                wait(b_done)

            pause.actions[threading.get_ident()] = let_b_run
            model_a(**xa)
            model_a(**xa)
            both_done.wait()
            if exit_order == "first_in_last_out":
                wait(b_out)
        recs["a"] = rec
        a_out.set()

    def thread_b():
        wait(a_in)
        with torch.no_grad(), attnstats.record(model_b) as rec:
            both_open.wait()
            wait(a_paused)
            for _ in range(3):
                model_b(**xb)
            b_done.set()
            both_done.wait()
            if exit_order == "first_in_first_out":
                wait(a_out)
        recs["b"] = rec
        b_out.set()

    try:
        run_threads(thread_a, thread_b)
    finally:
        pause.handle.remove()
    assert_records_equal(recs["a"], expect_a)
    assert_records_equal(recs["b"], expect_b)
    assert_same_objects(before)
    assert torch._C._len_torch_function_stack() == 0


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_other_thread_runs_the_same_model_unrecorded(impl):
    """Each thread's forward is paused in the middle (before layer 1) while the other runs a whole one."""
    model = bert(impl, 0)
    xa, xb = inputs(0), inputs(1)
    with torch.no_grad():
        reference_b = model(**xb).last_hidden_state
    expect_a = solo(model, xa, 2)
    before = originals()
    pause = PauseAt(model.encoder.layer[1])
    b_may_run, b_ran, a_may_run, a_ran = (threading.Event() for _ in range(4))
    recording = threading.Event()
    outputs_b = []
    recs = {}

    def thread_a():
        with torch.no_grad(), attnstats.record(model) as rec:
            recording.set()

            def let_b_run():
                b_may_run.set()
                wait(b_ran)

            pause.actions[threading.get_ident()] = let_b_run
            model(**xa)  # B's first forward runs while this one waits before layer 1
            wait(a_may_run)
            model(**xa)  # runs while B's second forward waits before layer 1
            a_ran.set()
        recs["a"] = rec

    def thread_b():
        wait(recording)
        wait(b_may_run)
        with torch.no_grad():
            outputs_b.append(model(**xb).last_hidden_state)
            b_ran.set()

            def let_a_run():
                a_may_run.set()
                wait(a_ran)

            pause.actions[threading.get_ident()] = let_a_run
            outputs_b.append(model(**xb).last_hidden_state)

    try:
        run_threads(thread_a, thread_b)
    finally:
        pause.handle.remove()
    assert len(outputs_b) == 2
    for out in outputs_b:
        assert torch.equal(out, reference_b)  # bit-identical to a run without any recorder
    assert_records_equal(recs["a"], expect_a)
    assert len(recs["a"].records) == 2 * N_LAYERS  # A's two forwards, none of B's
    assert_same_objects(before)


def test_forward_raises_in_one_thread_while_the_other_records():
    model_a, model_b = bert("eager", 0), bert("eager", 1)
    xa, xb = inputs(0), inputs(1)
    expect_b = solo(model_b, xb, 1)
    before = originals()
    a_in, a_out = threading.Event(), threading.Event()
    recs = {}

    class Stop(Exception):
        pass

    def fail(module, args, output):
        raise Stop

    handle = model_a.encoder.layer[1].register_forward_hook(fail)

    def thread_a():
        with pytest.raises(Stop), torch.no_grad(), attnstats.record(model_a) as rec:
            a_in.set()
            model_a(**xa)
        recs["a"] = rec
        a_out.set()

    def thread_b():
        with torch.no_grad(), attnstats.record(model_b) as rec:
            wait(a_in)
            wait(a_out)  # A's block ended with the exception while this one is open
            model_b(**xb)
        recs["b"] = rec

    try:
        run_threads(thread_a, thread_b)
    finally:
        handle.remove()
    assert len(recs["a"].records) == N_LAYERS
    assert_records_equal(recs["b"], expect_b)
    assert_same_objects(before)


@pytest.mark.parametrize("exit_order", ["first_in_first_out", "first_in_last_out"])
def test_two_threads_record_one_transformer_encoder(exit_order):
    """The encoder layers' instance forward wrapper is shared; it is gone after both blocks, in either order."""
    torch.manual_seed(3)
    layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    xa, xb = torch.randn(2, 6, 16), torch.randn(3, 5, 16)
    with torch.no_grad():
        reference = {"a": enc(xa), "b": enc(xb)}
    expect = {}
    for key, x in (("a", xa), ("b", xb)):
        with torch.no_grad(), attnstats.record(enc) as rec:
            enc(x)
        expect[key] = [(r.name, r.q, r.k) for r in rec.records]
    first_in, ran = threading.Event(), threading.Barrier(2, timeout=WAIT)
    first_out, second_out = threading.Event(), threading.Event()
    recs, outs = {}, {}

    def worker(key, x, first):
        def run():
            if not first:
                wait(first_in)
            with torch.no_grad(), attnstats.record(enc) as rec:
                if first:
                    first_in.set()
                ran.wait()
                outs[key] = enc(x)
                ran.wait()
                if first and exit_order == "first_in_last_out":
                    wait(second_out)
                if not first and exit_order == "first_in_first_out":
                    wait(first_out)
            (first_out if first else second_out).set()
            recs[key] = rec

        return run

    run_threads(worker("a", xa, True), worker("b", xb, False))
    for key in ("a", "b"):
        assert torch.equal(outs[key], reference[key])
        assert_records_equal(recs[key], expect[key])
    assert all("forward" not in m.__dict__ for m in enc.modules())
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in enc.modules()) == 0


# ------------------------------------------------------------------------------------------------
# torch.compile


def _compile_or_skip(module):
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile is not available in this torch build")
    try:
        importlib.import_module("torch._dynamo")
    except Exception as e:  # noqa: BLE001  # e.g. a Python version dynamo does not support
        pytest.skip(f"torch.compile is unavailable on this platform: {e}")
    return torch.compile(module, backend="eager")


def test_compiled_model_is_refused():
    model = bert("sdpa", 0)
    compiled = _compile_or_skip(model)
    with pytest.raises(TypeError, match=r"^model: .*torch\.compile.*_orig_mod"):
        attnstats.record(compiled)
    # the uncompiled module is what to record
    with torch.no_grad(), attnstats.record(compiled._orig_mod) as rec:
        compiled._orig_mod(**inputs(0))
    assert len(rec.records) == N_LAYERS
    model.encoder.layer[1] = _compile_or_skip(model.encoder.layer[1])
    with pytest.raises(ValueError, match=r"submodule 'encoder\.layer\.1' is compiled"):
        attnstats.record(model)
    in_place = bert("sdpa", 0)
    in_place.compile(backend="eager")
    with pytest.raises(TypeError, match=r"nn\.Module\.compile\(\)"):
        attnstats.record(in_place)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_compiled_call_inside_a_block_passes_through(impl):
    """Dynamo traces the model with the block's hooks and wrappers in place: it must not fail, nor change the output."""
    model = bert(impl, 0, layers=1)  # one layer: dynamo's tracing time grows with the layers
    compiled = _compile_or_skip(model)
    x = inputs(0)
    before = originals()
    with torch.no_grad():
        reference = compiled(**x).last_hidden_state
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", attnstats.NothingCapturedWarning)
            with attnstats.record(model) as rec:
                out = compiled(**x).last_hidden_state
                eager_out = model(**x).last_hidden_state
        after = compiled(**x).last_hidden_state
    assert torch.equal(out, reference) and torch.equal(after, reference)
    assert torch.equal(eager_out, model(**x).last_hidden_state)
    # the module hooks see the uncompiled call only: the compiled call leaves no record named after a module
    assert [r.name for r in rec.records if r.name] == ["encoder.layer.0.attention.self"]
    assert_same_objects(before)
    assert torch._C._len_torch_function_stack() == 0
