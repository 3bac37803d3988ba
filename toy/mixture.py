"""The 2D toy: DMD vs DFD on Gaussian mixtures with an exact teacher, on a CPU. docs/toy.md has the results.

    python toy/mixture.py                      # demo (~15 s of CPU): ring_shared, g = 3, seed 0, dmd vs dfd_p1
    python toy/mixture.py --all                # the study: every control, tuning seeds 0-9 and held-out 100-109,
                                               # the g = 1 control, and toy/theory.py
    python toy/mixture.py --dataset ring --arms dmd,dfd_p0.5_ot --seeds 3 --steps 100 --out out/mine

Protocol (mirrors the paper's recipe, Sec. 4.2 and 5.2):
  stage 0  an MLP denoiser is fitted to the exact teacher's (unguided) x0; it initialises the student and the fake
           score, as DMD2 initialises both from the teacher.
  stage 1  DMD (p = 0) against the (guided) teacher from that initialisation -> the stage-1 checkpoint.
  stage 2  arms from that same checkpoint (student, fake score): continued DMD (the control), DMD at a lower
           learning rate, DMD plus an explicit pull of G toward its paired real sample, DFD p = 0.5 / 1, DFD at
           high noise only (dfd.DFDConfig.p_t_min), x0 vs score space, and three pairings of x with G.
  stage 3  DFD from scratch (from the stage-0 initialisation, no DMD), the validity ablation.
Every update is dfd.train -> dfd.fake_score_step / dfd.student_step with a dfd.DFDConfig; this file only builds
networks, data streams and pairings, and measures. Extra rows: "data" (fresh data samples: each metric's floor)
and "teacher" (the exact guided teacher's own 200-step flow-ODE samples: the target DMD distils).

Pairings (the teacher's real sample x for the student's sample G = student(x_in, t_s)); x_in is always a batch
sample x' noised to t_s (dfd.student_input, the authors' text-to-video recipe), and dfd's `pair` hook picks x:
  paired       x = x' (no hook)
  independent  x = another sample of the batch with the same class (a random cyclic shift within each class)
  ot           x re-assigned within each class by mini-batch optimal transport on ||G - x||^2
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace

if __package__ in (None, ""):  # run as `python toy/mixture.py`: make `import dfd` and `import toy` work
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn as nn

import dfd
from toy import gmm as gmm_lib
from toy import theory
from toy.metrics import evaluate


# ---------------------------------------------------------------------------------------------------
# Networks: x0 = x_t - t * F(x_t, t, y), the flow-velocity parametrisation (dfd.x0_from_v), so x0 -> x_t as t -> 0.


class MLPDenoiser(nn.Module):
    """A dfd Denoiser (x_t [B,2], t [B], cond) -> x0_hat [B,2]; cond = {"y": labels [B] or None, ...}.

    Inputs: x_t, Fourier features of t, and (fourier=True) Fourier features of x_t along 4 directions. The x features
    are what lets a small MLP be sharp: a few-step sampler must snap an input near a boundary between modes to one
    mode, a near-discontinuous map of x_t that a plain SiLU MLP only approaches slowly (spectral bias). Measured on
    the ring (docs/toy.md, "Why the students were blurred"): per-mode variance 3.9x the data's after 600 DMD steps
    without them, 1.6x with them."""

    def __init__(self, n_classes: int = 0, hidden: int = 128, depth: int = 3, fourier: bool = True):
        super().__init__()
        self.n_classes = n_classes
        self.freqs = nn.Parameter(torch.tensor([1.0, 2.0, 4.0, 8.0]) * math.pi, requires_grad=False)
        # 4 directions (x, y, both diagonals) x 4 frequencies (periods 8, 4, 2, 1 in data units)
        dirs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7071, 0.7071], [0.7071, -0.7071]])
        w = (dirs[:, None, :] * (torch.tensor([0.25, 0.5, 1.0, 2.0]) * math.pi)[None, :, None]).reshape(-1, 2)
        self.xfreqs = nn.Parameter(w if fourier else w[:0], requires_grad=False)  # [16 or 0, 2]
        d_in = 2 + 1 + 2 * len(self.freqs) + 2 * len(self.xfreqs) + (n_classes + 1 if n_classes else 0)  # +1: no label
        layers, d = [], d_in
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.SiLU()]
            d = hidden
        layers.append(nn.Linear(d, 2))
        self.net = nn.Sequential(*layers)

    def features(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        ang = t[:, None] * self.freqs[None]
        xang = x_t @ self.xfreqs.T
        h = [x_t, t[:, None], ang.sin(), ang.cos(), xang.sin(), xang.cos()]
        if self.n_classes:
            y = None if cond is None else cond.get("y")
            onehot = torch.zeros(x_t.shape[0], self.n_classes + 1)
            onehot[:, -1] = 1.0 if y is None else 0.0
            if y is not None:
                onehot[torch.arange(x_t.shape[0]), y] = 1.0
            h.append(onehot)
        return torch.cat(h, 1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        return dfd.x0_from_v(x_t, self.net(self.features(x_t, t, cond)), t)


class PullTeacher:
    """The `dmd_pull` control: the teacher's x0 at x~_t plus pull * (x - G), G the student's sample and x its paired
    real sample (handed over by the `pair` hook, which dfd calls with G and x just before the teacher). By Tweedie,
    x0-space DFD's target is x0_T(x_t) = x0_T(x~_t) + (I + sigma_t^2 H)(x - G) + O(|x - G|^2) (H the score
    Jacobian), so this arm is DFD with the teacher's Jacobian term replaced by a constant: it tells whether DFD
    is more than a regression of G onto x. Run with p = 0 (the teacher always sees x~_t)."""

    def __init__(self, teacher, pull: float):
        self.teacher, self.pull = teacher, pull
        self.G = self.x = None

    def pair(self, G: torch.Tensor, x_real: torch.Tensor, cond) -> torch.Tensor:
        self.G, self.x = G, x_real
        return x_real

    @torch.no_grad()
    def __call__(self, x_t, t, cond=None):
        return self.teacher(x_t, t, cond) + self.pull * (self.x - self.G)


class MLPTeacher:
    """A learned teacher: the stage-0 MLP, guided with dfd.cfg like the exact one."""

    def __init__(self, net: nn.Module, g: float = 1.0):
        self.net, self.g = net, g

    @torch.no_grad()
    def __call__(self, x_t, t, cond=None):
        y = None if cond is None else cond.get("y")
        x0_u = self.net(x_t, t, {"y": None})
        if y is None:
            return x0_u
        return dfd.cfg(self.net(x_t, t, {"y": y}), x0_u, self.g)


# ---------------------------------------------------------------------------------------------------
# Settings.


@dataclass
class ToyConfig:
    """Everything that defines one toy run besides the arm."""

    dataset: str = "ring_shared"  # ring | grid | ring_cond | ring_shared
    std: float = 0.2  # component std s (VEEGAN / PacGAN use 0.02; see docs/toy.md for why 0.2)
    guidance: float = 3.0  # g of the CFG teacher on conditional data (Cosmos uses 3); ignored without labels
    teacher: str = "exact"  # exact | mlp (the stage-0 MLP as the teacher)
    hidden: int = 64  # MLP width (student, fake score, stage-0 fit)
    batch: int = 256  # per update, both networks
    lr: float = 1e-3  # Adam, student
    lr_fake: float = 1e-3  # Adam, fake score
    fake_updates: int = 4  # k fake-score updates per student update (FastGen student_update_freq = 5)
    fit_steps: int = 400  # stage 0: MLP regression on the exact x0
    stage1_steps: int = 300  # stage 1: DMD pre-training
    steps: int = 200  # stage 2 arms (the paper post-trains 100-300 steps); stage 3 runs stage1_steps + steps
    n_eval: int = 2500  # samples per evaluation (VEEGAN / PacGAN use 2,500)
    student_ts: tuple[float, ...] = (0.999, 0.75, 0.5, 0.25)  # DMD2's 4 steps unshifted (see MLPDenoiser, docs)
    fourier: bool = True  # Fourier features of x_t in the MLPs


@dataclass
class Arm:
    name: str
    p: float
    space: str = "x0"
    pairing: str = "paired"
    stage: int = 2  # 2: from the stage-1 DMD checkpoint; 3: from the stage-0 (teacher) initialisation
    lr_scale: float = 1.0  # student learning rate x this
    pull: float = 0.0  # > 0: DMD plus an explicit pull of G toward its paired real sample (PullTeacher)
    p_t_min: float = 0.0  # dfd.DFDConfig.p_t_min: DFD only where t >= p_t_min


ARMS = {a.name: a for a in [
    Arm("dmd", 0.0),
    Arm("dmd_lowlr", 0.0, lr_scale=0.25),
    Arm("dmd_pull", 0.0, pull=0.5),
    Arm("dfd_p0.5", 0.5),
    Arm("dfd_p1", 1.0),
    Arm("dfd_p1_hi", 1.0, p_t_min=0.5),
    Arm("dfd_p0.5_score", 0.5, space="score"),
    Arm("dfd_p1_score", 1.0, space="score"),
    Arm("dfd_p0.5_indep", 0.5, pairing="independent"),
    Arm("dfd_p0.5_ot", 0.5, pairing="ot"),
    Arm("scratch_dfd_p0.5", 0.5, stage=3),
    Arm("scratch_dfd_p1", 1.0, stage=3),
]}
DEMO_ARMS = ["dmd", "dfd_p1"]
STUDY_ARMS = ["dmd", "dmd_lowlr", "dmd_pull", "dfd_p0.5", "dfd_p1", "dfd_p1_hi"]  # --all: the controls of docs/toy.md


def dataset(cfg: ToyConfig) -> gmm_lib.GMM:
    if cfg.dataset not in gmm_lib.DATASETS:
        raise ValueError(f"--dataset: expected one of {sorted(gmm_lib.DATASETS)}, got {cfg.dataset!r}")
    return gmm_lib.DATASETS[cfg.dataset](std=cfg.std)


# ---------------------------------------------------------------------------------------------------
# Data for dfd.train: batches (x_real [B, 2], cond = {"y": labels or None}), and the pairings as dfd's `pair` hook.


def stream(gmm: gmm_lib.GMM, batch: int, seed: int):
    """An endless iterator of data batches, seeded."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        y = gmm.sample_labels(batch, gen) if gmm.conditional else None
        yield gmm.sample(batch, gen, y), {"y": y}


