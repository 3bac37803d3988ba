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


STYLE = {"kept": dict(marker="o", ms=10, mfc="none", mec="k", mew=1.5, ls="none"),
         "recovered": dict(marker="o", ms=12, mfc="none", mec="limegreen", mew=3.5, ls="none"),
         "lost": dict(marker="x", ms=12, color="red", mew=3.0, ls="none"),
         "dropped": dict(marker="x", ms=12, color="darkorange", mew=3.0, ls="none")}
LABEL = {"kept": "kept", "recovered": "recovered (lost by stage 1)", "lost": "lost",
         "dropped": "lost (kept by stage 1)"}


def arms_figure(gmm: GMM, panels: list[tuple[str, torch.Tensor, torch.Tensor | None, list[str], dict]], path: str,
                title: str, n_show: int = 1500) -> None:
    """One square panel per sampler (name, samples [N, 2] of one seed, class labels [N] or None, the status of each
    mode from toy.metrics.mode_status, that seed's metrics): density contours, samples coloured by class, each mode
    centre marked kept (black circle), recovered (green circle), lost (red cross) or newly lost (orange cross) with its
    share of the samples relative to the data's (x0.5 = half the data's share), and the counts in the title."""
    from toy.metrics import COVER_FRACTION

    lim = view(gmm)
    cols = len(panels) if len(panels) <= 5 else math.ceil(len(panels) / 2)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.7 * cols, 4.5 * rows + 0.7), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for (name, x, y, status, m), ax in zip(panels, axes.flat):
        contours(ax, gmm, lim)
        xs, ys = x[:n_show], (None if y is None else y[:n_show])
        colours = "C0" if ys is None else [f"C{int(c)}" for c in ys]
        ax.scatter(xs[:, 0].numpy(), xs[:, 1].numpy(), s=2.0, c=colours, linewidths=0)
        for j, (mx, my) in enumerate(gmm.means.tolist()):
            ax.plot(mx, my, **STYLE[status[j]])
            r = math.hypot(mx, my)
            ox, oy = (0.62 * mx / r, 0.62 * my / r) if r > 0 else (0.4, 0.4)
            ax.text(mx + ox, my + oy, f"x{m['shares'][j]:.2f}", ha="center", va="center", fontsize=8.5)
        ax.set_xlim(-lim, lim), ax.set_ylim(-lim, lim), ax.set_aspect("equal")
        ax.set_xticks([]), ax.set_yticks([])
        counts = "  ".join(f"{k} {status.count(k)}" for k in ("lost", "dropped", "recovered", "kept")
                           if status.count(k) or k in ("lost", "kept"))
        ax.set_title(f"{name}\n{counts}\nHQ {m['hq']:.0f}%   off-class {m['off_class']:.1f}%", fontsize=11)
    handles = [plt.Line2D([], [], **STYLE[k], label=LABEL[k]) for k in STYLE]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=10, frameon=False,
               title=f"a mode is lost below x{COVER_FRACTION:g} of the data's share; "
                     "x = the mode's share of the samples relative to the data's", title_fontsize=9.5)
    fig.suptitle(title, fontsize=12)
    H = fig.get_size_inches()[1]  # inches: the suptitle, 3 title lines per panel, the legend below
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - 1.25 / H, bottom=0.8 / H, wspace=0.06, hspace=0.32)
    save(fig, path, dpi=100)


HEADER = {"recovered": "modes recovered", "lost": "modes lost", "hq": "% HQ", "off_class": "% off class",
          "kl_cond": "KL per class"}


def paired_figure(diffs: dict, path: str, title: str, metrics=("recovered", "lost", "hq", "kl_cond")) -> None:
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
        ax.set_title(f"{HEADER.get(m, m)}: arm - continued DMD", fontsize=11)
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
