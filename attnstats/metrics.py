"""The one metric table: a record (or a kernel on its q, k) → ``{metric: float64 tensor [B, H]}``.

Every place that reports statistics per layer and head reads them here: ``record(..., store="stats")``
during the forward (:func:`streaming_values`), :meth:`attnstats.capture.Recorder.frame` and
:func:`attnstats.frame.records_frame` (:func:`record_metrics`), and the command and figures through
them. Metric names are those of :data:`METRIC_NAMES`, one spelling each, taken from the fields of the
result types (:func:`lognormal_fields`, :func:`moment_fields`).

Metrics (per matrix, i.e. per batch element and head):

============== ==========================================================================================
group          metric names
============== ==========================================================================================
entropy        ``entropy``: mean over valid query rows of the row entropy (nats)
spectral_gap   ``spectral_gap``: ``1 − |λ₂|`` over the valid tokens (exact diagonal rule when causal);
               self-attention only (no row for a cross-attention record, ``Nq ≠ Nk``)
lognormal      ``lognormal_mu``, ``lognormal_sigma``, ``lognormal_ks``, ``lognormal_ks_pvalue``,
               ``lognormal_ad``, ``lognormal_skew``, ``lognormal_excess_kurtosis``: fit of ``ln P``
moments        ``p_mean``, ``p_var``, ``logp_mean``, ``logp_var``: mean and variance of ``P`` and ``ln P``
temperature    ``temperature`` ``= 1/(σ_q σ_k)``, ``sigma_q``, ``sigma_k`` (docs/theory.md), softmax only;
               absent for a record without q, k (P-only)
sinks          ``sink_mass``: mean over valid query rows of the sink's probability; only for a record
               with ``sinks`` (no row otherwise, not 0)
============== ==========================================================================================

Softmax statistics come from the record's dense matrix, or from its q, k by the streaming functions
when the matrices are large (:func:`uses_streaming`: the same numbers without P); kernels alongside
use their own matrix and gap. A record that holds only ``P`` (q = k = None, ``rec.p`` set) gets
every statistic but the temperature from ``rec.probs()``, and no kernel alongside.

An attention sink counts as one more key (docs/theory.md §9). Row ``i`` of the model's softmax runs
over its valid keys and the sink, with probabilities ``P'_ij = c_i·P_ij`` and ``p_i = 1 − c_i``
(``P`` the softmax over the keys alone). ``entropy`` is that of the whole row, sink included:
``−Σ_j P'_ij ln P'_ij − p_i ln p_i``. The moments and the log-normal fit take the key entries
``P'_ij``, as ``rec.probs()`` returns them (rows summing to ``c_i``): the sink is no entry between
two tokens. The ``spectral_gap`` is that of ``P``, the key block with each row divided by its sum
``c_i``: the spectral radius of the key block lies between the smallest and largest ``c_i``, so it
says again what ``sink_mass`` says, and the gap of ``P`` keeps its meaning (``λ₁ = 1``; how the
tokens mix). Kernels alongside run without the sink.
"""
from __future__ import annotations

import dataclasses
import warnings

import torch

from . import cuda_graphs
from .budget import check_dense_fits, get_memory_budget
from .masks import is_key_padding, no_valid_entry
from .stats.dense import entropy_of_blocks, moments_of_blocks, prepare_probs, row_entropy
from .stats.lognormal import LogNormalFit, _fit_batched, fit_of_blocks, fits_per_matrix
from .stats.sampling import check_sampling, sample_ranks
from .stats.online import moments_from_rows, streaming_row_accumulators
from .stats.qk import log_prob_table, streaming_lognormal_fit, streaming_stats, streaming_stats_unchecked
from .stats.spectral import causal_spectral_gap, diagonal_log_probs, gap_of_probs, spectral_gap, spectral_gap_from_qk
from .validation import checked_blocks, compute_dtype, first_index, row_sum_tolerance

__all__ = [
    "METRIC_NAMES", "METRICS", "check_metrics", "record_metrics", "streaming_values", "uses_streaming", "is_short",
    "gives_every_metric", "lognormal_fields", "moment_fields", "kernel_probs", "kernel_gap",
]

