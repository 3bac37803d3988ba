"""The run folder: training checkpoints (atomic, with --resume) and the metric log."""
from __future__ import annotations

import atexit
import json
import os
import pickle
import random
import re
import shutil
import socket
import sys
import time

import numpy as np
import torch
import torch.nn as nn

from dfd_video.distributed import Dist, full_state_dict, on_main_rank
from dfd_video.files import fill_temp_folder, move_aside, torch_save, write_error, write_text


CKPT_DIR = "checkpoints"
CKPT_FILES = ("student", "fake", "ema", "discriminator")
CKPT_NAME = re.compile(r"(step-\d{6}|iteration-\d{7})")  # dfd_video.length.RunLength.name: the run's unit


RUN_FILES = (CKPT_DIR, "metrics.jsonl", "args.json")  # what makes a folder a training run's


def run_files(out: str) -> list[str]:
    """The parts of a training run `out` already holds: a second run there without --resume would mix with it."""
    return [x for x in RUN_FILES if os.path.lexists(os.path.join(out, x))]


def start_run_folder(out: str, overwrite: bool) -> None:
    """Rank 0, before training writes anything: with `overwrite`, renames an earlier run in `out` to
    out.old-<time> (and says so); removes the temporaries a killed run left (*.tmpPID, *.oldPID); creates `out`."""
    if overwrite and run_files(out):
        aside = move_aside(out)
        print(f"--overwrite: moved the earlier run in {out} to {aside}", file=sys.stderr)
    for folder in (out, os.path.join(out, CKPT_DIR)):
        for x in os.listdir(folder) if os.path.isdir(folder) else []:
            if re.fullmatch(r".+\.(tmp|old)\d+", x):
                path = os.path.join(folder, x)
                shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    os.makedirs(out, exist_ok=True)


