"""Distributed set-up and FSDP2: the only module that knows about torchrun.

A plain `python script.py` (no torchrun) runs as a world of one with an in-process store, so the FSDP2 code paths
are the same with one process or many."""
from __future__ import annotations

import gc
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    mesh: Any  # torch.distributed.device_mesh.DeviceMesh, 1-D over all ranks

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> Dist:
    """Reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK and starts a process group: nccl on CUDA, gloo on CPU.
    Without torchrun it starts a world of one (an in-process store), so FSDP2 code paths are identical."""
    from torch.distributed.device_mesh import init_device_mesh
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, rank=rank, world_size=world)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    world, rank = dist.get_world_size(), dist.get_rank()
    return Dist(rank, world, local_rank, dev, init_device_mesh(dev.type, (world,)))


def wait_for_rank0() -> None:
    """For an error every rank meets alike, printed once by rank 0: ranks > 0 wait before they exit or print, since
    torchrun stops all ranks as soon as one exits, and a rank exiting first could stop rank 0 before it printed.
    Rank 0 exits at once and torchrun ends the others; one still running 10 s later (rank 0 did not fail, or no
    torchrun) goes on."""
    if int(os.environ.get("RANK", "0")) > 0:
        # torchrun stops this rank (SIGTERM) once rank 0 has exited with the line: leaving with status 0 keeps it out
        # of torchrun's list of failures, whose root cause is then rank 0's line alone (docs/errors.md)
        before = signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
        time.sleep(10)
        signal.signal(signal.SIGTERM, before)


def on_main_rank(d: Dist, work: Callable[[], Any], share: bool = False) -> Any:
    """Runs `work` (filesystem work: moving, writing, cleaning, reading) on rank 0 only; its result is rank 0's (None
    elsewhere), or every rank's with share=True (pickled and broadcast: for small results). A collective: when it
    raises OSError or ValueError every rank stops, rank 0 with the one-line error and the others quietly with the same
    exit code, so no rank waits forever for a partner that has left."""
    result, err = None, None
    if d.main:
        try:
            result = work()
        except (OSError, ValueError) as e:
            err = str(e)
    if d.world > 1:
        box = [err, result if share and err is None else None]
        dist.broadcast_object_list(box, src=0)
        err = box[0]
        if share:
            result = box[1]
    if err is not None:
        if not d.main:
            wait_for_rank0()
        raise SystemExit(f"error: {err}" if d.main else 1)
    return result


def teardown_distributed(finished: bool = False) -> None:
    """Ends the process group. finished (every rank got here without an error): a barrier first, so no rank closes its
    connections while a peer may still be in its last collective; then the groups are destroyed and collected while
    the interpreter is fully alive (a process group left to the interpreter's own finalization can abort the process
    with "terminate called without an active exception", seen rarely at the end of 2-rank CPU test runs)."""
    if dist.is_initialized():
        if finished and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
        gc.collect()


# ---------------------------------------------------------------------------------------------------
# FSDP2


class Islands(NamedTuple):
    """What stays fp32 under bf16 mixed precision (fp32_islands)."""
    modules: list[nn.Module]  # sub-modules fp32 as a whole (Wan: the time embedder, each block's norm2)
    params: list[str]         # bare parameters fp32 on their own (Wan: every scale_shift_table)


def fp32_islands(net: nn.Module) -> Islands:
    """What diffusers keeps in fp32 when it loads `net` in half precision (`_keep_in_fp32_modules`, matched against
    every component of a parameter's name, as from_pretrained and cast_keeping_fp32 match it): the outermost
    sub-modules so named that hold parameters, and the parameters that are themselves so named. Named modules
    without parameters (Wan's rope, norm1, norm3) need nothing: FSDP2 casts no buffers, and FP32LayerNorm
    computes in fp32 whatever its input."""
    keep = set(getattr(net, "_keep_in_fp32_modules", None) or ())
    modules, covered = [], []
    for name, m in net.named_modules():
        if name and name.split(".")[-1] in keep and not any(name.startswith(c + ".") for c in covered):
            covered.append(name)
            if any(True for _ in m.parameters()):
                modules.append(m)
    params = [n for n, _ in net.named_parameters() if n.split(".")[-1] in keep
              and not any(n.startswith(c + ".") for c in covered)]
    return Islands(modules, params)


