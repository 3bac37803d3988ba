"""The 2D toy: DMD vs DFD on Gaussian mixtures with an exact teacher, in seconds on a CPU.

    python toy/mixture.py                      # main demo (< 30 s on 2 cores): prints the table, writes figures
    python toy/mixture.py --all                # whole suite: every dataset and arm, 5 seeds
    python toy/mixture.py --dataset grid --arms dmd,dfd_p1 --seeds 3 --steps 400 --out out/mine

Protocol (mirrors the paper's recipe, Sec. 4.2 and 5.2):
  stage 0  an MLP denoiser is fitted to the exact teacher's x0 (regression on Tweedie's x0); it initialises the
           student and the fake score, as DMD2 initialises both from the teacher.
  stage 1  DMD pre-training (p = 0) from that initialisation -> the "degraded" stage-1 checkpoint.
  stage 2  arms from that same checkpoint (student, fake score): DMD continued (control), DFD p = 0.5 / 1,
           x0 vs score space, and three pairings of the teacher's real sample x with the student's sample G.
  stage 3  DFD from scratch (from the stage-0 initialisation, no DMD), the validity ablation.
Every update is dfd.train -> dfd.fake_score_step / dfd.student_step with a dfd.DFDConfig; this file only builds
networks, data streams and pairings, and measures.

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
from toy.metrics import evaluate


# ---------------------------------------------------------------------------------------------------
# Networks: x0 = x_t - t * F(x_t, t, y), the flow-velocity parametrisation (dfd.x0_from_v), so x0 -> x_t as t -> 0.


class MLPDenoiser(nn.Module):
    """A dfd Denoiser (x_t [B,2], t [B], cond) -> x0_hat [B,2]; cond = {"y": labels [B] or None, ...}."""

    def __init__(self, n_classes: int = 0, hidden: int = 128, depth: int = 3):
        super().__init__()
        self.n_classes = n_classes
        self.freqs = nn.Parameter(torch.tensor([1.0, 2.0, 4.0, 8.0]) * math.pi, requires_grad=False)
        d_in = 2 + 1 + 2 * len(self.freqs) + (n_classes + 1 if n_classes else 0)  # +1: the "no label" slot
        layers, d = [], d_in
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.SiLU()]
            d = hidden
        layers.append(nn.Linear(d, 2))
        self.net = nn.Sequential(*layers)

    def features(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        ang = t[:, None] * self.freqs[None]
        h = [x_t, t[:, None], ang.sin(), ang.cos()]
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

    dataset: str = "ring"  # ring | grid | ring_cond
    std: float = 0.2  # component std s (VEEGAN / PacGAN use 0.02; see toy-readme for why 0.2)
    guidance: float = 3.0  # g of the CFG teacher on ring_cond (Cosmos uses 3); ignored without labels
    teacher: str = "exact"  # exact | mlp (the stage-0 MLP as the teacher)
    hidden: int = 64  # MLP width (student, fake score, stage-0 fit)
    batch: int = 256  # per update, both networks
    lr: float = 1e-3  # Adam, student
    lr_fake: float = 1e-3  # Adam, fake score
    fake_updates: int = 4  # k fake-score updates per student update (FastGen student_update_freq = 5)
    fit_steps: int = 400  # stage 0: MLP regression on the exact x0
    stage1_steps: int = 200  # stage 1: DMD pre-training, short on purpose: a still-degraded student
    steps: int = 100  # stage 2 arms (the paper post-trains 100-300 steps); stage 3 runs stage1_steps + steps
    n_eval: int = 2500  # samples per evaluation (VEEGAN / PacGAN use 2,500)


@dataclass
class Arm:
    name: str
    p: float
    space: str = "x0"
    pairing: str = "paired"
    stage: int = 2  # 2: from the stage-1 DMD checkpoint; 3: from the stage-0 (teacher) initialisation


ARMS = {a.name: a for a in [
    Arm("dmd", 0.0),
    Arm("dfd_p0.5", 0.5),
    Arm("dfd_p1", 1.0),
    Arm("dfd_p0.5_score", 0.5, space="score"),
    Arm("dfd_p1_score", 1.0, space="score"),
    Arm("dfd_p0.5_indep", 0.5, pairing="independent"),
    Arm("dfd_p0.5_ot", 0.5, pairing="ot"),
    Arm("scratch_dfd_p0.5", 0.5, stage=3),
    Arm("scratch_dfd_p1", 1.0, stage=3),
]}
DEMO_ARMS = ["dmd", "dfd_p0.5", "dfd_p1"]


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
        y = gmm.sample_labels(batch, gen) if gmm.labels is not None else None
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
    net = MLPDenoiser(gmm.n_classes, cfg.hidden)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.fit_steps)
    gen = torch.Generator().manual_seed(seed + 17)
    for _ in range(cfg.fit_steps):
        B = 512
        y = gmm.sample_labels(B, gen) if gmm.labels is not None else None
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
    c = dfd.DFDConfig(p=arm.p, space=arm.space, fake_updates=cfg.fake_updates, seed=seed, delta2_warn=2 * var)
    opt_s = torch.optim.Adam(state.student.parameters(), lr=cfg.lr)
    opt_f = torch.optim.Adam(state.fake.parameters(), lr=cfg.lr_fake)
    pair = None if arm.pairing == "paired" else Pairing(arm.pairing, seed=seed + 2)
    logs: list[dict] = []
    dfd.train(state.student, teacher, state.fake, opt_s, opt_f, stream(gmm, cfg.batch, seed + 1), steps, c,
              log=lambda s, l: logs.append(l), pair=pair)
    return logs


@torch.no_grad()
def draw(student: nn.Module, gmm: gmm_lib.GMM, n: int, seed: int) -> torch.Tensor:
    """n samples from the student's 4-step sampler (dfd.sample), classes drawn with their weights."""
    gen = torch.Generator().manual_seed(seed)
    y = gmm.sample_labels(n, gen) if gmm.labels is not None else None
    return dfd.sample(student, torch.randn(n, 2, generator=gen), {"y": y}, generator=gen)


