"""The figures of attnstats, drawn from the tidy long-format DataFrames of :mod:`attnstats.app.reproduce`
and ``rec.frame()``. Each function returns a matplotlib Figure; save it with
:func:`attnstats.app.files.save_figure` (written whole or not at all).
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
    "entropy_per_layer",
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
            ``p_mean, p_var, logp_mean, logp_var`` (one row per N, σ², seed and metric).
    """
    plt = _plt()
    panels = [
        ("p_mean", lambda v, n: v * n, "N · mean of P", "exactly 1 (rows sum to 1)", False),
        ("p_var", lambda v, n: v * n * n, "N² · Var[P]", r"prediction $e^{\sigma^2} - 1$", True),
        ("logp_mean", lambda v, n: v + np.log(n), "mean of ln P + ln N  (nats)", "prediction −σ²/2", False),
        ("logp_var", lambda v, n: v, "Var[ln P]", "prediction σ²", False),
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
        ax.legend(loc="best") if metric == "p_var" else ax.legend(handles=ax.get_lines()[-1:], loc="best")
    fig.suptitle("Softmax attention entries vs input variance (Gaussian q, k): measured vs log-normal prediction\n"
                 r"hollow markers: $(e^{\sigma^2} - 1)/N > 0.01$, where the prediction is not expected to hold")
    return fig


def moment_matching(df):
    """Figure 5b: ``Var[ln P]`` of SA and of LLN before and after moment matching (both rules), against ``σ²``.

    Args:
        df: columns ``n, d, sigma2, kernel, value`` (value = Var[ln P], one row per σ², seed and
            kernel), kernels ``softmax``, ``lln_no_mm``, ``lln`` (curve rule), ``lln_paper`` (the paper's rule).

    Left: the variances on log axes. Right: each matched LLN's variance over softmax's, with the ±5 % band.
    """
    plt = _plt()
    names = {"softmax": ("softmax (SA)", "k", "o"),
             "lln": ("LLN, matched by the measured curve", "tab:blue", "s"),
             "lln_paper": ("LLN, matched by the paper's line", "tab:green", "D"),
             "lln_no_mm": ("LLN, α = β = 1 (before matching)", "tab:red", "^")}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    sa = df[df.kernel == "softmax"].groupby("sigma2").value.mean()
    for kernel, (label, color, marker) in names.items():
        part = df[df.kernel == kernel]
        if part.empty:
            continue
        g = part.groupby("sigma2").value.agg(["mean", "std"]).reset_index()
        axes[0].errorbar(g.sigma2, g["mean"], yerr=g["std"].fillna(0), color=color, marker=marker, ms=4, lw=1,
                         capsize=2, label=label)
        if kernel in ("lln", "lln_paper"):
            ratio = g.set_index("sigma2")["mean"] / sa
            axes[1].plot(np.sqrt(ratio.index), ratio.values, color=color, marker=marker, ms=4, lw=1, label=label)
    s = np.sort(df.sigma2.unique())
    axes[0].plot(s, s, "--", color="gray", lw=1, label="SA prediction σ²")
    _log_ticks(axes[0], df.sigma2)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("score variance σ² = σ_q² σ_k²")
    axes[0].set_ylabel("Var[ln P]")
    axes[0].legend(fontsize=8)
    axes[1].axhspan(0.95, 1.05, color="tab:blue", alpha=0.1, label="±5 %")
    axes[1].axhline(1.0, color="k", lw=0.8)
    axes[1].set_xlabel("σ_q σ_k")
    axes[1].set_ylabel("Var[ln P_LLN] / Var[ln P_SA]")
    axes[1].legend(fontsize=8)
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
    # one y range per metric (column): the rows exist to compare kernels, and separate ranges would
    # make a small change in one kernel look as large as a big one in the other
    fig, axes = plt.subplots(len(kernels), 3, figsize=(13, 3.4 * len(kernels)), squeeze=False, sharey="col",
                             constrained_layout=True)
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
    fig.suptitle("Attention during masked-language-model training (one head per layer; y range shared per column)")
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
    fig, panels = _layer_panels(plt, len(layers), 4, 3.2)
    for ax, layer in zip(panels, layers):
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
    return fig


def qq_plots(samples):
    """Normal Q-Q plots of standardised ``ln P`` per layer.

    Args:
        samples: columns ``layer, value`` (value = ln P).
    """
    plt = _plt()
    from scipy import stats as sps

    layers = sorted(samples.layer.unique())
    fig, panels = _layer_panels(plt, len(layers), 3.6, 3.4)
    for ax, layer in zip(panels, layers):
        v = np.sort(samples[samples.layer == layer].value.to_numpy())
        z = (v - v.mean()) / v.std()
        theo = sps.norm.ppf((np.arange(1, v.size + 1) - 0.5) / v.size)
        ax.plot(theo, z, ".", ms=1.5, color="tab:blue")
        lim = [min(theo.min(), z.min()), max(theo.max(), z.max())]
        ax.plot(lim, lim, "k--", lw=1)
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("normal quantile")
        ax.set_ylabel("standardised ln P quantile")
    return fig


def _layer_panels(plt, count: int, width: float, height: float):
    """A figure with one panel per layer, three to a row (inches per panel); spare cells hidden."""
    cols = min(3, count)
    rows = int(np.ceil(count / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, constrained_layout=True)
    for ax in axes.ravel()[count:]:
        ax.set_visible(False)
    return fig, list(axes.ravel()[:count])


_SOFTMAX = "softmax"
_METRIC_LABELS = {"entropy": "mean row entropy (nats)", "spectral_gap": "spectral gap 1 − |λ₂|"}


def _with_kernel(df, fn: str):
    """``df`` with a ``kernel`` column: ``rec.frame()`` has one only when kernels ran alongside, and
    without it every row is the captured (softmax) attention."""
    missing = [c for c in ("layer", "head", "metric", "value") if c not in df.columns]
    if missing:
        raise ValueError(f"{fn}: df has no column {missing[0]!r}; expected the columns of rec.frame() "
                         f"(layer, head, metric, value, optionally kernel), got {list(df.columns)}")
    return df if "kernel" in df.columns else df.assign(kernel=_SOFTMAX)


def _check_present(df, column: str, wanted, arg: str, fn: str):
    have = list(dict.fromkeys(df[column]))
    for i, name in enumerate(wanted):
        if name not in have:
            raise ValueError(f"{fn}: {arg}[{i}] = {name!r} has no row in df; df holds {column} {have}")


def _index_ticks(ax, axis: str, labels, max_ticks: int = 16):
    """Tick every cell up to ``max_ticks`` cells, then every k-th, so labels never overlap."""
    step = int(np.ceil(len(labels) / max_ticks)) or 1
    pos = list(range(0, len(labels), step))
    (ax.set_xticks if axis == "x" else ax.set_yticks)(pos, [str(labels[i]) for i in pos])


def layer_head_heatmaps(df, metrics=("entropy", "spectral_gap"), kernels=None, title=None):
    """Heat maps of per-(layer, head) statistics: one row per kernel, one column per metric, one
    colour scale per metric (shared by the kernels, so equal colours mean equal values).

    With up to five metrics the figure stays under 2000 × 2000 px at the 110 dpi of
    :func:`attnstats.app.files.save_figure` however many kernels there are: rows get shorter instead.

    Args:
        df: ``rec.frame()`` or its columns ``layer, head, metric, value`` and optionally ``kernel``
            (absent: every row is the captured softmax). Rows sharing a cell (several calls or
            batch elements) are averaged. Needs one row per head (``rec.frame(head="each")``).
        metrics: metric names, one column each.
        kernels: kernel names, one row each (default: every kernel of ``df`` in order of appearance).
        title: figure title.
    """
    fn = "layer_head_heatmaps"
    df = _with_kernel(df, fn)
    metrics = list(metrics)
    kernels = list(kernels) if kernels is not None else list(dict.fromkeys(df.kernel))
    if not metrics or not kernels:
        raise ValueError(f"{fn}: expected at least one metric and one kernel, got metrics={metrics}, kernels={kernels}")
    _check_present(df, "metric", metrics, "metrics", fn)
    _check_present(df, "kernel", kernels, "kernels", fn)
    df = df[df["head"].notna() & df.kernel.isin(kernels) & df.metric.isin(metrics)]
    if df.empty:
        raise ValueError(f"{fn}: df has no per-head row (head is <NA> everywhere: a head-averaged frame); "
                         "expected one row per head, as rec.frame(head='each') gives")
    layers, heads = sorted(df.layer.unique()), sorted(df["head"].unique())

    plt = _plt()
    # bounded size: many kernels make rows shorter, many metrics make columns narrower
    panel_w = min(4.6, 13.0 / len(metrics))
    panel_h = min(3.2, 14.0 / len(kernels))
    fig, axes = plt.subplots(len(kernels), len(metrics), figsize=((panel_w + 1.0) * len(metrics), panel_h * len(kernels) + 0.5),
                             squeeze=False, constrained_layout=True)
    cmap = plt.get_cmap("viridis").with_extremes(bad="0.85")  # a cell without data is grey, not a colour
    for j, metric in enumerate(metrics):
        sub = df[df.metric == metric]
        grids = [sub[sub.kernel == kernel].pivot_table(index="layer", columns="head", values="value", aggfunc="mean")
                 .reindex(index=layers, columns=heads).to_numpy(float) for kernel in kernels]
        # the scale spans the cells drawn (means), not the rows averaged into them
        if np.isnan(grids).all():
            raise ValueError(f"{fn}: metrics[{j}] = {metric!r} is NaN in every cell of kernels {kernels}")
        vmin, vmax = np.nanmin(grids), np.nanmax(grids)
        for i, (kernel, grid) in enumerate(zip(kernels, grids)):
            ax = axes[i, j]
            im = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
            _index_ticks(ax, "x", heads)
            _index_ticks(ax, "y", layers)
            if i == len(kernels) - 1:
                ax.set_xlabel("head")
            ax.set_ylabel("layer")
            ax.set_title(f"{kernel}: {metric.replace('_', ' ')}")
            ax.grid(False)
        fig.colorbar(im, ax=axes[:, j].tolist(), label=_METRIC_LABELS.get(metric, metric), shrink=0.9,
                     aspect=20 * max(1.0, len(kernels) / 2))  # as thin in a tall column as in a short one
    if title:
        fig.suptitle(title)
    return fig


def entropy_per_layer(df, kernels=None, title=None):
    """Mean row entropy per layer, one line per kernel, with the spread over heads; a second panel
    with the spectral gap when ``df`` has it.

    Each line is the mean over heads of a layer, its band runs from the lowest to the highest head
    (a head's value is first averaged over calls and batch elements). A head-averaged frame
    (``head`` all <NA>) gives lines without bands.

    Args:
        df: ``rec.frame()`` or its columns ``layer, head, metric, value`` and optionally ``kernel``
            (absent: every row is the captured softmax); needs ``metric == "entropy"`` rows (nats).
        kernels: kernel names, one line each (default: every kernel of ``df`` in order of appearance).
        title: figure title.
    """
    fn = "entropy_per_layer"
    df = _with_kernel(df, fn)
    if not (df.metric == "entropy").any():
        raise ValueError(f"{fn}: df has no 'entropy' row; it holds metrics {list(dict.fromkeys(df.metric))} "
                         "(rec.frame() computes entropy unless metrics= leaves it out)")
    kernels = list(kernels) if kernels is not None else list(dict.fromkeys(df.kernel))
    _check_present(df, "kernel", kernels, "kernels", fn)
    metrics = [m for m in ("entropy", "spectral_gap") if (df.metric == m).any()]

    plt = _plt()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 3.8), squeeze=False, constrained_layout=True)
    others = iter(plt.cm.tab10(np.arange(10)))
    colors = {k: "k" if k == _SOFTMAX else next(others, "gray") for k in kernels}
    for ax, metric in zip(axes[0], metrics):
        sub = df[(df.metric == metric) & df.kernel.isin(kernels)]
        per_head = sub.groupby(["kernel", "layer", "head"], dropna=False).value.mean().reset_index()
        stats = per_head.groupby(["kernel", "layer"]).value.agg(["mean", "min", "max"]).reset_index()
        for kernel in kernels:
            g = stats[stats.kernel == kernel].sort_values("layer")
            ax.plot(g.layer, g["mean"], "-o", color=colors[kernel], ms=4, lw=1.3, label=kernel)
            ax.fill_between(g.layer, g["min"], g["max"], color=colors[kernel], alpha=0.15, lw=0)
        ax.set_xticks(sorted(sub.layer.unique()))
        ax.set_xlabel("layer")
        ax.set_ylabel(_METRIC_LABELS[metric])
        ax.set_title(f"{metric.replace('_', ' ')} per layer (band: lowest to highest head)")
    axes[0, 0].legend(loc="best")
    if title:
        fig.suptitle(title)
    return fig


