"""record() on every architecture of tests/architectures.py, against the model's own eager attentions.

One case per (architecture, mode, padding side). Each case builds the tiny random-initialised model
(seeded) and checks that
- the forward under ``attnstats.record`` returns bit-identical outputs (``torch.equal`` on every tensor,
  KV caches included);
- there is one record per attention matrix that the eager model returns with ``output_attentions=True``
  (the same weights run in eager), in call order, plus the calls the entry declares as not returned;
- every record's ``probs()`` equals that eager matrix on the query rows attnstats keeps (pad-token rows
  are absent by design), and every row of the unpadded batch item is kept;
- attnstats issued no warning.

Cases that the data marks ``known`` (attnstats does not capture them correctly yet) are strict xfails:
when a fix lands they fail until the mark is removed. A model that cannot run in a mode is skipped with
the exception's message.
"""
from __future__ import annotations

import copy
import functools
import itertools
import math
import os
import warnings
from collections.abc import Mapping

import pytest
import torch

import attnstats

transformers = pytest.importorskip("transformers")
from architectures import ARCHITECTURES, INPUT_KINDS, ROUTES, build  # noqa: E402

# float32 unit roundoff
U = 2.0**-24
# Largest drift of a score between the eager model and the same weights run by another attention
# implementation, carried by the different rounding of the earlier layers (see _bound).
DRIFT = 1e-5
# flex_attention compiles its kernel on the first call: on 2 CPU cores 9–27 s for the first model
# (cold inductor cache) and 2–20 s for each further one, and record() recompiles it; too slow for CI.
FLEX = os.environ.get("ATTNSTATS_TEST_FLEX") == "1"


def _cases():
    for entry in ARCHITECTURES:
        for mode in entry["modes"]:
            sides = entry["pad"] or (None,)
            if mode.endswith(":decode"):
                sides = ("left",)  # a decoding step follows a left-padded prompt
            for side in sides:
                marks = ()
                reason = entry["known"].get(f"{mode}-{side}", entry["known"].get(mode))
                if reason:
                    marks = pytest.mark.xfail(strict=True, reason=reason, raises=AssertionError)
                yield pytest.param(entry, mode, side, id=f"{entry['name']}-{mode}-{side or 'nopad'}", marks=marks)


@pytest.fixture(scope="module", autouse=True)
def _quiet():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: intra-op threads cost more than they save on 2 cores
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(verbosity)
    torch.set_num_threads(old)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def _tensors(x):
    """Every tensor of a model output: ModelOutput / dict / tuple / list, transformers caches included."""
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, Mapping):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (tuple, list)):
        for v in x:
            yield from _tensors(v)
    elif type(x).__module__.startswith("transformers.cache_utils"):
        for v in vars(x).values():
            yield from _tensors(v)


def _attentions(out, key=""):
    """The attention matrices of an output, from every field whose name ends in "attentions"."""
    found = []
    if isinstance(out, Mapping):
        for k, v in out.items():
            if k.endswith("attentions"):
                found.extend(t for t in _tensors(v))
            elif isinstance(v, Mapping):
                found.extend(_attentions(v))
    return found