METRIC_NAMES = {
    "entropy": ("entropy",),
    "spectral_gap": ("spectral_gap",),
    "lognormal": (
        "lognormal_mu",
        "lognormal_sigma",
        "lognormal_ks",
        "lognormal_ks_pvalue",
        "lognormal_ad",
        "lognormal_skew",
        "lognormal_excess_kurtosis",
    ),
    "moments": ("p_mean", "p_var", "logp_mean", "logp_var"),
    "temperature": ("temperature", "sigma_q", "sigma_k"),
    "sinks": ("sink_mass",),
}
METRICS = tuple(METRIC_NAMES)


def check_metrics(metrics) -> tuple[str, ...]:
    if isinstance(metrics, str):
        metrics = (metrics,)
    metrics = tuple(metrics)
    for i, m in enumerate(metrics):
        if m not in METRIC_NAMES:
            raise ValueError(f"metrics[{i}]: unknown metric group {m!r}, expected some of {METRICS}")
    if not metrics:
        raise ValueError(f"metrics: expected at least one of {METRICS}, got none")
    return metrics


def _square(p: torch.Tensor, mask):
    """A non-square ``[B, H, Nq, Nk]`` (cross-attention) embedded in ``[B, H, M, M]``, the rest masked out.

    The dense statistics take square matrices; the added rows have no valid entry (absent) and the
    added columns are masked, so entropy, moments and the log-normal fit are those of ``p`` itself.
    """
    b, h, nq, nk = p.shape
    if nq == nk:
        return p, mask
    m = max(nq, nk)
    big = p.new_zeros((b, h, m, m))
    big[..., :nq, :nk] = p
    valid = torch.zeros((b, h, m, m), dtype=torch.bool, device=p.device)
    valid[..., :nq, :nk] = True if mask is None else mask
    return big, valid


def lognormal_fields(fit) -> dict:
    """The metric names of the log-normal group, mapped to the fields of a LogNormalFit."""
    return {
        "lognormal_mu": fit.mu,
        "lognormal_sigma": fit.sigma,
        "lognormal_ks": fit.ks_statistic,
        "lognormal_ks_pvalue": fit.ks_pvalue,
        "lognormal_ad": fit.ad_statistic,
        "lognormal_skew": fit.skew,
        "lognormal_excess_kurtosis": fit.excess_kurtosis,
    }


def moment_fields(mom) -> dict:
    """The metric names of the moments group, mapped to the fields of an EntryMoments."""
    return {"p_mean": mom.mean, "p_var": mom.var, "logp_mean": mom.log_mean, "logp_var": mom.log_var}


# A record whose matrices have at least this many tokens (max(Nq, Nk)) gets its softmax statistics
# from q, k by the streaming functions, as record(..., store="stats") computes them, instead of from
# the dense P. Measured on a shared 2-core CPU, one thread, d = 32, Gaussian q, k, entropy + moments +
# lognormal, seconds per head, dense vs streaming: N = 512: 0.38 vs 0.45; 1024: 0.53–1.02 vs
# 0.51–0.53; 2048: 1.06–1.13 vs 0.64–0.70; 4096: 3.2 vs 1.2, with a peak of 1.5 GiB vs 0.2 GiB for
# 4 heads (entropy and moments alone: 0.16 vs 0.08 s at 1024). The spectral gap then comes from
# attnstats.spectral_gap_from_qk, whose method="auto" picks LAPACK on P or a matrix-free solver by its own rule;
# with the gap too, one head: N = 1536: 3.5 vs 2.0 s; 2048: 5.8 vs 1.6 s.
STREAMING_FROM_TOKENS = 1024
# On a GPU the streaming path (fused kernel, GPU sampler) is the faster one sooner: one causal call
# [1, 32, N, 64] bf16 on an H100 with entropy, moments, log-normal fit and gap, dense vs streaming, ms:
# N = 64: 15.6 vs 7.2; 128: 14.4 vs 8.4; 256: 9.5 vs 6.3; 512: 270 vs 7.4 (dense samples ln P
# matrix by matrix past 316 tokens) (benchmarks/crossover_gpu.py). The dense path of the whole batch
# at once stays below 256 tokens, where a batch of many short sequences would otherwise pay the
# streaming pass once per sequence.
STREAMING_FROM_TOKENS_CUDA = 256