def run_seed(cfg: ToyConfig, arms: list[str], seed: int, keep_samples: bool = True, progress=None) -> dict:
    """Stages 0-3 for one seed. Returns {"stage1": {...}, arm: {"metrics", "delta2", "samples"}}."""
    gmm = dataset(cfg)
    init = fit_teacher_mlp(gmm, cfg, seed)
    teacher = gmm_lib.ExactTeacher(gmm, cfg.guidance) if cfg.teacher == "exact" else MLPTeacher(init, cfg.guidance)
    x_ref = gmm.sample(cfg.n_eval, torch.Generator().manual_seed(10_000 + seed),
                       gmm.sample_labels(cfg.n_eval, torch.Generator().manual_seed(20_000 + seed))
                       if gmm.labels is not None else None)
    out: dict = {}

    def record(name, student, logs):
        x = draw(student, gmm, cfg.n_eval, seed=30_000 + seed)
        out[name] = {"metrics": evaluate(x, gmm, x_ref), "delta2": [l["delta2"] for l in logs]}
        if keep_samples:
            out[name]["samples"] = x

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
# The suite: jobs (dataset, seed) -> table, JSON and figures.

METRICS = ["modes", "hq", "kl", "var_ratio", "shift", "energy", "delta2_start", "delta2"]
HEADERS = {"modes": "modes", "hq": "% HQ", "kl": "KL(q‖w)", "var_ratio": "var ratio", "shift": "shift (std)",
           "energy": "energy dist", "delta2_start": "delta^2 start", "delta2": "delta^2 end"}


def _job(args) -> tuple[str, int, dict]:
    cfg, arms, seed, threads = args
    torch.set_num_threads(threads)
    import warnings

    warnings.filterwarnings("ignore", message="validity condition")  # delta^2 is reported in the table instead
    return cfg.dataset, seed, run_seed(cfg, arms, seed, keep_samples=(seed == 0))