class Pairing:
    """dfd's `pair` hook: x_real [B, 2] re-assigned to the student's samples G [B, 2], within each class.
    independent: a random cyclic shift of the class's samples (a random permutation with no fixed point,
    so no G keeps the x its input was made from); ot: scipy's linear_sum_assignment on ||G - x||^2."""

    def __init__(self, kind: str, seed: int):
        if kind not in ("independent", "ot"):
            raise ValueError(f"pairing: expected independent | ot, got {kind!r}")
        self.kind, self.gen = kind, torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def __call__(self, G: torch.Tensor, x_real: torch.Tensor, cond) -> torch.Tensor:
        from scipy.optimize import linear_sum_assignment

        y = None if cond is None else cond.get("y")
        B = x_real.shape[0]
        idx = torch.arange(B)  # idx[i]: the real sample the teacher sees for G[i]
        for rows in [torch.arange(B)] if y is None else [(y == k).nonzero().squeeze(1) for k in y.unique()]:
            if self.kind == "independent":
                cycle = rows[torch.randperm(len(rows), generator=self.gen)]
                idx[cycle] = cycle.roll(1)
            else:
                r, c = linear_sum_assignment((torch.cdist(G[rows].double(), x_real[rows].double()) ** 2).numpy())
                idx[rows[r]] = rows[c]
        return x_real[idx]