def is_short(rec) -> bool:
    """Whether a record's matrices are small enough for the dense statistics: ``max(Nq, Nk) <
    STREAMING_FROM_TOKENS`` (``STREAMING_FROM_TOKENS_CUDA`` on a GPU) and ``[B, H, Nq, Nk]`` in the
    compute dtype within the memory budget.

    Short calls get every statistic from the dense ``P`` of the whole call at once, also under
    ``record(..., store="stats")``: at that size one batched computation costs less than the
    streaming passes, which run one batch element at a time.
    """
    b, h, nq, nk = rec.shape
    itemsize = torch.finfo(compute_dtype(rec.q)).bits // 8
    limit = STREAMING_FROM_TOKENS_CUDA if rec.q.is_cuda else STREAMING_FROM_TOKENS
    return max(nq, nk) < limit and b * h * nq * nk * itemsize <= get_memory_budget()


def uses_streaming(rec) -> bool:
    """Whether :func:`record_metrics` computes the softmax statistics of ``rec`` from q, k, without P.

    True when the streaming statistics give every metric of the dense path (no bias or softcap; no
    mask, key padding, causal; see :func:`gives_every_metric`) and the matrices are not
    :func:`is_short`: ``max(Nq, Nk) >= STREAMING_FROM_TOKENS``, or the dense ``[B, H, Nq, Nk]``
    matrix in the compute dtype would exceed the memory budget.
    """
    b, h, nq, nk = rec.shape
    if rec.q is None or rec.bias is not None or rec.softcap is not None or not gives_every_metric(rec.mask, nq, nk):
        return False
    return not is_short(rec)


def record_metrics(rec, metrics=METRICS, *, kernel=None, max_samples: int = 100_000, seed: int = 0) -> dict:
    """Statistics of one record (or of ``kernel`` on its q, k): metric name -> float64 tensor ``[B, H]``.

    Softmax statistics come from the dense matrix, or from q, k by the streaming functions when the
    matrices are large (:func:`uses_streaming`); both give the same numbers (the log-normal fit on
    the same ``ln P`` entries). Kernels alongside use their own dense matrix and gap.

    Metrics that a record cannot give are left out: ``spectral_gap`` of a non-square (cross-attention)
    matrix, ``sink_mass`` of a record without sinks, the temperature and every kernel alongside of a
    record without q, k (P-only: the dense statistics of ``rec.probs()``), and with ``store="stats"``
    the groups not computed during the forward (``metrics=`` of :func:`attnstats.record`) and the
    ``spectral_gap`` of a layer whose mask is neither key padding nor causal (warned about during the
    forward). A record with sinks counts the sink as one more key (see the module docstring).
    """
    metrics = check_metrics(metrics)
    b, h, nq, nk = rec.shape
    out: dict = {}
    if kernel is not None and rec.q is None:
        return out  # kernels run on q, k, which a P-only record does not hold
    sinks = getattr(rec, "sinks", None) if kernel is None else None  # kernels alongside run without the sink
    if sinks is not None:
        sinks = _sink_logits(sinks, (b, h, nq), rec.name)
    if rec.stats is not None:  # store="stats": computed during the forward pass
        drawn = (getattr(rec.stats, "max_samples", max_samples), getattr(rec.stats, "seed", seed))
        if "lognormal" in metrics and "lognormal_mu" in rec.stats and drawn != (max_samples, seed):
            raise ValueError(
                f"max_samples, seed: record {rec.name!r} was captured with store='stats', whose ln P sample was "
                f"drawn during the forward with max_samples={drawn[0]}, seed={drawn[1]}; frame() cannot redraw it "
                f"with max_samples={max_samples}, seed={seed}"
            )
        for group in metrics:
            if group == "temperature":
                continue
            for name in METRIC_NAMES[group]:
                if name in rec.stats:
                    out[name] = rec.stats[name]
    elif kernel is None and uses_streaming(rec):
        groups = [g for g in metrics if g != "temperature"]
        if groups:
            with torch.no_grad():
                out.update(
                    streaming_values(rec.q, rec.k, rec.mask, rec.is_causal, rec.scale, groups, rec.name, max_samples, seed,
                                     sinks=sinks)
                )
    else:
        needs_p = [g for g in metrics if g in ("entropy", "lognormal", "moments") or (g == "spectral_gap" and nq == nk)
                   or (g == "sinks" and sinks is not None)]
        if needs_p:
            mask = rec.stats_mask()
            if kernel is None:
                device = (rec.q if rec.q is not None else rec.p).device  # a P-only record holds rec.p
                p = rec.probs(dtype=torch.float64 if device.type == "cpu" else torch.float32)
            else:
                p = kernel_probs(rec, kernel)
        if needs_p and sinks is not None:
            out.update(_sink_dense_values(p, mask, metrics, max_samples, seed, rec.name))
        elif needs_p:
            out.update(_dense_values(p, mask, metrics, max_samples, seed, rec, kernel))
    if "temperature" in metrics and kernel is None and rec.sigma_q is not None and rec.sigma_k is not None:
        out["sigma_q"] = rec.sigma_q
        out["sigma_k"] = rec.sigma_k
        out["temperature"] = 1.0 / (rec.sigma_q * rec.sigma_k)
    order = [n for g in metrics for n in METRIC_NAMES[g]]
    return {n: out[n].detach().to("cpu", torch.float64).reshape(b, h) for n in order if n in out}


