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


def arms_figure(gmm: GMM, rows: list[tuple[str, torch.Tensor, list[list[float]], str]], path: str,
                n_show: int = 1000) -> None:
    """One row per arm: (name, samples [N, 2] of one seed, delta^2 curves of every seed, metrics line).
    Left: samples over the true density contours (fixed view, equal aspect). Right: delta^2 over training."""
    lim = view(gmm)
    fig, axes = plt.subplots(len(rows), 2, figsize=(5.6, 2.3 * len(rows)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1.25]})
    for (name, x, curves, line), (a0, a1) in zip(rows, axes):
        contours(a0, gmm, lim)
        x = x[:n_show]
        a0.scatter(x[:, 0].numpy(), x[:, 1].numpy(), s=1.0, color="C0", linewidths=0)  # no alpha: small PNGs
        a0.set_xlim(-lim, lim), a0.set_ylim(-lim, lim), a0.set_aspect("equal")
        a0.set_xticks([]), a0.set_yticks([])
        a0.set_title(name, fontsize=9)
        if not any(curves):  # the stage-0 init has not trained
            a1.axis("off")
            continue
        for c in curves:
            if c:
                a1.plot(range(len(c)), c, lw=0.7)
        a1.set_yscale("log")
        a1.set_title(line, fontsize=7)
        a1.set_xlabel("student step", fontsize=7)
        a1.set_ylabel("delta^2 (Eq. 7) / dim", fontsize=7)
        a1.tick_params(labelsize=6)
    fig.suptitle(f"{gmm.name}: samples (seed 0) and delta^2 over training (all seeds)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.25 / len(rows)))
    save(fig, path, dpi=55)


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
    save(fig, path, dpi=70)