# ---------------------------------------------------------------------------------------------------
# Stages.


def fit_teacher_mlp(gmm: gmm_lib.GMM, cfg: ToyConfig, seed: int) -> MLPDenoiser:
    """Stage 0: regress an MLP onto the exact (unguided) x0, in velocity units so every t counts alike;
    conditional mixtures get both the class-conditional and the unconditional ("no label") branch."""
    torch.manual_seed(seed)
    net = MLPDenoiser(gmm.n_classes, cfg.hidden, fourier=cfg.fourier)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.fit_steps)
    gen = torch.Generator().manual_seed(seed + 17)
    for _ in range(cfg.fit_steps):
        B = 512
        y = gmm.sample_labels(B, gen) if gmm.conditional else None
        x0 = gmm.sample(B, gen, y)
        t = torch.rand(B, generator=gen) * 0.999 + 0.0005
        x_t = dfd.forward_diffusion(x0, torch.randn(B, 2, generator=gen), t)
        if y is not None:  # drop the label for a quarter of the batch (the unconditional branch)
            drop = torch.rand(B, generator=gen) < 0.25
            target = torch.where(drop[:, None], gmm.x0(x_t, t), gmm.x0(x_t, t, y))
            pred = torch.cat([net(x_t[drop], t[drop], {"y": None}), net(x_t[~drop], t[~drop], {"y": y[~drop]})])
            target = torch.cat([target[drop], target[~drop]])
            tt = torch.cat([t[drop], t[~drop]])
        else:
            target, pred, tt = gmm.x0(x_t, t), net(x_t, t, None), t
        loss = (((pred - target) / dfd.expand(tt, pred)) ** 2).mean()  # || v_hat - v ||^2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net