def _dense_values(p, mask, metrics, max_samples, seed, rec, kernel) -> dict:
    """The dense statistics of ``p: [B, H, Nq, Nk]`` with the record's stats ``mask``: ``p`` is checked and
    renormalised once (:func:`attnstats.stats.dense.prepare_probs`) and every statistic reads that, where
    the public functions would each check it again (on the CPU the three extra checks of a 16 × 64-token
    MiniLM batch cost ~0.1 s, about two thirds of its forward). The same numbers as :func:`row_entropy`,
    :func:`spectral_gap`, :func:`entry_moments` and :func:`lognormal_fit` of ``p`` (tested)."""
    b, h, nq, nk = p.shape
    if nq != nk:
        p, mask = _square(p, mask)
    n = p.shape[-1]
    if "lognormal" in metrics:
        check_sampling(max_samples, seed)
    x, m = prepare_probs(p, mask)  # [B, H, N, N] in the compute dtype; m expanded or None
    flat = x.view(-1, n, n)
    flat_mask = None if m is None else m.reshape(-1, n, n)
    out = {}
    if "entropy" in metrics:  # rows with no valid entry are NaN
        rows = entropy_of_blocks(checked_blocks(flat, flat_mask, copy=False), (b, h), n, x.dtype, x.device)
        out["entropy"] = torch.nanmean(rows, -1)
    if "spectral_gap" in metrics and nq == nk:
        if kernel is not None and getattr(kernel, "name", "softmax") != "softmax":
            out["spectral_gap"] = kernel_gap(rec, kernel)
        else:
            check_dense_fits(p.shape, 8, "the float64 copy of p that spectral_gap solves")  # as spectral_gap checks
            out["spectral_gap"] = gap_of_probs(x, m, p.dtype)
    if "moments" in metrics:
        out.update(moment_fields(moments_of_blocks(checked_blocks(flat, flat_mask), (b, h), n, x.dtype, x.device)))
    if "lognormal" in metrics:
        def blocks():  # the fit only reads them: views, no copies
            return checked_blocks(flat, flat_mask, copy=False)

        fit = fit_of_blocks(blocks, (b, h), n, flat_mask, max_samples, seed, x.device)
        out.update(lognormal_fields(fit))
    return out


def _sink_logits(sinks, shape, name) -> torch.Tensor:
    """A record's ``sinks`` as a ``[B, H, Nq]`` view, after the checks: a float tensor, no NaN, no ``+inf``."""
    if not isinstance(sinks, torch.Tensor) or not sinks.is_floating_point():
        got = type(sinks).__name__ if not isinstance(sinks, torch.Tensor) else f"a {sinks.dtype} tensor"
        raise TypeError(f"sinks: record {name!r}: expected a float tensor broadcastable to [B, H, Nq] = {list(shape)}, got {got}")
    try:
        s = sinks.detach().expand(shape)
    except RuntimeError:
        raise ValueError(
            f"sinks: record {name!r}: expected a tensor broadcastable to [B, H, Nq] = {list(shape)}, got shape "
            f"{tuple(sinks.shape)}"
        ) from None
    bad = torch.isnan(s) | torch.isposinf(s)  # -inf is a sink that takes nothing
    if bool(bad.any()):
        idx = first_index(bad)
        raise ValueError(f"sinks: record {name!r}: expected finite logits or -inf, found {s[idx].item()} at index {idx}")
    return s