def summarise(runs: dict[int, dict], rows: list[str]) -> dict:
    """{row: {metric: {"mean", "std", "values"}}} over seeds; delta2 (delta2_start) = mean over the last
    (first) 10% of the row's student steps."""
    out = {}
    for r in rows:
        out[r] = {}
        for m in METRICS:
            vals = []
            for s in sorted(runs):
                if m.startswith("delta2"):
                    d = runs[s][r]["delta2"]
                    n = max(1, len(d) // 10)
                    part = d[:n] if m == "delta2_start" else d[-n:]
                    vals.append(sum(part) / n if d else math.nan)
                else:
                    vals.append(float(runs[s][r]["metrics"][m]))
            fin = [v for v in vals if math.isfinite(v)]
            mean = sum(fin) / len(fin) if fin else math.nan
            std = math.sqrt(sum((v - mean) ** 2 for v in fin) / (len(fin) - 1)) if len(fin) > 1 else 0.0
            out[r][m] = {"mean": mean, "std": std, "values": vals, "n_finite": len(fin)}
    return out


def _fmt(e: dict, m: str, n: int) -> str:
    if not math.isfinite(e["mean"]):
        return "n/a"
    nd = {"modes": 1, "hq": 1, "kl": 3, "var_ratio": 2, "shift": 2, "energy": 3, "delta2_start": 3, "delta2": 3}[m]
    s = f"{e['mean']:.{nd}f} ± {e['std']:.{nd}f}"
    return s if e["n_finite"] == n else s + f" ({n - e['n_finite']} diverged)"


def markdown(summary: dict, n_seeds: int, title: str) -> str:
    lines = [f"**{title}** (mean ± std over {n_seeds} seed{'s' if n_seeds > 1 else ''})", "",
             "| arm | " + " | ".join(HEADERS[m] for m in METRICS) + " |",
             "|---" * (len(METRICS) + 1) + "|"]
    for r, e in summary.items():
        lines.append(f"| {r} | " + " | ".join(_fmt(e[m], m, n_seeds) for m in METRICS) + " |")
    return "\n".join(lines)


def run_suite(cfg: ToyConfig, datasets: list[str], arms: list[str], seeds: int, out_dir: str, workers: int,
              threads: int, theory_too: bool = False) -> dict:
    from tqdm import tqdm

    os.makedirs(out_dir, exist_ok=True)
    jobs = [(replace(cfg, dataset=d), arms, s, threads) for d in datasets for s in range(seeds)]
    results: dict[str, dict[int, dict]] = {d: {} for d in datasets}
    t0 = time.time()
    with tqdm(total=len(jobs), desc="toy (dataset x seed)", unit="run", disable=len(jobs) < 2) as bar:
        if workers > 1 and len(jobs) > 1:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(workers) as pool:
                for d, s, r in pool.imap_unordered(_job, jobs):
                    results[d][s] = r
                    bar.update(1)
        else:
            for job in jobs:
                d, s, r = _job(job)
                results[d][s] = r
                bar.update(1)
    rows = ["init", "stage1"] + arms
    report = {"config": vars(cfg), "seeds": seeds, "arms": {a: vars(ARMS[a]) for a in arms},
              "seconds": time.time() - t0, "datasets": {}}
    md = []
    from toy import plots

    for d in datasets:
        summary = summarise(results[d], rows)
        report["datasets"][d] = summary
        g = replace(cfg, dataset=d).guidance if d == "ring_cond" else 1.0
        md.append(markdown(summary, seeds, f"{d}" + (f" (CFG teacher, g = {g:g})" if d == "ring_cond" else "")))
        r0 = results[d][min(results[d])]
        fig_rows = [(r, r0[r]["samples"], [results[d][s][r]["delta2"] for s in sorted(results[d])],
                     f"modes {summary[r]['modes']['mean']:.1f}  HQ {summary[r]['hq']['mean']:.0f}%  "
                     f"shift {summary[r]['shift']['mean']:.2f}  E {summary[r]['energy']['mean']:.3f}")
                    for r in rows]
        plots.arms_figure(dataset(replace(cfg, dataset=d)), fig_rows, os.path.join(out_dir, f"{d}.png"))
    text = "\n\n".join(md)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(report, f, indent=1, allow_nan=True)
    print(text)
    if theory_too:
        from toy import theory

        print()
        report["theory"] = theory.report(out_dir, std=cfg.std)
    print(f"\n{time.time() - t0:.1f} s; wrote {', '.join(sorted(os.listdir(out_dir)))} to {out_dir}")
    return report


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=None, help=f"comma list of {sorted(gmm_lib.DATASETS)} (demo: ring_cond)")
    ap.add_argument("--arms", default=None, help=f"comma list of {list(ARMS)} (demo: {','.join(DEMO_ARMS)})")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (demo 1, --all 5)")
    ap.add_argument("--steps", type=int, default=None, help="student steps per stage-2 arm")
    ap.add_argument("--stage1-steps", type=int, default=None, help="student steps of DMD pre-training")
    ap.add_argument("--fit-steps", type=int, default=None, help="stage-0 regression steps of the MLP init")
    ap.add_argument("--std", type=float, default=None, help="component std s")
    ap.add_argument("--guidance", type=float, default=None, help="CFG scale g of the ring_cond teacher")
    ap.add_argument("--teacher", choices=["exact", "mlp"], default="exact")
    ap.add_argument("--all", action="store_true", help="every dataset and arm, 5 seeds, and toy/theory.py")
    ap.add_argument("--out", default=os.path.join("out", "toy"), help="output folder (default out/toy)")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: 2 with --all, else 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (tiny MLPs: 1 is fastest)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    a = parse(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("toy/mixture.py runs on one process; got WORLD_SIZE > 1 (do not launch it with torchrun)")
    datasets = (a.dataset or ("ring,grid,ring_cond" if a.all else "ring_cond")).split(",")
    for d in datasets:
        if d not in gmm_lib.DATASETS:
            raise SystemExit(f"--dataset: expected a comma list of {sorted(gmm_lib.DATASETS)}, got {d!r}")
    arms = (a.arms or (",".join(ARMS) if a.all else ",".join(DEMO_ARMS))).split(",")
    for r in arms:
        if r not in ARMS:
            raise SystemExit(f"--arms: expected a comma list of {list(ARMS)}, got {r!r}")
    seeds = a.seeds if a.seeds is not None else (5 if a.all else 1)
    if seeds < 1:
        raise SystemExit(f"--seeds: expected >= 1, got {seeds}")
    cfg = ToyConfig(teacher=a.teacher)
    for k in ("steps", "stage1_steps", "fit_steps", "std", "guidance"):
        v = getattr(a, k)
        if v is not None:
            if v <= 0 and k != "guidance":
                raise SystemExit(f"--{k.replace('_', '-')}: expected > 0, got {v}")
            cfg = replace(cfg, **{k: v})
    workers = a.workers if a.workers is not None else (2 if a.all else 1)
    torch.set_num_threads(a.threads)
    print(f"toy: datasets {datasets}, arms {arms}, {seeds} seed(s), stage 1 {cfg.stage1_steps} + stage 2 "
          f"{cfg.steps} steps, teacher {cfg.teacher}; output -> {os.path.abspath(a.out)}")
    return run_suite(cfg, datasets, arms, seeds, a.out, workers, a.threads, theory_too=a.all)


if __name__ == "__main__":
    main()