def save_checkpoint(folder: str, step: int, nets: dict[str, nn.Module], opts: dict[str, torch.optim.Optimizer],
                    extra: dict, d: Dist, keep: int = 2, weights_of=None, name: str | None = None) -> str | None:
    """A collective: gathers full state dicts and optimizer states, rank 0 writes out/checkpoints/<name> (default
    step-NNNNNN) through a temporary folder and a rename, then points `latest` at it; keeps the newest `keep`.
    weights_of(net): what is saved of each network (default full_state_dict; LoRA runs: the adapter weights)."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    opt_full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = {name: (weights_of or full_state_dict)(net) for name, net in nets.items()}
    optim = {name: get_optimizer_state_dict(nets[name], opt, options=opt_full) for name, opt in opts.items()}
    final = os.path.join(folder, CKPT_DIR, name or f"step-{step:06d}")

    def fill(tmp: str) -> None:
        for name, sd in weights.items():
            save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(tmp, f"{name}.safetensors"))
        torch_save({"step": step, "optim": optim, "rng": rng_state(), **extra}, os.path.join(tmp, "state.pt"))

    def write() -> None:
        root = os.path.dirname(final)
        refuse_non_finite_save(weights, step, root)
        os.makedirs(root, exist_ok=True)
        # torch.save reports a full disk as a RuntimeError, safetensors as its own error
        tmp = fill_temp_folder(final, fill, also=(RuntimeError,))
        if os.path.exists(final):  # re-saving a step after a resume: move the old one out of the way first
            old = f"{final}.old{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        write_text(os.path.join(root, "latest"), os.path.basename(final) + "\n")
        done = sorted(x for x in os.listdir(root) if CKPT_NAME.fullmatch(x))
        for x in done[:-keep] if keep > 0 else []:
            shutil.rmtree(os.path.join(root, x), ignore_errors=True)
    on_main_rank(d, write)  # every rank stops with rank 0 if the disk is full
    return final if d.main else None


def latest_checkpoint(path: str) -> str:
    """Resolves a run folder, its checkpoints/ folder, a `latest` pointer or a step folder to a step folder."""
    for cand in (path, os.path.join(path, CKPT_DIR)):
        ptr = os.path.join(cand, "latest") if os.path.isdir(cand) else cand
        if os.path.basename(ptr) == "latest" and os.path.isfile(ptr):
            return os.path.join(os.path.dirname(ptr), open(ptr).read().strip())
    if os.path.isfile(os.path.join(path, "state.pt")):
        return path
    raise ValueError(f"{path}: no training checkpoint (expected a step folder with state.pt, or a `latest` pointer)")


def load_checkpoint(path: str, state: bool = True, weights: bool = True) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """(weights by name, state) from a step folder written by save_checkpoint. state.pt is read with
    weights_only=True: tensors and plain values only, so a run folder from elsewhere cannot run code on --resume.
    state=False reads the weights alone (sample, export), as any checkpoint's safetensors can be; weights=False the
    state alone (train reads each network's weights on rank 0 only, with read_weights)."""
    from safetensors.torch import load_file
    folder = latest_checkpoint(path)
    try:
        st = torch.load(os.path.join(folder, "state.pt"), map_location="cpu", weights_only=True) if state else {}
        found = {n: load_file(os.path.join(folder, f"{n}.safetensors")) for n in CKPT_FILES
                 if weights and os.path.exists(os.path.join(folder, f"{n}.safetensors"))}
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        raise ValueError(f"{folder}/state.pt holds a pickled Python object ({found[1] if found else '?'}), and "
                         "unpickling can run any code: refused (a training checkpoint holds tensors and plain values "
                         "only; one written before this check pickled numpy's RNG state and cannot be resumed, but "
                         "sample and export still read its weights)") from None
    except Exception as e:
        raise ValueError(f"{folder}: corrupt training checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    return found, st


def read_weights(path: str, name: str) -> dict[str, torch.Tensor] | None:
    """One network's weights ("student", "fake", "ema", "discriminator") of a training checkpoint; None when it has
    none."""
    from safetensors.torch import load_file
    file = os.path.join(latest_checkpoint(path), f"{name}.safetensors")
    if not os.path.exists(file):
        return None
    try:
        return load_file(file)
    except Exception as e:
        raise ValueError(f"{file}: corrupt training checkpoint ({type(e).__name__}: {str(e)[:200]})") from None


def rng_state() -> dict:
    """Every RNG's state as tensors and plain values (numpy's key array as a list), for weights_only=True."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "python": random.getstate(),
          "numpy": [name, keys.tolist(), pos, has_gauss, gauss]}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    name, keys, pos, has_gauss, gauss = st["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


class MetricLog:
    """Appends to `path`; lines of steps >= start (logged after the checkpoint a resumed run restarts from) are
    dropped first, so the file holds each step once."""

    def __init__(self, path: str | None, total: int, start: int, main: bool):
        self.main = main
        if main and path and os.path.exists(path):
            keep = [line for line in open(path) if line.strip() and json.loads(line).get("step", -1) < start]
            write_text(path, "".join(keep))
        self.path = path
        self.file = open(path, "a") if (main and path) else None
        self.bar = None
        if main:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True, file=sys.stderr)

    def __call__(self, step: int, logs: dict[str, float]) -> None:
        if not self.main:
            return
        if self.file:
            try:
                self.file.write(json.dumps({"step": step, **logs}) + "\n")
                self.file.flush()
            except OSError as e:  # a file object's error names no file
                raise OSError(write_error(self.path, e)) from None
        if self.bar:
            self.bar.update(1)
            shown = ("loss_student", "loss_fake", "delta2", "dfd", "samples_per_s", "mfu_pct")
            self.bar.set_postfix({k: f"{logs[k]:.3g}" for k in shown if k in logs})

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.bar:
            self.bar.close()


# ---------------------------------------------------------------------------------------------------
# Nothing mixed or lost: one run per folder (a lock), weights that are numbers, resumes that say what changed.

LOCK = "run.lock"  # in the run folder while a run owns it: {"pid", "host", "start", "since", "argv"}
SEGMENTS = "segments.jsonl"  # one line per start of a run (fresh or --resume): its step, flags and what changed
_HELD: dict[str, bool] = {}  # lock files this process holds -> whether it created their run folder


def held_run_error(out: str) -> str | None:
    """The line refusing a fresh run (no --resume, no --overwrite) into a folder that holds one; None if it holds
    none."""
    held = run_files(out)
    return (f"--out {out} already holds a run ({', '.join(held)}): pass --resume to continue it, or --overwrite to "
            f"move it to {os.path.normpath(out)}.old-<date>-<time> and start afresh") if held else None


def claim_run_folder(out: str, overwrite: bool, resume: bool = False) -> None:
    """Rank 0, before training writes anything: locks `out` against a second run (lock_run_folder), checks again,
    now that no other run can start there, that a fresh run finds no earlier one (another may have finished in it
    since the flags were checked), then start_run_folder. With `overwrite` the earlier run is moved aside only after
    the lock showed that no live run owns it. release_run_locks (at the end of every command) unlocks, and removes
    `out` again if this run created it and wrote nothing (e.g. it was interrupted while loading)."""
    created = not os.path.isdir(out)
    os.makedirs(out, exist_ok=True)
    lock_run_folder(out, created)
    held = None if overwrite or resume else held_run_error(out)
    if held:
        raise ValueError(held)
    if overwrite and run_files(out):
        _unlock(os.path.join(out, LOCK))  # it would move aside with the earlier run
        start_run_folder(out, overwrite=True)
        lock_run_folder(out, created=True)
    else:
        start_run_folder(out, overwrite=False)


def lock_run_folder(out: str, created: bool = False) -> None:
    """Creates <out>/run.lock (atomically, with os.link, which is atomic on NFS too), or a ValueError naming the
    live run that holds it. A lock whose process is gone (same host, pid not running or now another process) is
    taken over with a line on stderr; one from another host cannot be checked and is refused."""
    path = os.path.join(out, LOCK)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid()),
          "since": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": " ".join(sys.argv)[:300]}
    tmp = f"{path}.tmp{os.getpid()}"
    write_text(tmp, json.dumps(me))
    try:
        for _ in range(3):
            try:
                os.link(tmp, path)
                _HELD[os.path.abspath(path)] = created
                atexit.unregister(release_run_locks)  # registered once
                atexit.register(release_run_locks)
                return
            except FileExistsError:
                pass
            owner = _read_lock(path)
            gone = _lock_is_stale(owner)
            if gone is None:
                raise ValueError(f"--out {out} is in use by another run: pid {owner.get('pid')} on "
                                 f"{owner.get('host')}, since {owner.get('since')}; wait for it to end or choose "
                                 f"another --out (if that run is gone, delete {path})")
            try:
                os.remove(path)
            except FileNotFoundError:
                continue  # another run took it over first
            print(f"--out {out}: took over the lock of an earlier run ({gone})", file=sys.stderr)
        raise ValueError(f"--out {out}: could not lock it ({path} keeps changing: another run is starting there)")
    finally:
        if os.path.exists(tmp):  # (a run cleaning its folder's temporaries may have taken it)
            os.remove(tmp)


def _read_lock(path: str) -> dict:
    try:
        with open(path) as f:
            owner = json.load(f)
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` (Linux /proc, clock ticks since boot): tells a reused pid from the owner."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def _lock_is_stale(owner: dict) -> str | None:
    """Why the run that wrote this lock is certainly gone, or None when it may be alive."""
    pid, host = owner.get("pid"), owner.get("host")
    if not isinstance(pid, int):
        return "the lock file is unreadable"
    if host != socket.gethostname():
        return None  # its process cannot be looked up from here
    if pid == os.getpid():
        return None if any(_read_lock(p) == owner for p in _HELD) else "left by this process"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"pid {pid} is no longer running"
    except PermissionError:
        pass  # alive, another user's
    start = _process_start(pid)
    if owner.get("start") is not None and start is not None and start != owner["start"]:
        return f"pid {pid} is now another process"
    return None


def _unlock(path: str) -> None:
    if _read_lock(path).get("pid") == os.getpid():
        os.remove(path)


def release_run_locks() -> None:
    """Removes this process's run locks, and a run folder it created if nothing else was written there."""
    for path, created in list(_HELD.items()):
        _HELD.pop(path)
        try:
            _unlock(path)
            if created and os.path.isdir(os.path.dirname(path)) and not os.listdir(os.path.dirname(path)):
                os.rmdir(os.path.dirname(path))
        except OSError:
            pass  # the folder was moved or removed meanwhile; nothing of ours is left to clean


def non_finite(sd: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors of `sd` that hold a NaN or an infinity."""
    return [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def refuse_non_finite(sd: dict[str, torch.Tensor], source: str) -> None:
    """A ValueError naming `source` when weights to sample or export are not all finite numbers."""
    bad = non_finite(sd)
    if bad:
        raise ValueError(f"{source}: {len(bad)} of {len(sd)} weight tensors hold NaN or inf (e.g. {bad[0]}): the "
                         "run diverged before this checkpoint; use an earlier one")


def refuse_non_finite_save(weights: dict[str, dict[str, torch.Tensor]], step: int, root: str) -> None:
    """save_checkpoint's check (rank 0, before anything is written): a checkpoint of non-finite weights is never
    written, so the last checkpoint is always a good one."""
    for name, sd in weights.items():
        bad = non_finite(sd)
        if bad:
            latest = os.path.join(root, "latest")
            last = (f"the last good checkpoint {os.path.join(root, open(latest).read().strip())} is untouched"
                    if os.path.isfile(latest) else "no checkpoint was written")
            raise ValueError(f"training stopped: after student step {step} the {name} weights hold NaN or inf "
                             f"({len(bad)} of {len(sd)} tensors, e.g. {bad[0]}), so this step was not saved; {last} "
                             "(a diverged run: a smaller --lr / --lr-fake, or --grad-clip)")


def data_fingerprint(data: str | None) -> str | None:
    """sha256 over a prepared data folder's manifest and, per data file (shards, negative embedding), its size and
    first bytes (the safetensors header and the start of its first tensor): the same data set wherever it is copied
    to, another one of the same layout told apart, at a few kB read per shard."""
    import hashlib
    try:
        with open(os.path.join(data, "manifest.json"), "rb") as f:
            raw = f.read()
        h = hashlib.sha256(raw)
        m = json.loads(raw)
        for name in [x["file"] for x in m["shards"]] + ([m["negative"]] if m.get("negative") else []):
            with open(os.path.join(data, name), "rb") as f:
                head = int.from_bytes(f.read(8), "little")
                f.seek(0)
                h.update(f"{name} {os.fstat(f.fileno()).st_size}".encode() + f.read(8 + min(head, 2**24) + 4096))
        return h.hexdigest()
    except (OSError, ValueError, TypeError, KeyError):
        return None


# Train flags that do not change what a run computes, so --resume may change them freely: the length of the run,
# where and how often it saves, the hardware (a different rank count is checked by the global batch), logging and
# probes, and where the starting weights came from (a resume reads them from the checkpoint). Every other flag the
# checkpoint recorded must be the same, unless --allow-changes; a flag the checkpoint did not record is not compared.
RESUME_FREE = {"cmd", "steps", "iterations", "student_steps", "out", "resume", "overwrite", "allow_changes",
               "save_every", "keep", "monitor_every", "device", "no_checkpointing", "grad_accum", "dmd2_ckpt",
               "init_from", "fake_init", "bidirectional_ckpt", "rectified_flow_ckpt", "model_dir", "data", "lora_rank",
               "lora_alpha", "probe_every", "probe_prompts", "probe_count", "probe_seeds", "probe_sampler",
               "probe_encoder", "stop_on_drift", "tracker", "wandb_project", "peak_tflops", "causal_student", "preset"}


def resume_changes(saved: dict, now: dict, saved_data: str | None) -> dict[str, list]:
    """{flag: [the checkpoint's value, this command's]} for every compared flag that differs; --data compares the
    data sets (their manifests' fingerprints; the paths for checkpoints without one). lora.check_resume compares the
    LoRA flags."""
    norm = lambda v: list(v) if isinstance(v, tuple) else v
    changes = {k: [saved[k], now[k]] for k in sorted(saved.keys() & now.keys())
               if k not in RESUME_FREE and norm(saved[k]) != norm(now[k])}
    if "data" in saved and "data" in now:
        same = (data_fingerprint(now["data"]) == saved_data if saved_data is not None else
                os.path.realpath(str(saved["data"])) == os.path.realpath(str(now["data"])))
        if not same:
            changes["data"] = [saved["data"], now["data"]]
    return changes


def accept_resume(args, state: dict, folder: str, main: bool) -> dict[str, list]:
    """--resume's check of the flags against the checkpoint's (resume_changes): a change is refused unless
    --allow-changes; says (rank 0) which checkpoint and step the run continues from. Returns the changes."""
    changes = resume_changes(state.get("args") or {}, vars(args), state.get("data_manifest"))
    if changes and not getattr(args, "allow_changes", False):
        shown = "; ".join(f"--{k.replace('_', '-')} {new} (the checkpoint's: {old})" for k, (old, new) in changes.items())
        raise ValueError(f"--resume {folder}: this command changes what the run computes: {shown}. Resume with the "
                         "checkpoint's flags, or pass --allow-changes to continue with these (recorded in "
                         f"{os.path.join(args.out, SEGMENTS)})")
    if main:
        print(f"--resume: continuing from {folder} (saved after student step {state['step']}) at student step "
              f"{state['step'] + 1}" +
              (f"; changed: {', '.join('--' + k.replace('_', '-') for k in changes)}" if changes else ""),
              file=sys.stderr)
    return changes


def record_segment(out: str, args: dict, start: int, resumed_from: str | None, changes: dict) -> None:
    """Rank 0: args.json holds the flags the run started with and is never rewritten; segments.jsonl gets one line
    per start (fresh or resumed) with its first step, flags and the changes --allow-changes let through."""
    if not os.path.exists(os.path.join(out, "args.json")):
        write_text(os.path.join(out, "args.json"), json.dumps(args, indent=1))
    path = os.path.join(out, SEGMENTS)
    before = open(path).read() if os.path.exists(path) else ""
    line = {"start_step": start, "resumed_from": resumed_from, "changes": changes,
            "time": time.strftime("%Y-%m-%d %H:%M:%S"), "args": args}
    write_text(path, before + json.dumps(line) + "\n")


def metric_rows(run_folder: str) -> list[dict]:
    """The rows of a run's metrics.jsonl; [] without one."""
    path = os.path.join(run_folder, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def checkpoint_run(ckpt: str) -> tuple[str, int | None] | None:
    """(run folder, the last student step the checkpoint holds, counted from 0 as metrics.jsonl's "step") for a
    training checkpoint (a step folder, its run folder or `latest`), else None. The step comes from the folder's name:
    step-NNNNNN is that step; iteration-NNNNNNN (a run counted in FastGen iterations) is the logged step whose
    "iteration" it is; None when the name or the log does not tell."""
    try:
        folder = os.path.normpath(latest_checkpoint(ckpt))
    except ValueError:
        return None
    run, name = os.path.dirname(os.path.dirname(folder)), os.path.basename(folder)
    if m := re.fullmatch(r"step-(\d{6})", name):
        return run, int(m[1])
    if m := re.fullmatch(r"iteration-(\d{7})", name):
        return run, next((r["step"] for r in metric_rows(run) if r.get("iteration") == int(m[1])), None)
    return run, None


def run_args(run_folder: str, step: int | None = None) -> dict:
    """The flags of the segment of a run that trained `step` (None: the last segment), from segments.jsonl, else
    args.json; {} when the folder holds neither."""
    try:
        with open(os.path.join(run_folder, SEGMENTS)) as f:
            rows = [json.loads(x) for x in f if x.strip()]
        rows = [r for r in rows if step is None or r["start_step"] <= step] or rows
        return rows[-1]["args"]
    except (OSError, ValueError, KeyError, IndexError):
        pass
    try:
        with open(os.path.join(run_folder, "args.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def where_it_stopped(out: str) -> str:
    """For an interrupted train: the last student step logged in <out>/metrics.jsonl and the checkpoint to resume."""
    last = None
    try:
        with open(os.path.join(out, "metrics.jsonl")) as f:
            rows = [x for x in f if x.strip()]
        last = json.loads(rows[-1])["step"] if rows else None
    except (OSError, ValueError, KeyError):
        pass
    try:
        ckpt = latest_checkpoint(out)
    except (ValueError, OSError):
        ckpt = None
    done = f"after student step {last} (counted from 0)" if last is not None else "before the first student step"
    if ckpt is not None:
        return f"{done}; the last checkpoint, {ckpt}, continues: add --resume to the same command"
    if last is not None:
        return f"{done}; no checkpoint was written yet: run the same command with --overwrite to start again"
    return f"{done}; nothing was written"