def _sink_dense_values(p, mask, metrics, max_samples, seed, name) -> dict:
    """Statistics of a record with sinks from its key columns ``p: [B, H, Nq, Nk]`` (rows sum to ``1 − p_sink``).

    ``mask``: the record's stats mask (bool, broadcastable to ``p``) or None. The sink counts as one
    more key (module docstring); its probability is ``1 − Σ_j p_ij``, exact to the rounding of ``p``'s
    dtype (float64 on the CPU), which needs no second pass over the scores and holds for P-only records.
    """
    b, h, nq, nk = p.shape
    valid = torch.ones(p.shape, dtype=torch.bool, device=p.device) if mask is None else mask.expand(p.shape)
    keys = p.masked_fill(~valid, 0.0)  # [B, H, Nq, Nk]
    rows = valid.any(-1)  # [B, H, Nq] valid query rows
    key_mass = keys.sum(-1)  # [B, H, Nq]
    over = key_mass > 1 + row_sum_tolerance(p.dtype, nk + 1)  # within rounding of 1: a sink of mass 0
    if bool(over.any()):
        idx = first_index(over)
        raise ValueError(
            f"record {name!r}: row {idx} of the key columns sums to {key_mass[idx].item()!r}; with sinks, "
            "expected at most 1 (1 − the sink's probability)"
        )
    sink = (1.0 - key_mass).clamp_min(0.0).masked_fill(~rows, 0.0)  # [B, H, Nq]
    out = {}
    if "sinks" in metrics:
        out["sink_mass"] = torch.nanmean(sink.masked_fill(~rows, float("nan")), -1)
    if "entropy" in metrics:
        # the whole row, keys then the sink, is a distribution: the dense entropy reads it as any P
        full = torch.cat([keys, sink[..., None]], -1)  # [B, H, Nq, Nk + 1]
        full_valid = torch.cat([valid, rows[..., None]], -1)
        full, full_valid = _square(full, full_valid)
        out["entropy"] = torch.nanmean(row_entropy(full, full_valid)[..., :nq], -1)
    if "spectral_gap" in metrics and nq == nk:
        empty = rows & (key_mass == 0)
        if bool(empty.any()):
            raise ValueError(
                f"record {name!r}: row {first_index(empty)} gives all its probability to the sink; the spectral "
                "gap of its key block (rows divided by their sums) is undefined"
            )
        out["spectral_gap"] = spectral_gap(keys / torch.where(rows, key_mass, 1.0)[..., None], mask)
    if "moments" in metrics or "lognormal" in metrics:
        if "lognormal" in metrics:
            check_sampling(max_samples, seed)
        moments, logs = [], []
        for t in range(b * h):  # one matrix at a time: temporaries of one N×N, not of the batch
            bi, hi = divmod(t, h)
            v = keys[bi, hi][valid[bi, hi]].to(torch.float64)  # valid key entries, row-major (as log_entries)
            if v.numel() == 0:
                raise no_valid_entry((bi, hi))
            if "moments" in metrics:
                moments.append(_value_moments(v))
            if "lognormal" in metrics:
                if v.numel() > max_samples:  # the entries the dense and streaming fits draw for matrix t
                    v = v[sample_ranks(v.numel(), max_samples, seed, t, device=v.device)]
                logs.append(torch.log(v[v > 0]).cpu())
        if moments:
            table = torch.tensor(moments, dtype=torch.float64).reshape(b, h, 5)
            zeros = int(table[..., 4].sum())
            if zeros:
                warnings.warn(
                    f"record {name!r}: {zeros} valid entries of p are exactly 0 (log = -inf); they are left out "
                    "of logp_mean and logp_var",
                    RuntimeWarning,
                    stacklevel=3,
                )
            out.update(dict(zip(("p_mean", "p_var", "logp_mean", "logp_var"), table.unbind(-1))))
        if logs:
            out.update(lognormal_fields(fits_per_matrix(logs, (b, h))))
    return out


def _value_moments(v: torch.Tensor) -> list:
    """``[mean, var, mean of ln, var of ln, zeros]`` of 1-d float64 entries (population variances; zeros left
    out of the log moments, as :func:`attnstats.entry_moments` does)."""
    mean = v.mean()
    logs = torch.log(v[v > 0])
    log_mean = logs.mean() if logs.numel() else torch.tensor(float("nan"), dtype=v.dtype)
    return [float(mean), float((v - mean).square().mean()), float(log_mean), float((logs - log_mean).square().mean()),
            float(v.numel() - logs.numel())]