@dataclass
class State:
    student: nn.Module
    fake: nn.Module


def run_dfd(state: State, teacher, gmm: gmm_lib.GMM, cfg: ToyConfig, arm: Arm, steps: int, seed: int) -> list[dict]:
    """Trains state.student / state.fake in place with dfd.train; returns the per-step logs."""
    # per-dimension data variance (component means' spread + s^2): dfd's default warning level (2.0) assumes
    # unit variance; here E||x - x'||^2 / d of two independent data samples is 2 var (4.08 ring, 16.08 grid)
    w, mu = gmm.weights[:, None], gmm.means
    var = ((w * (mu - (w * mu).sum(0)) ** 2).sum(0).mean() + gmm.std**2).item()
    c = dfd.DFDConfig(p=arm.p, space=arm.space, fake_updates=cfg.fake_updates, seed=seed, delta2_warn=2 * var,
                      student_ts=cfg.student_ts, p_t_min=arm.p_t_min)
    opt_s = torch.optim.Adam(state.student.parameters(), lr=cfg.lr * arm.lr_scale)
    opt_f = torch.optim.Adam(state.fake.parameters(), lr=cfg.lr_fake)
    pair = None if arm.pairing == "paired" else Pairing(arm.pairing, seed=seed + 2)
    if arm.pull > 0:
        teacher = PullTeacher(teacher, arm.pull)
        pair = teacher.pair
    logs: list[dict] = []
    dfd.train(state.student, teacher, state.fake, opt_s, opt_f, stream(gmm, cfg.batch, seed + 1), steps, c,
              log=lambda s, l: logs.append(l), pair=pair)
    return logs


@torch.no_grad()
def draw(student, gmm: gmm_lib.GMM, n: int, seed: int, ts=ToyConfig.student_ts, renoise: bool = True):
    """(x [n, 2], y [n] or None): n samples of dfd.sample with times ts, classes drawn with their weights.
    The teacher's own many-step samples: draw(teacher, ..., ts=TEACHER_TS, renoise=False) (the flow ODE)."""
    gen = torch.Generator().manual_seed(seed)
    y = gmm.sample_labels(n, gen) if gmm.conditional else None
    return dfd.sample(student, torch.randn(n, 2, generator=gen), {"y": y}, ts, gen, renoise), y


TEACHER_TS = tuple(float(t) for t in torch.linspace(0.999, 0.002, 200))  # 200 Euler steps of the flow ODE


