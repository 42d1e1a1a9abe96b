"""The plot functions on tiny frames: what each panel shows (titles, labels, limits, the numbers it
draws), not how it looks. Reference numbers come from numpy on the same values."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from attnstats.app import plot
from attnstats.app.files import save_figure

# The numbers drawn are means, minima and maxima of a few float64 values: pandas and numpy may sum
# them in another order, which changes the result by a few ulps at most.
RTOL = 1e-12

KERNELS9 = ["softmax", "lln", "lln_no_mm", "block_diag", "lln_diag", "relu", "elu_plus_one", "exp", "performer"]


def layer_head_values(kernels, layers=3, heads=4, calls=2, seed=0):
    """Values ``[kernel, metric, call, layer, head]`` and the same numbers as a rec.frame()-like frame."""
    metrics = ["entropy", "spectral_gap"]
    v = np.random.default_rng(seed).uniform(0.1, 2.0, (len(kernels), len(metrics), calls, layers, heads))
    rows = [dict(call=c * layers + l, layer=l, name=f"layer.{l}", kernel=k, head=h, batch=pd.NA, metric=m,
                 value=v[ki, mi, c, l, h])
            for ki, k in enumerate(kernels) for mi, m in enumerate(metrics)
            for c in range(calls) for l in range(layers) for h in range(heads)]
    df = pd.DataFrame(rows).astype({"head": "Int64", "batch": "Int64"})
    return v, df


def heatmap_axes(fig):
    return [ax for ax in fig.axes if ax.images and ax.get_label() != "<colorbar>"]


def test_heatmaps_of_a_frame_without_kernel_column_show_the_captured_softmax():
    v, df = layer_head_values(["softmax"])
    df = df.drop(columns="kernel")  # rec.frame() without kernels alongside has no kernel column
    fig = plot.layer_head_heatmaps(df)
    axes = heatmap_axes(fig)
    assert [ax.get_title() for ax in axes] == ["softmax: entropy", "softmax: spectral gap"]
    for mi, ax in enumerate(axes):
        # each cell is the mean over the two calls of that layer and head
        np.testing.assert_allclose(ax.images[0].get_array(), v[0, mi].mean(axis=0), rtol=RTOL)
        assert ax.get_ylabel() == "layer" and ax.get_xlabel() == "head"
    plt.close(fig)


def test_heatmaps_share_one_colour_scale_per_metric():
    v, df = layer_head_values(["softmax", "lln"])
    fig = plot.layer_head_heatmaps(df)
    axes = heatmap_axes(fig)
    # kernels are rows, metrics columns: row-major order
    assert [ax.get_title() for ax in axes] == ["softmax: entropy", "softmax: spectral gap", "lln: entropy",
                                               "lln: spectral gap"]
    for mi in range(2):
        cell_means = v[:, mi].mean(axis=1)  # [kernel, layer, head]
        for ki in range(2):
            clim = axes[2 * ki + mi].images[0].get_clim()
            np.testing.assert_allclose(clim, [cell_means.min(), cell_means.max()], rtol=RTOL)
    plt.close(fig)


def test_heatmaps_of_nine_kernels_stay_within_2000_px(tmp_path):
    _, df = layer_head_values(KERNELS9, layers=6, heads=12)
    fig = plot.layer_head_heatmaps(df, title="nine kernels")
    assert [ax.get_title() for ax in heatmap_axes(fig)[::2]] == [f"{k}: entropy" for k in KERNELS9]
    path = save_figure(fig, tmp_path / "h.png")  # the dpi and bbox the package writes with
    plt.close(fig)
    height, width = plt.imread(path).shape[:2]
    assert width <= 2000 and height <= 2000, (width, height)


def test_heatmaps_name_what_is_missing():
    _, df = layer_head_values(["softmax", "lln"])
    with pytest.raises(ValueError, match=r"kernels\[1\] = 'relu'.*softmax"):
        plot.layer_head_heatmaps(df, kernels=["lln", "relu"])
    with pytest.raises(ValueError, match=r"metrics\[0\] = 'temperature'"):
        plot.layer_head_heatmaps(df, metrics=["temperature"])
    with pytest.raises(ValueError, match=r"head='each'"):
        plot.layer_head_heatmaps(df.assign(head=pd.array([pd.NA] * len(df), dtype="Int64")))
    with pytest.raises(ValueError, match=r"no column 'layer'"):
        plot.layer_head_heatmaps(df.drop(columns="layer"))


def test_entropy_per_layer_draws_head_mean_and_spread():
    v, df = layer_head_values(["softmax", "lln"])
    fig = plot.entropy_per_layer(df)
    assert len(fig.axes) == 2
    for mi, (ax, ylabel) in enumerate(zip(fig.axes, ["mean row entropy (nats)", "spectral gap 1 − |λ₂|"])):
        assert ax.get_xlabel() == "layer" and ax.get_ylabel() == ylabel
        assert ax.get_title().startswith(["entropy", "spectral gap"][mi])
        per_head = v[:, mi].mean(axis=1)  # [kernel, layer, head]: calls averaged first
        for ki, (line, band) in enumerate(zip(ax.get_lines(), ax.collections)):
            np.testing.assert_array_equal(line.get_xdata(), [0, 1, 2])
            np.testing.assert_allclose(line.get_ydata(), per_head[ki].mean(axis=1), rtol=RTOL)
            # the band's outline runs along the lowest and the highest head of each layer
            ys = band.get_paths()[0].vertices[:, 1]
            lo, hi = per_head[ki].min(axis=1), per_head[ki].max(axis=1)
            assert np.isclose(ys[:, None], np.concatenate([lo, hi])[None, :], rtol=RTOL).any(axis=1).all()
            assert np.isclose(ys.min(), lo.min(), rtol=RTOL) and np.isclose(ys.max(), hi.max(), rtol=RTOL)
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["softmax", "lln"]
    plt.close(fig)


def test_entropy_per_layer_of_a_softmax_only_entropy_frame():
    v, df = layer_head_values(["softmax"])
    df = df[df.metric == "entropy"].drop(columns="kernel")
    fig = plot.entropy_per_layer(df)
    assert len(fig.axes) == 1  # no spectral gap in the frame: no second panel
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["softmax"]
    np.testing.assert_allclose(fig.axes[0].get_lines()[0].get_ydata(), v[0, 0].mean(axis=(0, 2)), rtol=RTOL)
    plt.close(fig)
    with pytest.raises(ValueError, match=r"no 'entropy' row"):
        plot.entropy_per_layer(df.assign(metric="spectral_gap"))


def test_training_curves_share_the_y_range_of_each_metric_across_kernels():
    rows = []
    for kernel, scale in [("softmax", 1.0), ("lln", 3.0)]:  # LLN's values span three times the range
        for step in range(5):
            for layer in range(2):
                for metric, base in [("temperature", 10.0), ("entropy", 4.0), ("spectral_gap", 0.9)]:
                    rows.append(dict(step=step, layer=layer, kernel=kernel, metric=metric,
                                     value=base - 0.05 * scale * base * step * (layer + 1)))
    df = pd.DataFrame(rows)
    fig = plot.training_curves(df)
    axes = np.array(fig.axes).reshape(2, 3)
    assert [ax.get_title() for ax in axes[:, 0]] == ["softmax attention", "lln attention"]
    for j, metric in enumerate(["temperature", "entropy", "spectral_gap"]):
        assert axes[0, j].get_ylim() == axes[1, j].get_ylim()
        lo, hi = axes[0, j].get_ylim()
        values = df[df.metric == metric].value
        assert lo <= values.min() and values.max() <= hi
        assert axes[1, j].get_xlabel() == "training step"
    plt.close(fig)


def test_concentration_vs_temperature_draws_the_seed_mean():
    taus, seeds = np.array([0.5, 1.0, 2.0]), [0, 1]
    ent = np.array([[1.0, 2.0, 3.0], [1.5, 2.5, 3.5]])  # [seed, tau]
    rows = [dict(n=16, tau=t, seed=s, kernel=k, metric=m, value=ent[s, i] * (0.1 if m == "spectral_gap" else 1))
            for k in ("softmax", "lln") for m in ("entropy", "spectral_gap") for s in seeds for i, t in enumerate(taus)]
    fig = plot.concentration_vs_temperature(pd.DataFrame(rows))
    assert len(fig.axes) == 2
    assert fig.axes[0].get_ylabel() == "mean row entropy (nats)" and fig.axes[1].get_xscale() == "log"
    line = fig.axes[0].get_lines()[0]
    np.testing.assert_allclose(line.get_ydata(), ent.mean(axis=0), rtol=RTOL)
    assert [t.get_text() for t in fig.axes[1].get_legend().get_texts()] == ["softmax (SA)", "LLN, moment matched"]
    plt.close(fig)


def test_moment_figures_have_their_panels():
    s2 = np.array([0.5, 1.0, 2.0])
    rows = [dict(n=n, sigma2=s, seed=0, metric=m, value=1.0 / n, prediction=1.0 / n, in_regime=True)
            for n in (64, 256) for s in s2 for m in ("p_mean", "p_var", "logp_mean", "logp_var")]
    fig = plot.moments_vs_variance(pd.DataFrame(rows))
    assert len(fig.axes) == 4 and fig.axes[1].get_yscale() == "log"
    assert [ax.get_ylabel() for ax in fig.axes][0] == "N · mean of P"
    plt.close(fig)
    rows = [dict(n=64, d=8, sigma2=s, seed=0, kernel=k, value=s * f) for k, f in
            (("softmax", 1.0), ("lln", 1.02), ("lln_paper", 0.8), ("lln_no_mm", 0.05)) for s in s2]
    fig = plot.moment_matching(pd.DataFrame(rows))
    assert len(fig.axes) == 2 and fig.axes[0].get_yscale() == "log"
    assert fig.axes[1].get_ylabel() == "Var[ln P_LLN] / Var[ln P_SA]"
    ratios = {line.get_label(): line.get_ydata() for line in fig.axes[1].get_lines() if line.get_label().startswith("LLN")}
    assert sorted(ratios) == ["LLN, matched by the measured curve", "LLN, matched by the paper's line"]
    np.testing.assert_allclose(ratios["LLN, matched by the measured curve"], 1.02)  # each rule's variance over softmax's
    np.testing.assert_allclose(ratios["LLN, matched by the paper's line"], 0.8)
    plt.close(fig)


def test_log_histograms_and_qq_plots_one_panel_per_layer():
    rng = np.random.default_rng(0)
    samples = pd.DataFrame(dict(layer=np.repeat([0, 1, 2, 3], 500), value=rng.normal(-3, 1, 2000)))
    fits = pd.DataFrame(dict(layer=[0, 1, 2, 3], mu=-3.0, sigma=1.0))
    for fig in (plot.log_histograms(samples, fits), plot.qq_plots(samples)):
        visible = [ax for ax in fig.axes if ax.get_visible()]
        assert [ax.get_title() for ax in visible] == [f"layer {i}" for i in range(4)]
        assert len(fig.axes) == 6  # a 2 × 3 grid, the last two hidden
        plt.close(fig)