def _qk_spectral_gap(q, k, scale, causal, lse):
    """Spectral gap of one self-attention ``[1, H, N, d]`` without the matrix."""
    if causal:  # lower-triangular: the eigenvalues are the diagonal P_ii = exp(s_ii - LSE_i)
        return causal_spectral_gap(torch.exp(diagonal_log_probs(q, k, scale, lse)))
    return spectral_gap_from_qk(q, k, scale=scale, causal=False).gap


def gives_every_metric(mask, nq: int, nk: int) -> bool:
    """Whether the streaming statistics of a call give every metric the dense path gives.

    They do without a mask, with key padding shared by the heads (pad tokens are compacted away), and
    in cross-attention with key padding (no spectral gap either way). Another mask leaves the spectral
    gap out, and a per-head key padding in self-attention would keep pad tokens as queries.
    """
    if mask is None:
        return True
    return is_key_padding(mask) and (mask.shape[1] == 1 or nq != nk)


def warn_no_gap(name: str) -> None:
    """The warning of ``record(store="stats")`` for a layer whose spectral gap it leaves out."""
    warnings.warn(
        f"record(store='stats'): layer {name!r} has a mask that is not key padding (+ causal) or is "
        "cross-attention; its spectral gap is not computed without the matrix (use store='qk')",
        RuntimeWarning,
        stacklevel=4,
    )


def streaming_values(q, k, mask, causal, scale, groups, name, max_samples=100_000, seed=0, sinks=None, defer=False):
    """Statistics of one call from ``q: [B, H, Nq, d]``, ``k: [B, H, Nk, d]``, canonical mask, no N×N matrix.

    Args:
        groups: metric groups of :data:`METRIC_NAMES` to compute (``"temperature"`` is ignored).
        name: the layer, for the warning when a mask leaves the spectral gap out.
        max_samples, seed: of the log-normal fit (the sample of matrix ``(b, h)`` is that of
            :func:`attnstats.lognormal_fit` on the dense batch: same entries).
        sinks: attention-sink logits broadcastable to ``[B, H, Nq]``, or None. The sink counts as one
            more key, as on the dense path (module docstring): ``LSE' = logaddexp(LSE, sink)`` is the
            row's normaliser, and ``sink_mass`` (group ``"sinks"``) is computed too.

        defer: leave every host sync for later (``record(..., store="stats")`` during the forward):
            the values stay on the device, the finiteness of q, k is not read, and the log-normal
            sample is drawn and fitted but its KS p-values are left for later.

    Returns:
        metric name -> float64 CPU tensor ``[B, H]``, equal to what the dense statistics give on the
        record's :meth:`~attnstats.capture.AttentionRecord.stats_mask`. With ``defer``:
        ``(values on the device, PendingStats)``, the pending part finished by
        :func:`attnstats.capture.stats_store.finish_pending`.
    """
    b = max(q.shape[0], k.shape[0])
    h, nq, nk = q.shape[1], q.shape[2], k.shape[2]
    q = q.expand(b, *q.shape[1:])
    k = k.expand(b, *k.shape[1:])
    keypad = mask is not None and is_key_padding(mask)
    compact = keypad and nq == nk and mask.shape[1] == 1
    if sinks is not None:
        sinks = _sink_logits(sinks, (b, h, nq), name)
    per_batch: list[dict] = []
    pending = PendingStats(shape=(b, h))
    for bi in range(b):
        qb, kb = q[bi : bi + 1], k[bi : bi + 1]
        m = None if mask is None else mask[bi : bi + 1] if mask.shape[0] > 1 else mask
        sb = None if sinks is None else sinks[bi : bi + 1]  # [1, H, Nq]
        if compact:
            idx = torch.nonzero(m[0, 0, 0], as_tuple=False)[:, 0]
            qb, kb, m = qb[:, :, idx], kb[:, :, idx], None
            sb = None if sb is None else sb[:, :, idx]
        if sb is None and defer and m is None:  # nothing read on the host: a CUDA graph once the shape repeats
            vals, finite, fit = _deferred_element(qb, kb, scale, causal, groups, max_samples, seed, bi * h)
            pending.finite.append(finite)
            if fit is not None:
                pending.fits.append(fit)
            if "spectral_gap" in groups and qb.shape[2] != kb.shape[2] and bi == 0:
                warn_no_gap(name)
            elif "spectral_gap" in groups and not causal:  # the matrix-free solvers read the device
                vals["spectral_gap"] = _qk_spectral_gap(qb, kb, scale, causal, None).to(q.device, torch.float64).reshape(1, h)
            per_batch.append(vals)
            continue
        if sb is None:
            st = streaming_stats(qb, kb, scale=scale, mask=m, causal=causal)
            entropy, moments, lse, log_lse = st.entropy, st.entry_moments, st.lse, st.lse
        else:
            entropy, moments, lse, log_lse, sink_p = _streaming_with_sink(qb, kb, scale, m, causal, sb)
        vals = {}
        if "entropy" in groups:
            vals["entropy"] = torch.nanmean(entropy, -1)  # rows with no valid key are NaN
        if "moments" in groups:
            vals.update(moment_fields(moments))
        if "sinks" in groups and sb is not None:
            vals["sink_mass"] = torch.nanmean(sink_p, -1)
        square_self = m is None and qb.shape[2] == kb.shape[2]  # pad tokens compacted away, or none
        if "spectral_gap" in groups and square_self:
            vals["spectral_gap"] = _qk_spectral_gap(qb, kb, scale, causal, lse)  # of the key block renormalised
        elif "spectral_gap" in groups and bi == 0:
            warn_no_gap(name)
        if "lognormal" in groups:
            # matrix (bi, h) of the whole batch: the dense fit draws its sample from the same generator
            fit = streaming_lognormal_fit(
                qb, kb, scale=scale, mask=m, causal=causal, lse=log_lse, max_samples=max_samples, seed=seed,
                first_matrix=bi * h,
            )
            vals.update(lognormal_fields(fit))
        where = q.device if defer else "cpu"
        per_batch.append({key: v.detach().to(where, torch.float64).reshape(1, h) for key, v in vals.items()})
    values = {key: torch.cat([pb[key] for pb in per_batch]) for key in per_batch[0]} if per_batch else {}
    return (values, pending) if defer else values