def shard(net: nn.Module, blocks: Sequence[nn.Module], d: Dist, param_dtype: torch.dtype | None = None,
          fp32: Islands | None = None, checkpointing: bool = False, trainable: bool = True) -> nn.Module:
    """fully_shard the fp32 islands, then each block, then the whole net (pytorch/examples FSDP2 order, inner
    units first: a unit takes the parameters its sub-units have not).

    param_dtype=bf16 gives MixedPrecisionPolicy(bf16 params for compute, fp32 gradient reduction); the stored
    (sharded) parameters, gradients and Adam state stay fp32. Load the net in fp32 first: fully_shard refuses
    mixed dtypes. fp32 (fp32_islands(net)) names what reaches the forward in fp32, as diffusers loads it in half
    precision: each island module is an fp32 unit; FSDP2 takes one policy per module, so a block (or the root)
    that owns a bare fp32 parameter becomes an fp32 unit holding only its own parameters, with each of its
    children a bf16 unit. No unit casts its inputs: the network's own code decides every dtype (the timestep stays
    fp32, the RoPE tables reach the attention in fp32, the adapter casts the rest), so the forward is the one
    diffusers runs on a bf16-loaded model (docs/numerics.md). The units are the same with param_dtype=None.
    checkpointing: activation checkpointing of every block through the model's own switch (keeps key names)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    if checkpointing:
        if not hasattr(net, "enable_gradient_checkpointing"):
            raise ValueError(f"{type(net).__name__} has no enable_gradient_checkpointing()")
        net.enable_gradient_checkpointing()
    fp32 = fp32 or Islands([], [])
    low = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    high = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=False)
    owners = {id(net.get_submodule(n.rpartition(".")[0])) for n in fp32.params}

    def unit(m: nn.Module) -> None:
        if id(m) in owners:  # its own parameters fp32, the rest of its sub-tree bf16
            for c in m.children():
                if any(not hasattr(p, "to_local") for p in c.parameters()):  # not yet in a unit
                    fully_shard(c, mesh=d.mesh, mp_policy=low)
        fully_shard(m, mesh=d.mesh, mp_policy=high if id(m) in owners else low)

    for m in fp32.modules:
        fully_shard(m, mesh=d.mesh, mp_policy=high)
    for b in blocks:
        unit(b)
    unit(net)
    net.requires_grad_(trainable)
    return net


def full_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict on CPU; a collective: call on every rank (empty on ranks > 0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def set_full_state_dict(net: nn.Module, sd: dict[str, torch.Tensor], from_rank0: bool = False) -> None:
    """Loads a full (unsharded) state dict into a sharded net; a collective. from_rank0: only rank 0 holds `sd`
    (the others pass {}), and each tensor is broadcast in turn, so no other rank ever holds a full copy."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    set_model_state_dict(net, sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=from_rank0))


def cast_keeping_fp32(net: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Casts parameters and buffers to `dtype` except those diffusers keeps in fp32 when it loads the model in
    half precision (`_keep_in_fp32_modules`: for Wan the RoPE tables, time embedder, modulation tables, norms)."""
    keep = set(getattr(net, "_keep_in_fp32_modules", None) or ())
    with torch.no_grad():
        for name, t in [*net.named_parameters(), *net.named_buffers()]:
            if t.is_floating_point() and not keep & set(name.split(".")):
                t.data = t.data.to(dtype)
    return net


def train_state_bytes(*nets_and_opts) -> int:
    """Bytes this rank holds for parameters, gradients and optimizer state (local shards only)."""
    seen, total = set(), 0
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t
    for obj in nets_and_opts:
        if isinstance(obj, nn.Module):
            for p in obj.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    total += local(p).numel() * local(p).element_size()
                    if p.grad is not None:
                        total += local(p.grad).numel() * local(p.grad).element_size()
        else:  # an optimizer
            for st in obj.state.values():
                for v in st.values():
                    if torch.is_tensor(v):
                        total += local(v).numel() * local(v).element_size()
    return total


def mean_over_ranks(logs: dict[str, float], device: torch.device) -> dict[str, float]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return logs
    keys = sorted(logs)
    v = torch.tensor([float(logs[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(v)
    return dict(zip(keys, (v / dist.get_world_size()).tolist()))


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process in GiB: CUDA's allocated peak, or on CPU the peak resident set of this process's
    own address space (Linux's VmHWM; getrusage's ru_maxrss would also count a parent's peak that a process started
    by fork and exec inherits)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/status") as f:
            return next(int(x.split()[1]) for x in f if x.startswith("VmHWM:")) / 2**20  # KiB
    except (OSError, StopIteration, ValueError):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def compute_dtype(flag: str, device: torch.device) -> torch.dtype | None:
    """--dtype: bf16 when asked, or on CUDA with auto; else None (fp32: nothing is cast). The one place this rule
    lives: networks under FSDP2 mixed precision, encoders (`compute_dtype(...) or torch.float32`) and `check`."""
    if flag == "bf16" or (flag == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None
