"""Figures for the toy (matplotlib Agg, savefig only): fixed view, equal aspect, true density contours + samples."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from toy.gmm import GMM  # noqa: E402


def save(fig, path: str, dpi: int) -> None:
    """savefig, then a 64-colour palette PNG: the committed figures stay a few tens of KB each."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png")
    plt.close(fig)
    buf.seek(0)
    Image.open(buf).convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def view(gmm: GMM) -> float:
    return gmm.means.abs().max().item() + 1.5


def contours(ax, gmm: GMM, lim: float, n: int = 160) -> None:
    g = torch.linspace(-lim, lim, n)
    xy = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).reshape(-1, 2)
    logp = gmm.log_prob(xy).reshape(n, n)
    top = logp.max().item()
    ax.contour(g.numpy(), g.numpy(), logp.numpy(), levels=[top - 4.5, top - 2.0, top - 0.5], colors="0.55",
               linewidths=0.6)


def arms_figure(gmm: GMM, cols: list[tuple[str, torch.Tensor, torch.Tensor | None, dict]], path: str, title: str,
                n_show: int = 1500) -> None:
    """One large square panel per column (name, samples [N, 2] of one seed, their class labels [N] or None, the
    row's summary {metric: {"mean", ...}}): density contours, samples coloured by class, each mode centre marked as
    covered (black circle) or missed (red cross) with its share of the samples relative to the data's (x 0.5 =
    half the data's share), and the key numbers in the title."""
    from toy.metrics import COVER_FRACTION, HQ_STD, assign

    lim = view(gmm)
    fig, axes = plt.subplots(1, len(cols), figsize=(4.2 * len(cols), 4.9), squeeze=False)
    for (name, x, y, summ), ax in zip(cols, axes[0]):
        contours(ax, gmm, lim)
        xs, ys = x[:n_show], (None if y is None else y[:n_show])
        colours = "C0" if ys is None else [f"C{int(c)}" for c in ys]
        ax.scatter(xs[:, 0].numpy(), xs[:, 1].numpy(), s=2.0, c=colours, linewidths=0)
        k, dist = assign(x, gmm)
        counts = torch.bincount(k[dist <= HQ_STD], minlength=gmm.K).double()
        share = counts / (x.shape[0] * gmm.weights.double())  # 1 = the data's share
        for j in range(gmm.K):
            mx, my = gmm.means[j].tolist()
            if share[j] >= COVER_FRACTION:
                ax.plot(mx, my, "o", ms=9, mfc="none", mec="k", mew=1.4)
            else:
                ax.plot(mx, my, "x", ms=11, color="red", mew=2.5)
            r = math.hypot(mx, my)
            ox, oy = (0.55 * mx / r, 0.55 * my / r) if r > 0 else (0.4, 0.4)
            ax.text(mx + ox, my + oy, f"x{share[j]:.1f}", ha="center", va="center", fontsize=9)
        ax.set_xlim(-lim, lim), ax.set_ylim(-lim, lim), ax.set_aspect("equal")
        ax.set_xticks([]), ax.set_yticks([])
        m = lambda key, nd: "n/a" if not math.isfinite(summ[key]["mean"]) else f"{summ[key]['mean']:.{nd}f}"
        kl = f"KL/class {m('kl_cond', 2)}" if gmm.conditional else f"KL {m('kl', 3)}"
        ax.set_title(f"{name}\n{kl}   var x{m('var_ratio', 1)}\nHQ {m('hq', 0)}%   shift {m('shift', 2)} std",
                     fontsize=12)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    save(fig, path, dpi=100)


def paired_figure(diffs: dict, path: str, title: str, metrics=("kl_cond", "shift", "energy", "var_ratio")) -> None:
    """One panel per metric: per-seed differences arm - control (dots), their mean and 95% interval (bar)."""
    metrics = [m for m in metrics if any(d[m]["n"] for d in diffs.values())]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 4.2), squeeze=False)
    arms = list(diffs)
    for m, ax in zip(metrics, axes[0]):
        for i, a in enumerate(arms):
            e = diffs[a][m]
            if not e["n"]:
                continue
            ax.scatter([i + (j - (e["n"] - 1) / 2) * 0.03 for j in range(e["n"])], e["values"], s=12, color="0.45",
                       zorder=2)
            ax.errorbar([i], [e["mean"]], yerr=[[e["mean"] - e["lo"]], [e["hi"] - e["mean"]]], fmt="o",
                        color="C3", ms=7, capsize=6, lw=2, zorder=3)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(len(arms)))
        ax.set_xticklabels(arms, rotation=35, ha="right", fontsize=10)
        ax.set_title(f"{m}: arm - dmd", fontsize=12)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    save(fig, path, dpi=100)


def theory_figure(ts: list[float], rows: dict[str, list[float]], path: str, title: str) -> None:
    """Each link of the Prop. 1 chain against t (log scale)."""
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    for name, vals in rows.items():
        ax.plot(ts, [max(v, 1e-12) if not math.isnan(v) else math.nan for v in vals], marker="o", ms=2.5, lw=1,
                label=name)
    ax.set_yscale("log")
    ax.set_xlabel("t (alpha_t = 1 - t)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6)
    fig.tight_layout()
    save(fig, path, dpi=110)