def _deferred_element(qb, kb, scale, causal, groups, max_samples, seed, first):
    """The statistics of one batch element ``qb: [1, H, Nq, d]``, ``kb: [1, Hk, Nk, d]`` (no mask, no
    sink) with nothing read on the host: ``(values {name: [1, H] float64 on the device}, finiteness flag
    (0-d bool), (LogNormalFit, bad) of the sample without its KS p-values, or None)``. The spectral gap
    is computed only when causal and square; a non-causal one is left to the caller (its solvers read
    the device). On a GPU the device work runs as one CUDA graph replay
    (:data:`attnstats.cuda_graphs.SHARED`) giving one packed float64 tensor ``[names…, finite, fit
    fields…, n, bad]``, each part ``H`` long (finite: 1)."""
    h = qb.shape[1]
    names = [n for g in ("entropy", "moments") if g in groups for n in METRIC_NAMES[g]]
    if "spectral_gap" in groups and causal and qb.shape[2] == kb.shape[2]:
        names.append("spectral_gap")
    lognormal = "lognormal" in groups
    fields = [f for f in LogNormalFit.__dataclass_fields__ if f not in ("ks_pvalue", "n")]

    def packed(q, k):
        st, finite = streaming_stats_unchecked(q, k, scale=scale, causal=causal)
        vals = {}
        if "entropy" in groups:
            vals["entropy"] = torch.nanmean(st.entropy, -1)  # rows with no valid key are NaN
        if "moments" in groups:
            vals.update(moment_fields(st.entry_moments))
        if "spectral_gap" in names:  # of the key block renormalised
            vals["spectral_gap"] = _qk_spectral_gap(q, k, scale, causal, st.lse)
        parts = [vals[n].to(torch.float64).reshape(h) for n in names] + [finite.to(torch.float64).reshape(1)]
        if lognormal:  # drawn and fitted now; the p-values of every layer's fits after the forward
            table, counts = log_prob_table(q, k, scale, None, causal, st.lse, max_samples, seed, first, check_values=False)
            fit, bad = _fit_batched(table, counts, trusted=True, pvalues=False)
            parts += [getattr(fit, f).to(torch.float64) for f in fields] + [fit.n.to(torch.float64), bad.to(torch.float64)]
        return (torch.cat(parts),)

    key = ("store_stats", scale, causal, tuple(names), lognormal, max_samples, seed, first)
    (flat,) = cuda_graphs.SHARED(key, packed, qb, kb)  # one replay per layer once the shape repeats
    cut = len(names) * h
    vals = {n: flat[i * h : (i + 1) * h].reshape(1, h) for i, n in enumerate(names)}
    finite = flat[cut] == 1.0
    if not lognormal:
        return vals, finite, None
    rest = flat[cut + 1 :].reshape(len(fields) + 2, h)
    nan = torch.full((h,), float("nan"), dtype=torch.float64, device=flat.device)
    fit = LogNormalFit(**dict(zip(fields, rest)), ks_pvalue=nan, n=rest[-2].to(torch.int64))
    return vals, finite, (fit, rest[-1] == 1.0)