def metric_distributions(df, metrics=("entropy", "spectral_gap"), title=None):
    """Per layer, the spread of per-sequence values over a corpus: one box per layer (quartiles, median,
    whiskers at the 5th and 95th percentiles), all heads pooled, one panel per metric, softmax and each
    kernel side by side.

    Args:
        df: per-sequence rows with columns ``layer, kernel, metric, value`` (the Parquet shards of
            ``attnstats analyze``, or ``rec.frame(batch="each")``; ``kernel`` optional).
        metrics: metric names to draw.
    """
    plt = _plt()
    df = _with_kernel(df, "metric_distributions")
    _check_present(df, "metric", metrics, "metrics", "metric_distributions")
    kernels = list(dict.fromkeys(df["kernel"]))
    layers = sorted(df["layer"].unique())
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics) + 1, 3.6), squeeze=False)
    width = 0.8 / len(kernels)
    for ax, metric in zip(axes[0], metrics):
        sub = df[df.metric == metric]
        for j, kernel in enumerate(kernels):
            data = [sub[(sub.kernel == kernel) & (sub.layer == layer)].value.dropna().to_numpy() for layer in layers]
            pos = [i + (j - (len(kernels) - 1) / 2) * width for i in range(len(layers))]
            keep = [(p, d) for p, d in zip(pos, data) if d.size]
            if not keep:
                continue
            box = ax.boxplot([d for _, d in keep], positions=[p for p, _ in keep], widths=width * 0.9, whis=(5, 95),
                             showfliers=False, patch_artist=True, medianprops={"color": "black"})
            color = f"C{j}"
            for patch in box["boxes"]:
                patch.set(facecolor=color, alpha=0.45)
            ax.plot([], [], color=color, lw=6, alpha=0.45, label=kernel)
        ax.set_xticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_xlabel("layer")
        ax.set_title(metric, fontsize=10)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