def run_seed(cfg: ToyConfig, arms: list[str], seed: int, keep_samples: bool = True, progress=None) -> dict:
    """Stages 0-3 for one seed. Returns {row: {"metrics", "delta2", "samples", "labels"}} for the rows "teacher"
    (the guided teacher's 200-step flow-ODE samples), "init", "stage1" and each arm."""
    gmm = dataset(cfg)
    init = fit_teacher_mlp(gmm, cfg, seed)
    teacher = gmm_lib.ExactTeacher(gmm, cfg.guidance) if cfg.teacher == "exact" else MLPTeacher(init, cfg.guidance)
    x_ref = gmm.sample(cfg.n_eval, torch.Generator().manual_seed(10_000 + seed),
                       gmm.sample_labels(cfg.n_eval, torch.Generator().manual_seed(20_000 + seed))
                       if gmm.conditional else None)
    out: dict = {}

    def record(name, student, logs, ts=cfg.student_ts, renoise=True):
        x, y = draw(student, gmm, cfg.n_eval, 30_000 + seed, ts, renoise)
        out[name] = {"metrics": evaluate(x, gmm, x_ref, y), "delta2": [l["delta2"] for l in logs]}
        if keep_samples:
            out[name]["samples"], out[name]["labels"] = x, y

    gen = torch.Generator().manual_seed(40_000 + seed)  # the data row: a perfect sampler, each metric's floor
    y = gmm.sample_labels(cfg.n_eval, gen) if gmm.conditional else None
    x = gmm.sample(cfg.n_eval, gen, y)
    out["data"] = {"metrics": evaluate(x, gmm, x_ref, y), "delta2": []}
    if keep_samples:
        out["data"]["samples"], out["data"]["labels"] = x, y
    record("teacher", teacher, [], TEACHER_TS, renoise=False)  # the target: the teacher's own flow-ODE samples
    record("init", init, [])
    stage1 = State(copy.deepcopy(init), copy.deepcopy(init))
    logs1 = run_dfd(stage1, teacher, gmm, cfg, ARMS["dmd"], cfg.stage1_steps, seed=1000 * seed + 1)
    record("stage1", stage1.student, logs1)
    if progress is not None:
        progress.update(1)
    for name in arms:
        arm = ARMS[name]
        if arm.stage == 2:
            st = copy.deepcopy(stage1)
            logs = run_dfd(st, teacher, gmm, cfg, arm, cfg.steps, seed=1000 * seed + 2)
        else:
            st = State(copy.deepcopy(init), copy.deepcopy(init))
            logs = run_dfd(st, teacher, gmm, cfg, arm, cfg.stage1_steps + cfg.steps, seed=1000 * seed + 3)
        record(name, st.student, logs)
        if progress is not None:
            progress.update(1)
    return out


# ---------------------------------------------------------------------------------------------------
# The suite: jobs (cell, seed) -> tables (mean ± std, and paired differences with 95% intervals), JSON, figures.

METRICS = ["modes", "hq", "kl", "kl_cond", "off_class", "var_ratio", "shift", "energy", "delta2_start", "delta2"]
HEADERS = {"modes": "modes", "hq": "% HQ", "kl": "KL(q‖w)", "kl_cond": "KL per class", "off_class": "% off class",
           "var_ratio": "var ratio", "shift": "shift (std)", "energy": "energy dist", "delta2_start": "delta^2 start",
           "delta2": "delta^2 end"}
DIGITS = {"modes": 1, "hq": 1, "kl": 3, "kl_cond": 3, "off_class": 1, "var_ratio": 2, "shift": 2, "energy": 3,
          "delta2_start": 3, "delta2": 3}
PAIRED = ["kl_cond", "kl", "hq", "var_ratio", "shift", "energy"]  # paired differences arm - control
# Every choice in docs/toy.md (features, times, steps, g, arms, metrics) was made looking at seed 0 of earlier
# probes and at TUNING_SEEDS; HELD_OUT_SEEDS were run once, after those choices were fixed: the headline.
TUNING_SEEDS = tuple(range(10))
HELD_OUT_SEEDS = tuple(range(100, 110))


@dataclass
class Cell:
    """One table: a label, the settings and the arms run from each seed's stage-1 checkpoint."""

    label: str
    cfg: ToyConfig
    arms: list[str]


def _job(args) -> tuple[str, int, dict]:
    label, cfg, arms, seed, threads, keep = args
    torch.set_num_threads(threads)
    import warnings

    warnings.filterwarnings("ignore", message="validity condition")  # delta^2 is reported in the table instead
    return label, seed, run_seed(cfg, arms, seed, keep_samples=keep)