@dataclasses.dataclass
class PendingStats:
    """What :func:`streaming_values` with ``defer=True`` leaves for after the forward pass.

    Attributes:
        shape: ``(B, H)`` of the call.
        finite: 0-d bool device tensors, False where q or k held a NaN or Inf.
        fits: the log-normal fits of the samples, per batch element: ``(LogNormalFit, bad)`` with
            ``[H]`` fields on the device, their KS p-values not yet computed.
        done: set once the pending part has been read.
    """

    shape: tuple
    finite: list = dataclasses.field(default_factory=list)
    fits: list = dataclasses.field(default_factory=list)
    done: bool = False



def _streaming_with_sink(q, k, scale, mask, causal, sink):
    """Row statistics of one call ``q: [1, H, Nq, d]`` whose softmax has a sink column of logits ``sink: [1, H, Nq]``.

    Returns ``(entropy [1, H, Nq], EntryMoments [1, H], LSE, LSE', p_sink [1, H, Nq])``: ``LSE`` of the keys
    alone (the key block renormalised, whose spectral gap is reported), ``LSE' = logaddexp(LSE, sink)``
    of keys and sink (``ln P'_ij = s_ij − LSE'_i``, the key entries the model used). With ``c_i =
    e^{LSE − LSE'}`` the keys' share, ``H'_i = c_i H_i − c_i ln c_i − p_i ln p_i`` (``H_i`` the entropy over
    the keys alone). Rows with no valid key are NaN.
    """
    rows, _, _ = streaming_row_accumulators(q, k, scale=scale, mask=mask, causal=causal)
    if mask is not None and bool((rows.count.sum(-1) == 0).any()):
        raise no_valid_entry((rows.count.sum(-1) == 0).nonzero()[0].tolist())
    sink = sink.to(rows.lse.dtype)
    lse_all = torch.logaddexp(rows.lse, sink)  # [1, H, Nq]
    mass = torch.exp(rows.lse - lse_all)  # [1, H, Nq] the keys' share, 1 − p_sink
    sink_p = torch.exp(sink - lse_all)  # [1, H, Nq]
    entropy = mass * rows.entropy - torch.special.xlogy(mass, mass) - torch.special.xlogy(sink_p, sink_p)
    moments = moments_from_rows(dataclasses.replace(rows, lse=lse_all), mass=mass)
    return entropy, moments, rows.lse, lse_all, sink_p


# ----------------------------------------------------------------------------------------------
# kernels alongside, on a record's q and k


def _resolve(kernel):
    if isinstance(kernel, str):
        from .kernels import get_kernel

        return get_kernel(kernel)
    return kernel


def _qk(rec):
    b = rec.shape[0]
    q = rec.q.expand(b, *rec.q.shape[1:])
    k = rec.k.expand(b, *rec.k.shape[1:])
    dtype = compute_dtype(q)
    return q.to(dtype), k.to(dtype)


def kernel_probs(rec, kernel) -> torch.Tensor:
    """``kernel.matrix`` on the record's q, k: ``[B, H, Nq, Nk]`` row-stochastic over valid entries."""
    kernel = _resolve(kernel)
    q, k = _qk(rec)
    with torch.no_grad():
        return kernel.matrix(q, k, causal=rec.is_causal, mask=rec.stats_mask())


def kernel_gap(rec, kernel) -> torch.Tensor:
    """``kernel.spectral_gap`` on the record's q, k: ``[B, H]`` (exact r×r rule for linearised kernels)."""
    kernel = _resolve(kernel)
    q, k = _qk(rec)
    with torch.no_grad():
        return kernel.spectral_gap(q, k, causal=rec.is_causal, mask=rec.stats_mask())
