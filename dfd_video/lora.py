"""LoRA post-training (--lora-rank) and its export (export --lora), with peft through diffusers' own integration.

The student is its DMD2 weights, frozen, plus a trainable LoRA; the fake score is a LoRA too. When the fake score
starts from the teacher (the DMD2 checkpoint holds no critic, or --fake-init teacher), the two share one network:
the teacher's frozen base with the fake score's LoRA, disabled (net.disable_adapters()) for the teacher's calls
and enabled for the fake score's, so only two base networks sit in memory (teacher + student). The EMA (--ema)
covers the student's adapter weights only. Training checkpoints hold the adapter weights (student / fake / ema
.safetensors, parameter names of the peft-wrapped network) and their optimizer state; the base weights are read
again from the --dmd2-ckpt recorded in state.pt["lora"] (checked against a checksum) and from --model-dir.

Which layers get a LoRA is the adapter's `lora_targets` (a regular expression peft matches against whole module
names); `lora_loader` names the diffusers LoRA mixin whose save_lora_weights writes the export.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from dfd_video.distributed import Dist, on_main_rank, set_full_state_dict, shard
from dfd_video.runs import latest_checkpoint, load_checkpoint
from dfd_video.weights import describe_dmd2, load_weights, read_checkpoint

LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' save_lora_weights / load_lora_weights use


def add_lora_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LoRA", "train low-rank adapters on frozen bases instead of all weights (docs/lora.md)")
    g.add_argument("--lora-rank", type=int, default=0, help="LoRA rank r of the student and the fake score on the "
                   "attention q/k/v/out and FFN linears of every transformer block (0: train all weights)")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha; the update is (alpha / r) B A "
                   "(default: alpha = r, a scale of 1)")


def add_lora_base_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora-base", help="for a --lora-rank run's checkpoint: the DMD2 checkpoint under the adapter, "
                   "when it has moved since training (default: the path the checkpoint records; checksum-checked)")


def check_lora_flags(args: argparse.Namespace) -> list[str]:
    """One line per bad LoRA flag (dfd_video.cli.check_args shows the first)."""
    bad = []
    rank, alpha = getattr(args, "lora_rank", 0), getattr(args, "lora_alpha", None)
    if rank < 0:
        bad.append(f"--lora-rank {rank}: must be >= 1 (or 0: train all weights)")
    if alpha is not None and not rank:
        bad.append("--lora-alpha needs --lora-rank r")
    if alpha is not None and not alpha > 0:
        bad.append(f"--lora-alpha {alpha}: must be > 0")
    return bad


# ---------------------------------------------------------------------------------------------------
# Adapters on a network


def lora_info(args: argparse.Namespace, adapter) -> dict:
    """What a LoRA run records in its checkpoints (state.pt["lora"]) and what export / sample rebuild it from."""
    return {"rank": args.lora_rank, "alpha": float(args.lora_alpha or args.lora_rank), "targets": adapter.lora_targets}


def lora_config(info: dict):
    from peft import LoraConfig
    return LoraConfig(r=info["rank"], lora_alpha=info["alpha"], target_modules=info["targets"], lora_dropout=0.0,
                      init_lora_weights=True)


def is_lora_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def attach(net: nn.Module, info: dict, seed: int) -> nn.Module:
    """net.add_adapter(LoraConfig) on an unsharded network whose base weights are loaded. lora_A is drawn from a
    generator seeded with `seed` (the same on every rank), lora_B is zero: the network's output is unchanged.
    Leaves only the adapter weights trainable. ValueError when the rank exceeds a target layer's dims."""
    rank, targets = info["rank"], info["targets"]
    hits = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(targets, n)]
    if not hits:
        raise ValueError(f"LoRA targets {targets!r} match no linear layer of {type(net).__name__}")
    for n, m in hits:
        if rank > min(m.in_features, m.out_features):
            raise ValueError(f"--lora-rank {rank}: larger than the target layer {n} ({m.in_features} -> "
                             f"{m.out_features}); use a rank <= {min(min(m.in_features, m.out_features) for _, m in hits)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net.add_adapter(lora_config(info))
    for n, q in net.named_parameters():
        q.requires_grad_(is_lora_param(n))
    return net


def load_adapter(net: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Copies adapter weights (parameter names of the wrapped network, as the training checkpoints hold them) into
    an unsharded network; a ValueError names what does not fit."""
    want = {n: q for n, q in net.named_parameters() if is_lora_param(n)}
    missing, unexpected = sorted(want.keys() - sd.keys()), sorted(sd.keys() - want.keys())
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(want[k].shape)}" for k in sorted(want.keys() & sd.keys())
              if sd[k].shape != want[k].shape]
    if missing or unexpected or shapes:
        first = (missing and f"{len(missing)} missing, e.g. {missing[0]}") or \
                (unexpected and f"{len(unexpected)} unexpected, e.g. {unexpected[0]}") or shapes[0]
        raise ValueError(f"{source}: LoRA weights do not fit the network: {first}")
    with torch.no_grad():
        for k, q in want.items():
            q.copy_(sd[k].to(q.dtype))


def shard_lora(net: nn.Module, adapter, d: Dist, dtype, checkpointing: bool) -> nn.Module:
    """FSDP2 as for full weights (each block a unit holding its frozen base and its trainable adapter weights;
    fully_shard takes both), then only the adapter weights trainable."""
    net = shard(net, adapter.blocks(net), d, dtype, adapter.fp32_islands(net), checkpointing, trainable=False)
    for n, q in net.named_parameters():
        q.requires_grad_(is_lora_param(n))
    return net


def checksum(sd: dict[str, torch.Tensor]) -> float:
    """A fingerprint of the base weights under a LoRA: sum of |w| in float64 (a different checkpoint gives a
    different number; it is not a cryptographic hash)."""
    return float(sum(v.double().abs().sum().item() for v in sd.values() if v.is_floating_point()))


def network_source(path: str, role: str) -> tuple[str, str]:
    """(what read_checkpoint reads, its role) for network `role` ("generator", "generator_ema" or "critic") of any
    --dmd2-ckpt entry, as weights.describe_dmd2 resolves it (FastGen's per-network folders included)."""
    desc = describe_dmd2(path, "generator_ema" if role == "generator_ema" else "generator", None, True, True)
    net = desc["networks"]["fake_score" if role == "critic" else "student"]
    if net is None:
        raise ValueError(f"{path}: holds no {role} weights" + (f" ({desc['refusals'][0]})" if desc["refusals"] else ""))
    return net["source"], net["role"]


def base_path(info: dict, given: str | None = None) -> str:
    """The DMD2 checkpoint under a LoRA run: `given` (--dmd2-ckpt at resume, --lora-base to sample or export; any
    entry describe_dmd2 accepts, checksum-checked by read_base) or the network its state.pt records."""
    path = given or info["base"]
    if not os.path.exists(path):
        raise ValueError(f"{path}: the DMD2 checkpoint under this LoRA run is gone (recorded in its state.pt; "
                         "give its new place with --dmd2-ckpt to resume, --lora-base to sample or export)")
    return path


def read_base(info: dict, path: str | None = None) -> tuple[dict[str, torch.Tensor], str, str]:
    """The student's frozen base, (weights, source, role): the DMD2 generator the run started from, checked against
    the recorded checksum."""
    path = base_path(info, path)
    source, role = ((path, info.get("base_role", info["init_from"])) if path == info["base"] else
                    network_source(path, info["init_from"]))
    sd = read_checkpoint(source, role)
    if sd is None:
        raise ValueError(f"{path}: holds no generator weights")
    if "checksum" in info and abs(checksum(sd) - info["checksum"]) > 1e-7 * abs(info["checksum"]):
        raise ValueError(f"{path}: not the DMD2 weights this LoRA was trained on (checksum {checksum(sd):.12g}, "
                         f"the run recorded {info['checksum']:.12g})")
    return sd, source, role


# ---------------------------------------------------------------------------------------------------
# Training: the networks, the EMA of the adapter, the checkpoint contents


class AdaptersOff(nn.Module):
    """The teacher when it shares its network with the fake score: the network's LoRA layers are bypassed
    (diffusers' disable_adapters) for the call and switched back on afterwards. The DMD teacher runs under no_grad;
    a call with grad (the GAN head's features, with grad into G) also runs without activation checkpointing, which
    would recompute in backward with the adapters on again."""

    def __init__(self, denoiser: nn.Module, net: nn.Module):
        super().__init__()
        self.denoiser, self._net = denoiser, [net]  # a list: not a second registration of the same network

    def forward(self, *args, **kwargs):
        net = self._net[0]
        recomputes = torch.is_grad_enabled() and net.is_gradient_checkpointing
        net.disable_adapters()
        if recomputes:
            net.disable_gradient_checkpointing()
        try:
            return self.denoiser(*args, **kwargs)
        finally:
            net.enable_adapters()
            if recomputes:
                net.enable_gradient_checkpointing()


class LoraEMA(nn.Module):
    """The EMA of the student's adapter weights, sharded like them; the base is the student's own. Called like the
    network (adapter.denoiser wraps it): the EMA values stand in for the student's adapter weights for that call.
    It registers no parameters, so dfd.ema_update does not see it; train calls update() after each student step."""

    def __init__(self, net: nn.Module, values: dict[str, torch.Tensor] | None = None, source: str = ""):
        super().__init__()
        self._net = [net]
        self.live = {n: q for n, q in net.named_parameters() if is_lora_param(n)}
        self.shadow = {n: q.detach().clone() for n, q in self.live.items()}
        if values is not None:  # full tensors from a checkpoint -> this rank's shards
            from torch.distributed.tensor import DTensor, distribute_tensor
            if values.keys() != self.shadow.keys():
                raise ValueError(f"{source}: the EMA's LoRA weights do not fit the student's")
            for n, s in self.shadow.items():
                v = values[n].to(s.device, s.dtype)
                if isinstance(s, DTensor):
                    v = distribute_tensor(v, s.device_mesh, s.placements, src_data_rank=None)
                s.copy_(v)

    @torch.no_grad()
    def update(self, decay: float) -> None:
        for n, q in self.live.items():  # the same lerp_ as dfd.ema_update
            self.shadow[n].lerp_(q.detach(), 1 - decay)

    @contextlib.contextmanager
    def swapped_in(self):
        with torch.no_grad():
            kept = {n: q.detach().clone() for n, q in self.live.items()}
            for n, q in self.live.items():
                q.copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, q in self.live.items():
                    q.copy_(kept[n])

    def forward(self, *args, **kwargs):
        with self.swapped_in():
            return self._net[0](*args, **kwargs)

    def shadow_state_dict(self) -> dict[str, torch.Tensor]:
        """A collective (every rank, same order): the unsharded EMA values on CPU."""
        full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t
        return {n: full(s).cpu() for n, s in self.shadow.items()}


def adapter_state_dict(obj: nn.Module | LoraEMA) -> dict[str, torch.Tensor]:
    """runs.save_checkpoint's `weights_of` for LoRA runs: the adapter weights alone (a collective)."""
    if isinstance(obj, LoraEMA):
        return obj.shadow_state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(obj, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                            ignore_frozen_params=True))
    return {k: v for k, v in sd.items() if is_lora_param(k)}


def check_resume(args: argparse.Namespace, state: dict, folder: str, adapter) -> None:
    """One line when the LoRA flags do not match the checkpoint being resumed."""
    saved = state.get("lora")
    if saved and not args.lora_rank:
        raise SystemExit(f"error: --resume {folder}: a LoRA checkpoint (rank {saved['rank']}, alpha "
                         f"{saved['alpha']:g}); resume it with --lora-rank {saved['rank']} --lora-alpha {saved['alpha']:g}")
    if args.lora_rank and not saved:
        raise SystemExit(f"error: --resume {folder}: a full-weight checkpoint; --lora-rank / --lora-alpha cannot "
                         "resume it (drop them, or start a LoRA run from --dmd2-ckpt)")
    if saved:
        now = lora_info(args, adapter)
        diff = [f"{k} {saved[k]} (now {now[k]})" for k in ("rank", "alpha", "targets") if saved[k] != now[k]]
        if diff:
            raise SystemExit(f"error: --resume {folder}: the checkpoint's LoRA has " + ", ".join(diff))


@dataclass
class LoraNets:
    teacher: nn.Module          # sharded; holds the fake score's adapter when `fake is teacher`
    student: nn.Module          # sharded DMD2 student (frozen) + trainable adapter
    fake: nn.Module             # the teacher's network, or the critic's (frozen) + trainable adapter
    ema: LoraEMA | None
    info: dict                  # state.pt["lora"]

    def teacher_denoiser(self, teacher: nn.Module) -> nn.Module:
        """The teacher's denoiser, with the adapters of the network it shares with the fake score switched off."""
        return AdaptersOff(teacher, self.teacher) if self.fake is self.teacher else teacher


def build_networks(adapter, args: argparse.Namespace, resume: tuple | None, d: Dist, dtype, checkpointing: bool,
                   desc: dict | None = None) -> LoraNets:
    """The networks of a LoRA run (teacher, fake score, student), one at a time. Every rank builds each on the meta
    device with its adapter attached and shards it before it holds any weight; rank 0 alone builds it on the host as
    well (base weights, the adapter drawn from its seed, on resume the trained adapter) and streams that state dict
    to the shards tensor by tensor. So rank 0 holds one full fp32 network (and the file's state dict it is loaded
    from) at a time and the other ranks about one tensor (bench/bench_host_memory.py --lora). A resumed run reads the bases again (the DMD2 checkpoint recorded in
    state.pt, or the --dmd2-ckpt given, checksum-checked) and the adapters from the checkpoint. desc:
    describe_dmd2's answer for a fresh run (where the student's and the critic's weights are)."""
    w = resume[0] if resume is not None else {}
    if resume is None:
        desc = desc or describe_dmd2(args.dmd2_ckpt, args.init_from, getattr(args, "fake_init", None),
                                     getattr(args, "bidirectional_ckpt", False), getattr(args, "rectified_flow_ckpt", False))
        if desc["refusals"]:
            raise ValueError(desc["refusals"][0])
        s, f = desc["networks"]["student"], desc["networks"]["fake_score"]
        info = {**lora_info(args, adapter), "base": os.path.abspath(s["source"]), "base_role": s["role"],
                "init_from": args.init_from, "fake_base": "critic" if f else "teacher",
                "critic": [os.path.abspath(f["source"]), f["role"]] if f else None}
    else:
        info = dict(resume[1]["lora"])
    base = base_path(info, args.dmd2_ckpt if resume is not None else None)
    src = f"--dmd2-ckpt {base}"

    def streamed(weights, source: str, seed: int | None, trained: dict | None, name: str) -> nn.Module:
        """weights(): the base state dict (called on rank 0; None: the base model's own); seed: the adapter's (None:
        no adapter, the plain frozen teacher); trained: the adapter's weights from --resume."""
        def host() -> dict[str, torch.Tensor]:
            net = adapter.load_network(args.model_dir)
            if weights is not None:
                load_weights(net, weights(), source, adapter.convert_state_dict)
            if seed is not None:
                attach(net, info, seed)
                if trained is not None:
                    load_adapter(net, trained, f"--resume ({name})")
            return net.state_dict()
        net = adapter.load_network(args.model_dir, meta=True)
        if seed is not None:
            attach(net, info, seed)  # the rank check, on every rank alike
        full = on_main_rank(d, host)
        net = shard_lora(net, adapter, d, dtype, checkpointing and seed is not None)
        net.to_empty(device=d.device)
        adapter.init_buffers(net, d.device)
        set_full_state_dict(net, full or {}, from_rank0=True)
        return net

    shared = info["fake_base"] == "teacher"  # one network for both: the teacher's base + the fake score's adapter
    teacher_net = streamed(None, f"--model-dir {args.model_dir}", args.seed + 1 if shared else None,
                           w.get("fake") if shared else None, "fake")
    if shared:
        fake_net = teacher_net
    else:  # the fake score starts from the critic when there is one (and --fake-init allows)
        def critic() -> dict[str, torch.Tensor]:
            where = info.get("critic")
            if where is None or base != info["base"] or not os.path.exists(where[0]):
                where = list(network_source(base, "critic"))
            sd = read_checkpoint(*where)
            if sd is None:
                raise ValueError(f"{src}: holds no critic, but the fake score of this LoRA run was built on one")
            return sd
        fake_net = streamed(critic, f"{src} (critic base)", args.seed + 1, w.get("fake"), "fake")
    found = {}

    def student_base() -> dict[str, torch.Tensor]:
        sd, source, role = read_base(info, base)
        found.update(base=os.path.abspath(source), base_role=role,  # where it is now, if it moved
                     checksum=checksum(sd) if info.get("checksum") is None else info["checksum"])
        return sd  # a fresh run records its base's checksum; a resumed one was checked against it

    student_net = streamed(student_base, f"{src} (student base)", args.seed, w.get("student"), "student")
    info.update(on_main_rank(d, lambda: found, share=True))
    ema = None
    if args.ema > 0:  # a run that turns the EMA on at resume starts it from the student
        ema = LoraEMA(student_net, w.get("ema"), "--resume (ema)")
    return LoraNets(teacher_net, student_net, fake_net, ema, info)


# ---------------------------------------------------------------------------------------------------
# sample / export


def training_checkpoint(path: str) -> str | None:
    """The step folder when `path` is a LoRA training checkpoint, else None. Reads only a safetensors header, so
    a full-weight checkpoint is not loaded twice."""
    try:
        folder = latest_checkpoint(path)
    except ValueError:
        return None
    from safetensors import safe_open
    f = os.path.join(folder, "student.safetensors")
    if not os.path.exists(f):
        return None
    try:
        with safe_open(f, "pt") as fh:
            if not any(is_lora_param(k) for k in fh.keys()):
                return None
    except Exception as e:  # a truncated or overwritten file: the library's error names no file
        raise ValueError(f"{f}: corrupt training checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    return folder


def load_lora_student(adapter, args: argparse.Namespace, merge: bool = True) -> nn.Module | None:
    """The student of a LoRA training checkpoint: its DMD2 base with the adapter (the EMA's when there is one and
    --weights is auto/ema), merged into the base weights (merge=True: a plain transformer) or kept as an adapter.
    None when --ckpt is not a LoRA training checkpoint."""
    folder = training_checkpoint(args.ckpt)
    if folder is None:
        return None
    w, state = load_checkpoint(folder)
    info = state.get("lora")
    if not info:
        raise ValueError(f"{folder}: adapter weights without state.pt['lora'] (rank, alpha, base)")
    name = "ema" if args.weights in ("auto", "ema") and "ema" in w else "student"
    if args.weights == "ema" and "ema" not in w:
        raise ValueError(f"{args.ckpt}: the checkpoint has no EMA (trained with --ema 0)")
    sd, base, _ = read_base(info, getattr(args, "lora_base", None))
    net = adapter.load_network(args.model_dir)
    load_weights(net, sd, f"{base} (student base)", adapter.convert_state_dict)
    del sd
    attach(net, info, 0)
    load_adapter(net, w[name], f"--ckpt {folder} ({name})")
    if merge:
        net.fuse_lora()
        net.unload_lora()
    return net.eval()


def save_lora(adapter, net: nn.Module, out: str) -> nn.Module:
    """Writes <out>/lora/pytorch_lora_weights.safetensors (diffusers' format, with the LoraConfig as metadata, so
    load_lora_weights restores alpha) from a network with its adapter, through a temporary folder and a rename
    (replacing an earlier export's); returns the network with the adapter merged."""
    import shutil
    import diffusers.loaders
    from peft.utils import get_peft_model_state_dict
    folder = os.path.join(out, "lora")
    tmp, old = f"{folder}.tmp{os.getpid()}", f"{folder}.old{os.getpid()}"
    mixin = getattr(diffusers.loaders, adapter.lora_loader)
    config = net.peft_config["default"].to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    shutil.rmtree(tmp, ignore_errors=True)
    mixin.save_lora_weights(tmp, transformer_lora_layers=get_peft_model_state_dict(net),
                            transformer_lora_adapter_metadata=config)
    if os.path.exists(folder):
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    net.fuse_lora()
    net.unload_lora()
    return net


def load_for_export(adapter, args: argparse.Namespace) -> nn.Module:
    """export --lora: the student with its adapter unmerged; a ValueError for a checkpoint that holds no LoRA."""
    net = load_lora_student(adapter, args, merge=False)
    if net is None:
        raise ValueError(f"--ckpt {args.ckpt}: not a LoRA training checkpoint (export --lora needs a run trained "
                         "with --lora-rank; drop --lora to export full weights)")
    return net