def _value(run: dict, m: str) -> float:
    if m.startswith("delta2"):  # mean over the first (delta2_start) or last (delta2) 10% of the row's steps
        d = run["delta2"]
        n = max(1, len(d) // 10)
        return sum(d[:n] if m == "delta2_start" else d[-n:]) / n if d else math.nan
    return float(run["metrics"][m])


def summarise(runs: dict[int, dict], rows: list[str]) -> dict:
    """{row: {metric: {"mean", "std", "values", "n_finite"}}} over the seeds of `runs`."""
    out = {}
    for r in rows:
        out[r] = {}
        for m in METRICS:
            vals = [_value(runs[s][r], m) for s in sorted(runs)]
            fin = [v for v in vals if math.isfinite(v)]
            mean = sum(fin) / len(fin) if fin else math.nan
            std = math.sqrt(sum((v - mean) ** 2 for v in fin) / (len(fin) - 1)) if len(fin) > 1 else math.nan
            out[r][m] = {"mean": mean, "std": std, "values": vals, "n_finite": len(fin)}
    return out


def paired(runs: dict[int, dict], arms: list[str], control: str = "dmd") -> dict:
    """{arm: {metric: {"mean", "lo", "hi", "n", "n_below", "values"}}}: the per-seed difference arm - control (both
    from the same seed's stage-1 checkpoint), its mean with a 95% Student-t interval, and the number of seeds where
    it is < 0."""
    from scipy.stats import t as student_t

    out = {}
    for a in arms:
        if a == control:
            continue
        out[a] = {}
        for m in PAIRED:
            d = [_value(runs[s][a], m) - _value(runs[s][control], m) for s in sorted(runs)]
            d = [v for v in d if math.isfinite(v)]
            n = len(d)
            mean = sum(d) / n if n else math.nan
            half = (student_t.ppf(0.975, n - 1) * math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1) / n)
                    if n > 1 else math.nan)
            out[a][m] = {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n,
                         "n_below": sum(v < 0 for v in d), "values": d}
    return out


def _fmt(e: dict, m: str, n: int) -> str:
    if not math.isfinite(e["mean"]):
        return "n/a"
    nd = DIGITS[m]
    s = f"{e['mean']:.{nd}f}" + (f" ± {e['std']:.{nd}f}" if n > 1 else "")  # one seed: no spread to show
    return s if e["n_finite"] == n else s + f" ({n - e['n_finite']} not finite)"


def _seeds(seeds: list[int]) -> str:
    if len(seeds) == 1:
        return f"seed {seeds[0]}"
    return f"seeds {seeds[0]}-{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1)) else f"seeds {seeds}"


