"""The figures of attnstats, drawn from the tidy long-format DataFrames of :mod:`attnstats.reproduce`
and ``rec.frame()``. Each function returns a matplotlib Figure; save it with
:func:`attnstats.files.save_figure` (written whole or not at all).
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "moments_vs_variance",
    "moment_matching",
    "concentration_vs_temperature",
    "training_curves",
    "log_histograms",
    "qq_plots",
    "layer_head_heatmaps",
]

_STYLE = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 8,
    "axes.grid": True,
    "grid.alpha": 0.3,
}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    plt.rcParams.update(_STYLE)
    return plt


def _log_ticks(ax, values):
    """Log x axis with plain-number ticks at 1-2-5 steps inside the data range."""
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    ax.set_xscale("log")
    lo, hi = float(np.min(values)), float(np.max(values))
    ticks = [m * 10.0**e for e in range(-3, 4) for m in (1, 2, 5) if lo * 0.999 <= m * 10.0**e <= hi * 1.001]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())


def moments_vs_variance(df):
    """Figure 5a: the four entry moments of softmax attention against the score variance ``σ²``.

    Args:
        df: columns ``n, sigma2, metric, value, prediction, in_regime`` with metric in
            ``mean_p, var_p, log_mean_p, log_var_p`` (one row per N, σ², seed and metric).
    """
    plt = _plt()
    panels = [
        ("mean_p", lambda v, n: v * n, "N · mean of P", "exactly 1 (rows sum to 1)", False),
        ("var_p", lambda v, n: v * n * n, "N² · Var[P]", r"prediction $e^{\sigma^2} - 1$", True),
        ("log_mean_p", lambda v, n: v + np.log(n), "mean of ln P + ln N  (nats)", "prediction −σ²/2", False),
        ("log_var_p", lambda v, n: v, "Var[ln P]", "prediction σ²", False),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5), constrained_layout=True)
    ns = sorted(df.n.unique())
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(ns)))
    for ax, (metric, norm, label, pred_label, logy) in zip(axes.ravel(), panels):
        sub = df[df.metric == metric]
        for n, c in zip(ns, colors):
            g = sub[sub.n == n].groupby("sigma2").agg(value=("value", "mean"), prediction=("prediction", "first"),
                                                      in_regime=("in_regime", "first")).reset_index()
            y = norm(g.value.to_numpy(), n)
            inside = g.in_regime.to_numpy(bool)
            ax.plot(g.sigma2[inside], y[inside], "o", color=c, ms=5, label=f"measured, N = {n}")
            ax.plot(g.sigma2[~inside], y[~inside], "o", mfc="none", color=c, ms=5,
                    label=f"N = {n}, outside regime" if (~inside).any() else None)
            ax.plot(g.sigma2, norm(g.prediction.to_numpy(), n), "-", color=c, lw=1, alpha=0.8)
        ax.plot([], [], "-", color="gray", label=pred_label + " (lines)")
        _log_ticks(ax, df.sigma2)
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel("score variance σ² = σ_q² σ_k²")
        ax.set_ylabel(label)
        # the markers are the same in every panel: their legend once, elsewhere only the prediction's
        ax.legend(loc="best") if metric == "var_p" else ax.legend(handles=ax.get_lines()[-1:], loc="best")
    fig.suptitle("Softmax attention entries vs input variance (Gaussian q, k): measured vs log-normal prediction\n"
                 r"hollow markers: $(e^{\sigma^2} - 1)/N > 0.01$, where the prediction is not expected to hold")
    return fig


def moment_matching(df):
    """Figure 5b: ``Var[ln P]`` of SA and of LLN before and after moment matching, against ``σ²``.

    Args:
        df: columns ``sigma2, kernel, value`` (value = Var[ln P], one row per σ², seed and kernel),
            kernels ``softmax``, ``lln_no_mm``, ``lln``.
    """
    plt = _plt()
    names = {"softmax": ("softmax (SA)", "k", "o"), "lln": ("LLN, moment matched", "tab:blue", "s"),
             "lln_no_mm": ("LLN, α = β = 1 (before matching)", "tab:red", "^")}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for kernel, (label, color, marker) in names.items():
        g = df[df.kernel == kernel].groupby("sigma2").value.agg(["mean", "std"]).reset_index()
        for ax in axes:
            ax.errorbar(g.sigma2, g["mean"], yerr=g["std"].fillna(0), color=color, marker=marker, ms=4, lw=1,
                        capsize=2, label=label)
    s = np.sort(df.sigma2.unique())
    axes[0].plot(s, s, "--", color="gray", lw=1, label="SA prediction σ²")
    axes[0].set_xlabel("score variance σ² = σ_q² σ_k²")
    axes[0].set_ylabel("Var[ln P]")
    axes[0].set_title("linear axes")
    _log_ticks(axes[1], df.sigma2)
    axes[1].set_yscale("log")
    axes[1].set_xlabel("score variance σ² = σ_q² σ_k²")
    axes[1].set_ylabel("Var[ln P]")
    axes[1].set_title("log axes")
    axes[0].legend()
    n, d = df.n.iloc[0], df.d.iloc[0]
    fig.suptitle(f"Variance of log attention: SA vs LLN before and after moment matching (N = {n}, d = {d})")
    return fig


def concentration_vs_temperature(df):
    """Figure 2: mean row entropy and spectral gap of each kernel against temperature.

    Args:
        df: columns ``tau, kernel, seed, metric, value`` with metric ``entropy`` (nats) and
            ``spectral_gap``; ``n`` for the title.
    """
    plt = _plt()
    labels = {"softmax": "softmax (SA)", "lln": "LLN, moment matched", "lln_no_mm": "LLN, α = β = 1",
              "relu": "linear, ReLU", "elu_plus_one": "linear, elu + 1", "exp": "linear, exp",
              "performer": "Performer (FAVOR+)"}
    styles = {"softmax": ("k", "-"), "lln": ("tab:blue", "-"), "lln_no_mm": ("tab:blue", ":"),
              "relu": ("tab:orange", "--"), "elu_plus_one": ("tab:green", "--"), "exp": ("tab:purple", "--"),
              "performer": ("tab:red", "-.")}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    n = int(df.n.iloc[0])
    for ax, metric, ylabel in [(axes[0], "entropy", "mean row entropy (nats)"), (axes[1], "spectral_gap", "spectral gap 1 − |λ₂|")]:
        sub = df[df.metric == metric]
        for kernel in [k for k in labels if k in set(sub.kernel)]:
            g = sub[sub.kernel == kernel].groupby("tau").value.agg(["mean", "std"]).reset_index()
            color, ls = styles[kernel]
            ax.plot(g.tau, g["mean"], ls, color=color, marker="o", ms=3, lw=1.3, label=labels[kernel])
            ax.fill_between(g.tau, g["mean"] - g["std"].fillna(0), g["mean"] + g["std"].fillna(0), color=color, alpha=0.15)
        _log_ticks(ax, df.tau)
        ax.set_xlabel("temperature τ = 1/(σ_q σ_k)")
        ax.set_ylabel(ylabel)
    axes[0].axhline(np.log(n), color="gray", lw=0.8, ls=":")
    axes[0].annotate("ln N", (df.tau.min(), np.log(n)), textcoords="offset points", xytext=(2, -10), fontsize=8, color="gray")
    axes[1].legend(loc="lower right")
    seeds = df.seed.nunique()
    fig.suptitle(f"Concentration vs temperature on Gaussian q, k (N = {n}, mean ± std over {seeds} seeds)")
    return fig


def training_curves(df):
    """Figure 1: temperature, entropy and spectral gap of every layer at every training step.

    Args:
        df: columns ``step, layer, kernel, metric, value`` with metric in ``temperature``,
            ``entropy``, ``spectral_gap`` (and optionally ``loss``).
    """
    plt = _plt()
    kernels = list(dict.fromkeys(df.kernel))
    metrics = [("temperature", "temperature 1/(σ_q σ_k)"), ("entropy", "mean row entropy (nats)"),
               ("spectral_gap", "spectral gap 1 − |λ₂|")]
    fig, axes = plt.subplots(len(kernels), 3, figsize=(13, 3.4 * len(kernels)), squeeze=False, constrained_layout=True)
    layers = sorted(df.layer.unique())
    colors = plt.cm.plasma(np.linspace(0, 0.85, len(layers)))
    for row, kernel in zip(axes, kernels):
        for ax, (metric, ylabel) in zip(row, metrics):
            sub = df[(df.kernel == kernel) & (df.metric == metric)]
            for layer, c in zip(layers, colors):
                g = sub[sub.layer == layer].sort_values("step")
                ax.plot(g.step, g.value, color=c, lw=1, label=f"layer {layer}")
            ax.set_xlabel("training step")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{kernel} attention")
        row[0].legend(fontsize=7)
    fig.suptitle("Attention during masked-language-model training (one head per layer)")
    return fig


def log_histograms(samples, fits):
    """Histograms of ``ln P`` per layer with the fitted normal density.

    Args:
        samples: columns ``layer, value`` (value = ln P of sampled valid entries).
        fits: columns ``layer, mu, sigma`` (one row per layer).
    """
    plt = _plt()
    from scipy import stats as sps

    layers = sorted(samples.layer.unique())
    cols = min(3, len(layers))
    rows = int(np.ceil(len(layers) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False, constrained_layout=True)
    for ax, layer in zip(axes.ravel(), layers):
        v = samples[samples.layer == layer].value.to_numpy()
        f = fits[fits.layer == layer].iloc[0]
        lo = np.percentile(v, 0.5)  # a few near-zero entries would squeeze the bulk into one bin
        ax.hist(v, bins=80, range=(lo, v.max()), density=True, color="tab:blue", alpha=0.6,
                label="ln P (valid entries; lowest 0.5 % off-axis)")
        x = np.linspace(lo, v.max(), 300)
        ax.plot(x, sps.norm.pdf(x, f.mu, f.sigma), "k-", lw=1.2, label=f"normal fit μ={f.mu:.2f}, σ={f.sigma:.2f}")
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("ln P_ij (nats)")
        ax.set_ylabel("density")
        ax.legend(fontsize=7, loc="upper left")
    for ax in axes.ravel()[len(layers):]:
        ax.set_visible(False)
    return fig


def qq_plots(samples):
    """Normal Q-Q plots of standardised ``ln P`` per layer.

    Args:
        samples: columns ``layer, value`` (value = ln P).
    """
    plt = _plt()
    from scipy import stats as sps

    layers = sorted(samples.layer.unique())
    cols = min(3, len(layers))
    rows = int(np.ceil(len(layers) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.4 * rows), squeeze=False, constrained_layout=True)
    for ax, layer in zip(axes.ravel(), layers):
        v = np.sort(samples[samples.layer == layer].value.to_numpy())
        z = (v - v.mean()) / v.std()
        theo = sps.norm.ppf((np.arange(1, v.size + 1) - 0.5) / v.size)
        ax.plot(theo, z, ".", ms=1.5, color="tab:blue")
        lim = [min(theo.min(), z.min()), max(theo.max(), z.max())]
        ax.plot(lim, lim, "k--", lw=1)
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("normal quantile")
        ax.set_ylabel("standardised ln P quantile")
    for ax in axes.ravel()[len(layers):]:
        ax.set_visible(False)
    return fig


def layer_head_heatmaps(df, metrics=("entropy", "spectral_gap"), kernels=None, title=None):
    """Heatmaps of per-(layer, head) statistics, one column per kernel and one row per metric.

    Args:
        df: columns ``layer, head, kernel, metric, value`` (batch already aggregated; if several
            rows share a cell they are averaged).
    """
    plt = _plt()
    kernels = kernels or list(dict.fromkeys(df.kernel))
    labels = {"entropy": "mean row entropy (nats)", "spectral_gap": "spectral gap 1 − |λ₂|"}
    fig, axes = plt.subplots(len(metrics), len(kernels), figsize=(4.6 * len(kernels), 3.4 * len(metrics)),
                             squeeze=False, constrained_layout=True)
    for i, metric in enumerate(metrics):
        sub = df[df.metric == metric]
        vmin, vmax = sub.value.min(), sub.value.max()
        for j, kernel in enumerate(kernels):
            ax = axes[i, j]
            grid = sub[sub.kernel == kernel].pivot_table(index="layer", columns="head", values="value", aggfunc="mean")
            im = ax.imshow(grid.to_numpy(), aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax)
            ax.set_xticks(range(grid.shape[1]), grid.columns)
            ax.set_yticks(range(grid.shape[0]), grid.index)
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            ax.set_title(f"{kernel}: {metric.replace('_', ' ')}")
            ax.grid(False)
        fig.colorbar(im, ax=axes[i, :].tolist(), label=labels.get(metric, metric), shrink=0.9)
    if title:
        fig.suptitle(title)
    return fig
