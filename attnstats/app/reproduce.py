"""Reproductions of the paper's figures. Each function measures, writes ``<out>/<name>.csv`` (the
numbers behind the picture) and ``<out>/<name>.png``, and returns the paths it wrote.

Deterministic from ``seed``; ``quick=True`` shrinks sizes so that each runs in seconds (for tests).
Full-size figures go to ``figures/`` and quick ones to ``figures-quick/`` unless ``out`` is given,
so that a quick run never replaces the committed full-size figures.
The scripts in ``analyses/`` and ``attnstats reproduce`` call these.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import theory
from . import plot
from .files import save_figure, write_csv
from .progress import progress
from ..metrics import moment_fields
from ..stats.spectral import spectral_gap
from ..stats.dense import entry_moments, row_entropy, softmax_attention

__all__ = ["FIGURES", "FULL_OUT", "QUICK_OUT", "default_out", "fig5a_moments", "fig5b_moment_matching",
           "fig2_kernels", "fig1_training", "lognormal_real", "concentration_real", "write_figure"]

FULL_OUT = "figures"
QUICK_OUT = "figures-quick"


def default_out(quick: bool) -> Path:
    """The output folder when none is given: ``figures-quick`` for quick runs, else ``figures``."""
    return Path(QUICK_OUT if quick else FULL_OUT)


def _out(out, quick: bool) -> Path:
    return default_out(quick) if out is None else Path(out)


def write_figure(df: pd.DataFrame, fig, out, name: str) -> list[Path]:
    """Write ``df`` to ``out/name.csv`` and ``fig`` to ``out/name.png``, each whole or not at all;
    return the two paths."""
    import matplotlib.pyplot as plt

    out = Path(out)
    csv = write_csv(df, out / f"{name}.csv")
    png = save_figure(fig, out / f"{name}.png")
    plt.close(fig)
    return [Path(csv), png]


def _gaussian(shape, sigma_q, sigma_k, gen):
    q = torch.randn(*shape, generator=gen, dtype=torch.float64) * sigma_q
    k = torch.randn(*shape, generator=gen, dtype=torch.float64) * sigma_k
    return q, k


def fig5a_moments(out=None, quick: bool = False, seed: int = 0) -> list[Path]:
    """Figure 5a: mean and variance of ``P`` and of ``ln P`` against the input variance ``σ_q²σ_k²``.

    Gaussian q, k (``σ_q = σ_k``), d = 64, N ∈ {256, 1024, 2048}, 14 values of σ² from 0.1 to 8
    (quick: N ∈ {64, 256}, 12 values, d = 32). Columns: ``n, d, sigma2, seed, metric, value,
    prediction, in_regime``.
    """
    ns, d, seeds = ([64, 256], 32, [seed]) if quick else ([256, 1024, 2048], 64, [seed, seed + 1])
    sigma2s = np.geomspace(0.1, 8.0, 12 if quick else 14)
    rows = []
    jobs = [(n, s2, sd) for n in ns for s2 in sigma2s for sd in seeds]
    for n, s2, sd in progress(jobs, desc="fig5a"):
        gen = torch.Generator().manual_seed(sd * 100_003 + n)
        s = s2**0.25
        q, k = _gaussian((n, d), s, s, gen)
        m = entry_moments(softmax_attention(q, k))
        pred = theory.sa_lognormal(s, s, n)
        inside = bool(theory.sa_lognormal_holds(s2, n))
        # measured and predicted moments under the frame's metric names (one spelling: metrics.moment_fields)
        predicted = moment_fields(pred)
        for metric, value in moment_fields(m).items():
            p = predicted[metric]
            rows.append(dict(n=n, d=d, sigma2=float(s2), seed=sd, metric=metric, value=float(value),
                             prediction=float(p), in_regime=inside))
    df = pd.DataFrame(rows)
    return write_figure(df, plot.moments_vs_variance(df), _out(out, quick), "fig5a_moments")


def fig5b_moment_matching(out=None, quick: bool = False, seed: int = 0) -> list[Path]:
    """Figure 5b: ``Var[ln P]`` of SA and of LLN before (α = β = 1) and after moment matching, by both
    rules (``lln``: the measured curve of the head dim; ``lln_paper``: the paper's line).

    Gaussian q, k (``σ_q = σ_k``), d = 64, N = 1024, the σ² sweep of Figure 5a, 3 seeds (quick:
    N = 256, 1 seed). Columns: ``n, d, sigma2, seed, kernel, metric, value``.
    """
    from ..kernels import get_kernel

    n, d, seeds = (256, 64, [seed]) if quick else (1024, 64, [seed, seed + 1, seed + 2])
    sigma2s = np.geomspace(0.1, 8.0, 12 if quick else 14)
    kernels = {name: get_kernel(name) for name in ("lln", "lln_paper", "lln_no_mm")}
    rows = []
    for s2, sd in progress([(s2, sd) for s2 in sigma2s for sd in seeds], desc="fig5b"):
        gen = torch.Generator().manual_seed(sd * 100_003 + int(s2 * 1000))
        s = s2**0.25
        q, k = _gaussian((1, 1, n, d), s, s, gen)
        mats = {"softmax": softmax_attention(q, k)} | {name: kern.matrix(q, k) for name, kern in kernels.items()}
        for name, p in mats.items():
            rows.append(dict(n=n, d=d, sigma2=float(s2), seed=sd, kernel=name, metric="logp_var",
                             value=float(entry_moments(p).log_var.mean())))
    df = pd.DataFrame(rows)
    return write_figure(df, plot.moment_matching(df), _out(out, quick), "fig5b_moment_matching")


FIG2_KERNELS = ("softmax", "lln", "lln_no_mm", "relu", "elu_plus_one", "performer")


def fig2_kernels(out=None, quick: bool = False, seed: int = 0) -> list[Path]:
    """Figure 2: mean row entropy and spectral gap of SA, LLN (with and without moment matching),
    ReLU, elu+1 and Performer attention against the temperature ``τ = 1/(σ_q σ_k)``.

    Gaussian q, k with ``σ_q = σ_k = τ^{-1/2}``, N = 256, d = 64, 12 temperatures from 0.2 to 5,
    5 seeds (quick: N = 64, 8 temperatures, 2 seeds). The spectral gap of linearised kernels is the
    exact r×r rule; of softmax, the dense eigen-solver. Columns: ``n, d, tau, seed, kernel, metric, value``.
    """
    from ..kernels import get_kernel

    n, d, seeds, taus = (64, 64, [seed, seed + 1], np.geomspace(0.2, 5, 8)) if quick else \
        (256, 64, list(range(seed, seed + 5)), np.geomspace(0.2, 5, 12))
    rows = []
    for sd in progress(seeds, desc="fig2"):
        kernels = {name: get_kernel(name, seed=sd) if name == "performer" else get_kernel(name) for name in FIG2_KERNELS}
        gen = torch.Generator().manual_seed(sd)
        z_q, z_k = _gaussian((1, 1, n, d), 1.0, 1.0, gen)
        for tau in taus:
            c = float(tau) ** -0.5
            q, k = z_q * c, z_k * c
            for name, kern in kernels.items():
                p = kern.matrix(q, k)
                gap = spectral_gap(p) if name == "softmax" else kern.spectral_gap(q, k)
                for metric, value in [("entropy", row_entropy(p).mean()), ("spectral_gap", gap.mean())]:
                    rows.append(dict(n=n, d=d, tau=float(tau), seed=sd, kernel=name, metric=metric, value=float(value)))
    df = pd.DataFrame(rows)
    return write_figure(df, plot.concentration_vs_temperature(df), _out(out, quick), "fig2_kernels")




def _minilm_batch(quick: bool, seed: int):
    """The packaged all-MiniLM-L6-v2 (SDPA attention) and a padded batch of documentation sentences."""
    from .corpus import sentences
    from .models import load_model

    model, tok = load_model()
    texts = sentences(4 if quick else 16, seed=seed)
    return model, tok(texts, padding=True, return_tensors="pt")


def lognormal_real(out=None, quick: bool = False, seed: int = 0) -> list[Path]:
    """Log-normality of the attention of all-MiniLM-L6-v2 on real sentences.

    Writes ``lognormal_real.png`` (histogram of ``ln P`` per layer with the fitted normal),
    ``lognormal_real_qq.png`` (normal Q-Q plot per layer) and ``lognormal_real.csv``: the
    :func:`attnstats.lognormal_fit` statistics per layer and head (valid entries of every sentence
    of the batch pooled per head), and per layer with ``head`` empty (all heads pooled). Columns:
    ``layer, head, metric, value``.
    """
    from ..capture import record
    from ..stats.lognormal import fit_log_values, log_entries

    model, batch = _minilm_batch(quick, seed)
    with torch.no_grad(), record(model) as rec:
        model(**batch)
    rows, samples, fits = [], [], []
    gen = np.random.default_rng(seed)
    for r in progress(rec.records, desc="lognormal_real"):
        p = r.probs()
        mask = None if r.mask is None else r.mask.expand(p.shape)
        per_matrix = log_entries(p, mask, max_samples=20_000 if quick else 100_000, seed=seed)
        b, h = p.shape[:2]
        per_head = [torch.cat(per_matrix[i::h]) for i in range(h)]  # matrices are ordered (batch, head)
        for head, vals in enumerate(per_head):
            rows += _fit_rows(fit_log_values(vals), r.layer, head)
        pooled = torch.cat(per_head).numpy()
        fit = fit_log_values(pooled)
        rows += _fit_rows(fit, r.layer, None)
        fits.append(dict(layer=r.layer, mu=fit.mu, sigma=fit.sigma))
        pick = gen.choice(pooled.size, size=min(pooled.size, 20_000), replace=False)
        samples.append(pd.DataFrame(dict(layer=r.layer, value=pooled[pick])))
    df = pd.DataFrame(rows).astype({"head": "Int64"})
    samples, fits = pd.concat(samples), pd.DataFrame(fits)
    import matplotlib.pyplot as plt

    qq = plot.qq_plots(samples)
    qq.suptitle("all-MiniLM-L6-v2: normal Q-Q plots of ln P per layer (on the line = log-normal entries)")
    out = _out(out, quick)
    qq_path = save_figure(qq, out / "lognormal_real_qq.png")
    plt.close(qq)
    fig = plot.log_histograms(samples, fits)
    fig.suptitle("all-MiniLM-L6-v2: log attention entries per layer (all heads, padded batch of sentences)")
    return write_figure(df, fig, out, "lognormal_real") + [qq_path]


def _fit_rows(fit, layer, head) -> list[dict]:
    names = ("mu", "sigma", "ks_statistic", "ks_pvalue", "ad_statistic", "skew", "excess_kurtosis", "n")
    return [dict(layer=layer, head=head, metric=name, value=float(getattr(fit, name))) for name in names]


def concentration_real(out=None, quick: bool = False, seed: int = 0) -> list[Path]:
    """Entropy and spectral gap per layer × head of all-MiniLM-L6-v2, softmax next to LLN attention
    evaluated alongside on the same captured q, k (batch mean over a padded batch of sentences).
    Columns: those of ``rec.frame()`` (``call, layer, name, kernel, head, batch, metric, value``).
    """
    from ..capture import record

    model, batch = _minilm_batch(quick, seed)
    with torch.no_grad(), record(model, alongside=["lln"]) as rec:
        model(**batch)
    df = rec.frame(metrics=("entropy", "spectral_gap"))
    fig = plot.layer_head_heatmaps(df, title="all-MiniLM-L6-v2: concentration per layer and head, "
                                             "softmax vs LLN on the same q, k (mean over sentences)")
    return write_figure(df, fig, _out(out, quick), "concentration_real")



def _mlm_batches(tok, seq_len: int, batch: int, steps: int, seed: int, vocab: int = 4096):
    """Masked-language-model batches from the documentation text, and the vocabulary size.

    Tokens are renumbered by frequency and the ``vocab`` most frequent kept (the rest become one
    unknown id), which keeps the output layer small enough for a CPU. 15 % of positions are
    predicted; of those 80 % become the mask id, 10 % a random id, 10 % stay (the BERT recipe).
    """
    from .corpus import documentation_text

    raw = torch.tensor(tok(documentation_text(), add_special_tokens=False, verbose=False)["input_ids"])
    ids, counts = raw.unique(return_counts=True)
    order = ids[counts.argsort(descending=True)][:vocab]
    pad, unk, mask_id = 0, 1, 2  # ids 0–2 are reserved; corpus tokens start at 3
    table = torch.full((int(raw.max()) + 1,), unk)
    table[order] = torch.arange(3, 3 + len(order))
    stream = table[raw]
    size = 3 + len(order)
    chunks = stream[: len(stream) // seq_len * seq_len].view(-1, seq_len)

    def batches():
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            x = chunks[torch.randint(len(chunks), (batch,), generator=gen)].clone()
            chosen = torch.rand(x.shape, generator=gen) < 0.15
            labels = torch.where(chosen, x, torch.full_like(x, -100))
            r = torch.rand(x.shape, generator=gen)
            x[chosen & (r < 0.8)] = mask_id
            swap = chosen & (r >= 0.8) & (r < 0.9)
            x[swap] = torch.randint(3, size, (int(swap.sum()),), generator=gen)
            yield x, labels

    return batches(), size, pad


def _train_encoder(kernel: str, tok, steps: int, seed: int, sizes: dict) -> pd.DataFrame:
    """Train a small RoBERTa-style encoder (one head per layer) with MLM; record its attention at
    every step. ``kernel`` is ``"softmax"`` or an attnstats kernel swapped in with ``use_kernel``."""
    import contextlib

    import transformers

    from ..capture import record
    from ..kernels.swap import use_kernel

    torch.manual_seed(seed)
    batches, vocab_size, pad_id = _mlm_batches(tok, sizes["seq"], sizes["batch"], steps, seed)
    config = transformers.RobertaConfig(
        vocab_size=vocab_size, hidden_size=sizes["hidden"], num_hidden_layers=sizes["layers"],
        num_attention_heads=1, intermediate_size=4 * sizes["hidden"], max_position_embeddings=sizes["seq"] + 2,
        pad_token_id=pad_id, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    config._attn_implementation = "sdpa"
    model = transformers.RobertaForMaskedLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=sizes["lr"], weight_decay=0.01)
    alongside = [] if kernel == "softmax" else [kernel]
    rows = []
    swap = contextlib.nullcontext() if kernel == "softmax" else use_kernel(model, kernel)
    with swap:
        for step, (x, labels) in enumerate(progress(batches, total=steps, desc=f"fig1 {kernel}")):
            with record(model, alongside=alongside) as rec:
                loss = model(input_ids=x, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            f = rec.frame(metrics=("entropy", "spectral_gap", "temperature"), head="mean")
            if "kernel" in f:  # the model computes `kernel`: its statistics, and q, k's temperature
                f = f[((f.kernel == kernel) & f.metric.isin(["entropy", "spectral_gap"])) |
                      ((f.kernel == "softmax") & (f.metric == "temperature"))]
            f = f[f.metric.isin(["entropy", "spectral_gap", "temperature"])]
            rows += [dict(step=step, layer=int(r.layer), kernel=kernel, metric=r.metric, value=float(r.value))
                     for r in f.itertuples()]
            rows.append(dict(step=step, layer=-1, kernel=kernel, metric="loss", value=float(loss.detach())))
    return pd.DataFrame(rows)


def fig1_training(out=None, quick: bool = False, seed: int = 0) -> list[Path]:
    """Figure 1: temperature, entropy and spectral gap of every layer at every training step of a
    small RoBERTa-style encoder (4 layers, hidden 64, one head per layer, MLM on the Python
    documentation text, sequences of 64 tokens, batch 16, 300 steps; quick: 2 layers, 6 steps),
    trained once with softmax and once with LLN attention from the same initial weights. Text is
    tokenized with the packaged all-MiniLM-L6-v2 tokenizer; its 4096 most frequent tokens form the
    vocabulary. Columns: ``step, layer, kernel, metric, value`` (metric ``loss``
    has layer −1).
    """
    from .models import load_model

    _, tok = load_model()
    sizes = dict(hidden=64, layers=4, seq=64, batch=16, lr=1e-3)
    steps = 300
    if quick:
        sizes.update(layers=2, seq=32, batch=4)
        steps = 6
    df = pd.concat([_train_encoder(k, tok, steps, seed, sizes) for k in ("softmax", "lln")], ignore_index=True)
    return write_figure(df, plot.training_curves(df[df.metric != "loss"]), _out(out, quick), "fig1_training")


FIGURES = {
    "fig1": fig1_training,
    "fig5a": fig5a_moments,
    "fig5b": fig5b_moment_matching,
    "fig2": fig2_kernels,
    "lognormal": lognormal_real,
    "concentration": concentration_real,
}