def markdown(summary: dict, seeds: list[int], title: str) -> str:
    n = len(seeds)
    lines = [f"**{title}** ({'mean ± std over ' if n > 1 else ''}{_seeds(seeds)})", "",
             "| row | " + " | ".join(HEADERS[m] for m in METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for r, e in summary.items():
        lines.append(f"| {r} | " + " | ".join(_fmt(e[m], m, n) for m in METRICS) + " |")
    return "\n".join(lines)


def paired_markdown(diffs: dict, seeds: list[int], title: str) -> str:
    lines = [f"**{title}: arm - dmd (continued DMD), paired by seed; mean [95% interval], seeds where < 0** "
             f"({_seeds(seeds)})", "", "| arm | " + " | ".join(HEADERS[m] for m in PAIRED) + " |",
             "|---" * (len(PAIRED) + 1) + "|"]
    for a, e in diffs.items():
        cells = []
        for m in PAIRED:
            v, nd = e[m], DIGITS[m] + 1
            cells.append("n/a" if not v["n"] else f"{v['mean']:+.{nd}f} [{v['lo']:+.{nd}f}, {v['hi']:+.{nd}f}] "
                                                  f"{v['n_below']}/{v['n']}")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_suite(cells: list[Cell], groups: dict[str, list[int]], out_dir: str, workers: int, threads: int,
              theory_too: bool = False) -> dict:
    """Runs every cell on every seed of every group ({"tuning": [...], "held-out": [...]}), writes results.md,
    results.json and, per cell, <label>.png (samples of the first seed) and <label>_paired.png (per-seed paired
    differences, with >= 2 seeds), and with theory_too the toy/theory.py report."""
    from tqdm import tqdm

    from toy import plots

    os.makedirs(out_dir, exist_ok=True)
    seeds = sorted({s for g in groups.values() for s in g})
    last = list(groups)[-1]  # figures: the last group (held-out in --all), samples of its first seed
    jobs = [(c.label, c.cfg, c.arms, s, threads, s == groups[last][0]) for c in cells for s in seeds]
    results: dict[str, dict[int, dict]] = {c.label: {} for c in cells}
    t0 = time.time()
    with tqdm(total=len(jobs), desc="toy (cell x seed)", unit="run", disable=len(jobs) < 2) as bar:
        if workers > 1 and len(jobs) > 1:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(workers) as pool:
                for label, s, r in pool.imap_unordered(_job, jobs):
                    results[label][s] = r
                    bar.update(1)
        else:
            for job in jobs:
                label, s, r = _job(job)
                results[label][s] = r
                bar.update(1)
    report = {"groups": groups, "seconds": time.time() - t0, "cells": {}}
    md = []
    for c in cells:
        rows = ["data", "teacher", "init", "stage1"] + c.arms
        g = f"g = {c.cfg.guidance:g}" if dataset(c.cfg).conditional else "unconditional"
        title = f"{c.label} ({c.cfg.dataset}, {g}, stage 1 {c.cfg.stage1_steps} + {c.cfg.steps} steps)"
        rep = report["cells"][c.label] = {"config": vars(c.cfg), "arms": {a: vars(ARMS[a]) for a in c.arms}}
        for name, ss in groups.items():
            runs = {s: results[c.label][s] for s in ss}
            rep[name] = {"summary": summarise(runs, rows)}
            md.append(markdown(rep[name]["summary"], ss, f"{title}, {name} seeds"))
            if "dmd" in c.arms and len(c.arms) > 1 and len(ss) > 1:
                rep[name]["paired"] = paired(runs, c.arms)
                md.append(paired_markdown(rep[name]["paired"], ss, f"{c.label}, {name} seeds"))
        r0 = results[c.label][groups[last][0]]
        summ = rep[last]["summary"]
        dfd_arm = "dfd_p1" if "dfd_p1" in c.arms else next((a for a in c.arms if a.startswith("dfd")), c.arms[-1])
        cols = [r for r in dict.fromkeys(["data", "stage1", "dmd", dfd_arm]) if r in r0]
        plots.arms_figure(dataset(c.cfg), [(r, r0[r]["samples"], r0[r]["labels"], summ[r]) for r in cols],
                          os.path.join(out_dir, f"{c.label}.png"),
                          f"{title}: samples of seed {groups[last][0]}; numbers: mean over {_seeds(groups[last])}")
        if "paired" in rep[last]:
            plots.paired_figure(rep[last]["paired"], os.path.join(out_dir, f"{c.label}_paired.png"),
                                f"{c.label}: arm - continued DMD per seed ({_seeds(groups[last])}), mean and 95% "
                                "interval")
    text = "\n\n".join(md)
    theory.write_atomic(os.path.join(out_dir, "results.md"), text + "\n")
    theory.write_atomic(os.path.join(out_dir, "results.json"), json.dumps(report, indent=1, allow_nan=True))
    print(text)
    if theory_too:

        print()
        report["theory"] = theory.report(out_dir, std=cells[0].cfg.std)
    print(f"\n{time.time() - t0:.1f} s; wrote {', '.join(sorted(os.listdir(out_dir)))} to {out_dir}")
    return report


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=None, help=f"comma list of {sorted(gmm_lib.DATASETS)} (demo: ring_shared)")
    ap.add_argument("--arms", default=None, help=f"comma list of {list(ARMS)} (demo: {','.join(DEMO_ARMS)})")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds, from --first-seed (demo: 1)")
    ap.add_argument("--first-seed", type=int, default=0, help="first seed (default 0)")
    ap.add_argument("--steps", type=int, default=None, help="student steps per stage-2 arm")
    ap.add_argument("--stage1-steps", type=int, default=None, help="student steps of DMD pre-training")
    ap.add_argument("--fit-steps", type=int, default=None, help="stage-0 regression steps of the MLP init")
    ap.add_argument("--std", type=float, default=None, help="component std s")
    ap.add_argument("--guidance", type=float, default=None, help="CFG scale g of a conditional teacher (default 3)")
    ap.add_argument("--teacher", choices=["exact", "mlp"], default="exact")
    ap.add_argument("--all", action="store_true",
                    help="the study of docs/toy.md: ring_shared g = 3 with every control and its g = 1 control, "
                         f"tuning seeds {TUNING_SEEDS[0]}-{TUNING_SEEDS[-1]} and held-out seeds "
                         f"{HELD_OUT_SEEDS[0]}-{HELD_OUT_SEEDS[-1]}, and toy/theory.py")
    ap.add_argument("--out", default=os.path.join("out", "toy"), help="output folder (default out/toy)")
    ap.add_argument("--overwrite", action="store_true", help="start afresh in an --out that holds an earlier run's "
                    "results, after renaming that folder to <out>.old-<date>-<time>")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: 2 with --all, else 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (tiny MLPs: 1 is fastest)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    a = parse(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("toy/mixture.py runs on one process; got WORLD_SIZE > 1 (do not launch it with torchrun)")
    datasets = (a.dataset or "ring_shared").split(",")
    for d in datasets:
        if d not in gmm_lib.DATASETS:
            raise SystemExit(f"--dataset: expected a comma list of {sorted(gmm_lib.DATASETS)}, got {d!r}")
    arms = (a.arms or ",".join(STUDY_ARMS if a.all else DEMO_ARMS)).split(",")
    for r in arms:
        if r not in ARMS:
            raise SystemExit(f"--arms: expected a comma list of {list(ARMS)}, got {r!r}")
    if a.seeds is not None and a.seeds < 1:
        raise SystemExit(f"--seeds: expected >= 1, got {a.seeds}")
    cfg = ToyConfig(teacher=a.teacher)
    for k in ("steps", "stage1_steps", "fit_steps", "std", "guidance"):
        v = getattr(a, k)
        if v is not None:
            if v <= 0 and k != "guidance":
                raise SystemExit(f"--{k.replace('_', '-')}: expected > 0, got {v}")
            cfg = replace(cfg, **{k: v})
    cells = [Cell(d, replace(cfg, dataset=d), arms) for d in datasets]
    if a.all and a.seeds is None:
        groups = {"tuning": list(TUNING_SEEDS), "held-out": list(HELD_OUT_SEEDS)}
    else:
        groups = {"run": list(range(a.first_seed, a.first_seed + (a.seeds or 1)))}
    if a.all and a.dataset is None:  # the guidance control: the same student with an unguided teacher
        cells.append(Cell("ring_shared_g1", replace(cfg, dataset="ring_shared", guidance=1.0), ["dmd"]))
    held = theory.earlier_results(a.out, ("results.json", "results.md", "theory.json"))
    if held and not a.overwrite:  # a new run would mix its files with the earlier run's (figures of other cells)
        raise SystemExit(f"error: --out {a.out} already holds an earlier run ({', '.join(held)}); pass --overwrite "
                         "to move it aside and start afresh, or give another --out")
    if held:
        aside = f"{os.path.normpath(a.out)}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(a.out, aside)
        print(f"--overwrite: moved the earlier run in {a.out} to {aside}")
    workers = a.workers if a.workers is not None else (2 if a.all else 1)
    torch.set_num_threads(a.threads)
    print(f"toy: {[c.label for c in cells]}, arms {arms}, {groups}, stage 1 {cfg.stage1_steps} + stage 2 "
          f"{cfg.steps} steps, teacher {cfg.teacher}; output -> {os.path.abspath(a.out)}")
    return run_suite(cells, groups, a.out, workers, a.threads, theory_too=a.all)


if __name__ == "__main__":
    main()