def _eager_attentions(model, run):
    """``(output, [(P, module)])``: ``run(model)`` with output_attentions, P in the order the layers ran.

    The matrices come grouped by kind in the output (encoder, decoder, cross, text, vision); a forward
    hook on every module notes which module first returned each tensor, in the order modules finished,
    which for attention modules (never nested) is the order of the attention calls.
    """
    first, keep, order = {}, [], itertools.count()

    def hook(name):
        def note(module, args, output):
            for t in _tensors(output):
                if id(t) not in first:
                    first[id(t)] = (next(order), name)
                    keep.append(t)  # alive until the end, so that no id is reused
        return note

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()]
    try:
        out = run(model, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    att = _attentions(out)
    ranked = sorted(range(len(att)), key=lambda i: first.get(id(att[i]), (math.inf, ""))[0])
    return out, [(att[i], first.get(id(att[i]), (0, "?"))[1]) for i in ranked]


@functools.lru_cache(maxsize=None)
def _eager(name: str, side: str | None):
    """The eager model of an entry and its inputs (built once per entry and side)."""
    entry = next(e for e in ARCHITECTURES if e["name"] == name)
    return build(entry, "eager", side)


def _runner(mode: str, inputs: dict, cache=None):
    """``run(model, **kw)``: the forward a case makes (for decoding, one step after the given cache)."""
    if not mode.endswith(":decode"):
        return lambda model, **kw: model(**inputs, **kw)
    step = dict(input_ids=inputs["input_ids"][:, -1:], attention_mask=inputs["attention_mask"])
    # every run gets its own copy of the cache, which a step extends in place
    return lambda model, **kw: model(**step, past_key_values=copy.deepcopy(cache), use_cache=True, **kw)


def _prefill(model, inputs):
    with torch.no_grad():
        out = model(input_ids=inputs["input_ids"][:, :-1], attention_mask=inputs["attention_mask"][:, :-1],
                    use_cache=True)
    return out.past_key_values


def _bound(record, pe: torch.Tensor, impl: str, crop: int = 0) -> torch.Tensor:
    """Largest ``|probs() − P_eager|`` allowed per entry, ``[B, H, Nq, Nk]`` float64 (the shape of ``pe``,
    the record's matrix without its first ``crop`` query and key positions).

    Both are softmaxes of the same scores up to rounding: if the scores of a row differ by at most δ,
    each probability p moves by at most p·(exp(2δ) − 1) (as in
    tests/test_capture.py::test_minilm_probs_equal_eager_attentions). δ has two parts:
    - eager forms ``scale·q·kᵀ (+ bias)`` in float32 from the q and k that the record holds (probs()
      recomputes it in float64): a d-term dot product is off by at most (d + 2)·u·scale·Σ|q_i k_i|
      (u = 2⁻²⁴, with the scaling and the max subtraction), a bias or softcap term adds 2u·|term|. A
      record that holds P itself (no q, k) is the softmax output: δ = 0.
    - a model run by another implementation (sdpa, flex) has q and k that differ from the eager model's
      by the rounding its kernels made in the earlier layers (none in the first). The MiniLM test
      measures that drift at 2.4e-7 … 1.2e-5 per layer on its 384-wide layers; these models have 2
      layers of width 32 per stack, and DRIFT = 1e-5 bounds it (the rounding term above alone already
      covers every sdpa case measured here).
    The float32 softmax itself rounds each p by a relative (Nk + 3)·u (exp, the row sum, the division)
    and an absolute u where p underflows.
    """
    b, h, nq, nk = record.shape
    delta = torch.zeros(b, h, nq, 1, dtype=torch.float64)
    if record.q is not None and record.k is not None:
        q, k = record.q.double().abs(), record.k.double().abs()
        magnitude = torch.matmul(q, k.transpose(-1, -2)).expand(b, h, nq, nk) * abs(record.scale)
        delta = delta + (q.shape[-1] + 2) * U * magnitude.amax(-1, keepdim=True)
        if record.bias is not None:
            delta = delta + 2 * U * record.bias.double().abs().expand(b, h, nq, nk).amax(-1, keepdim=True)
        if record.softcap is not None:
            delta = delta + 2 * U * abs(record.softcap)
    if impl != "eager":
        delta = delta + DRIFT
    return pe.double() * (torch.expm1(2 * delta[..., crop:, :]) + (nk + 3) * U) + U


@pytest.mark.parametrize("entry, mode, side", list(_cases()))
def test_capture_equals_eager_attentions(entry, mode, side):
    name = entry["name"]
    impl = mode.split(":")[0]
    if impl == "flex_attention" and not FLEX:
        pytest.skip("flex_attention compiles for 2-30 s per model on the CPU; set ATTNSTATS_TEST_FLEX=1 to run it")
    try:
        eager_model, inputs = _eager(name, side)
        if impl == "eager":
            model = eager_model
        else:
            model, _ = build(entry, impl, side)
            model.load_state_dict(eager_model.state_dict())
        eager_cache = cache = None
        if mode.endswith(":decode"):
            eager_cache = _prefill(eager_model, inputs)
            cache = eager_cache if model is eager_model else _prefill(model, inputs)
        with torch.no_grad():
            plain = _runner(mode, inputs, cache)(model)
    except Exception as e:  # noqa: BLE001  (a model that cannot run in this mode is reported, not hidden)
        pytest.skip(f"{name} does not run with {mode}: {_one_line(e)}")
    with torch.no_grad():
        _, references = _eager_attentions(eager_model, _runner(mode, inputs, eager_cache))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with attnstats.record(model) as rec:
                out = _runner(mode, inputs, cache)(model)
    ours = [f"{w.category.__name__}: {w.message}" for w in caught if "attnstats" in (w.filename or "")
            or type(w.message).__module__.startswith("attnstats")]

    # the recorded forward is the plain forward, bit for bit
    expected, got = list(_tensors(plain)), list(_tensors(out))
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(expected, got)):
        assert torch.equal(a, b), f"output tensor {i} changed under record()"

    # one record per attention matrix the eager model returns, in call order
    records = rec.records
    extra = entry["extra_records"]
    shapes = [tuple(p.shape) for p, _ in references]
    assert len(records) == len(references) + extra, (
        f"{len(records)} records for {len(references)} eager attention matrices"
        f"{f' and {extra} calls output_attentions does not return' if extra else ''}; record shapes "
        f"{[r.shape for r in records]}, eager {shapes}; warnings {ours}"
    )
    if extra:  # skip the records of calls output_attentions does not return, by shape
        pending, kept = list(records), []
        for shape in shapes:
            while pending and tuple(pending[0].shape) != shape:
                pending.pop(0)
            assert pending, f"no record left for an eager attention of shape {shape}"
            kept.append(pending.pop(0))
        records = kept
    c = entry["crop"]
    for i, (r, (pe, where)) in enumerate(zip(records, references)):
        b, h, nq, nk = r.shape
        assert (b, h, nq - c, nk - c) == tuple(pe.shape), (
            f"record {i} ({r.name}) has shape {tuple(r.shape)}, the eager attention of {where} {tuple(pe.shape)}"
            f"{f' (without {c} positions)' if c else ''}"
        )
        if entry["reference"] == "scores":
            pe = torch.softmax(pe, dim=-1)  # the softmax the model takes of the scores it returns
        p = r.probs(dtype=torch.float64)[..., c:, c:]
        rows = r.query_valid()
        rows = torch.ones(b, h, nq, dtype=torch.bool) if rows is None else rows.expand(b, h, nq)
        assert rows[0].all(), f"record {i} ({r.name}) drops query rows of the unpadded batch item"
        rows = rows[..., c:]
        err = (p - pe.double()).abs()
        excess = (err - _bound(r, pe, impl, c)).masked_fill(~rows[..., None], -math.inf)
        assert excess.max().item() <= 0, (
            f"record {i} ({r.name}, eager {where}): probs() differs from the eager attention by up to "
            f"{err.masked_fill(~rows[..., None], 0).max().item():.3g}"
        )
    assert not ours, f"attnstats warned: {ours}"


def test_architecture_data():
    """Names are unique, and the data spans every input kind and attention route."""
    names = [e["name"] for e in ARCHITECTURES]
    assert len(set(names)) == len(names) >= 60
    assert {e["inputs"] for e in ARCHITECTURES} == set(INPUT_KINDS)
    assert {r for e in ARCHITECTURES for r in e["routes"]} == set(ROUTES)
    assert {m for e in ARCHITECTURES for m in e["modes"]} >= {"eager", "sdpa", "flex_attention", "sdpa:decode"}
