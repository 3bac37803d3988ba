"""The memory planner (dfd_video/planning/memory.py, `plan`) checked against measurement on the bench models (CPU).

  python bench/bench_memory_plan.py                   # Wan: fp32 and bf16, full weights and LoRA r = 8, 3 clip sizes
  python bench/bench_memory_plan.py --dtype bf16 --sizes 2x8x8 --ranks 1
  python bench/bench_memory_plan.py --model cosmos --dtype bf16   # Cosmos-Predict2.5's bench model
  python bench/bench_memory_plan.py --model cosmos --count --dtype bf16   # the counts its table in planning/tables.py holds
  python bench/bench_memory_plan.py --out bench/results/memory_plan_wan.md    # the result file docs/memory.md quotes

Exact parts: the bytes each rank holds for parameters, gradients and AdamW state (train_state_bytes over the FSDP2
shards after a real student step and fake-score step, world of one), against the planner's exact part.
Activations: the bytes autograd keeps for backward, counted with torch.autograd.graph.saved_tensors_hooks during one
dfd.student_step and one dfd.fake_score_step: each storage once (views and tensors saved by several ops share it),
parameters left out (FSDP2's gathered weights are the planner's "gathered" row), live bytes followed until the graph
frees them, the peak reported. With activation checkpointing the hooks of torch.utils.checkpoint replace ours inside
the blocks, so the measured peak is put together from three measured parts: what the hooks see outside the blocks,
the tensors each checkpointed block keeps as its inputs (recorded where the model calls its checkpoint function),
and the largest block's own saved bytes from the same step without checkpointing (what backward recomputes).
Then the exact parts again at --ranks ranks (torchrun, gloo), the largest rank's bytes against the planner.
Printed: predicted / measured per part; the goal is within 10 % for activations, exact for the rest.
--count prints instead what one block and the root save, in the form of the model's table in dfd_video/planning/tables.py (the first
size, no checkpointing; "checkpointed": what checkpointing keeps on top of each block's input); the adapters' tables
are bf16's.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
import warnings

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from bench_wan_memory import BENCH_NET  # noqa: E402
from result_file import add_out_flag, result_file  # noqa: E402

TEXT_LEN = 512
# Cosmos-Predict2.5-2B's structure (tests/tiny_cosmos.py: the condition mask as a 17th input channel, the padding mask
# concatenated, adaLN-LoRA, the projection of the concatenated Qwen layers), 1.59 M parameters, with widths chosen so
# that every symbolic shape of dfd_video.planning.memory.shape_elements has its own element count at each of the default
# --sizes (H 5, head dim 30, D 150, F 600, adaLN-LoRA 20, text context 48, text 80, patch input 72; r = 8):
# --count names each saved tensor by it
COSMOS_NET = dict(in_channels=17, out_channels=16, num_attention_heads=5, attention_head_dim=30, num_layers=4,
                  mlp_ratio=4.0, text_embed_dim=48, adaln_lora_dim=20, max_size=(32, 64, 64), patch_size=(1, 2, 2),
                  rope_scale=(1.0, 3.0, 3.0), concat_padding_mask=True, extra_pos_embed_type=None,
                  use_crossattn_projection=True, crossattn_proj_in_channels=80, encoder_hidden_states_channels=48)


class SavedBytes:
    """saved_tensors_hooks that count the live bytes autograd keeps for backward: each storage once, parameters
    (and views of them) not counted, a storage released when the last saved tensor on it is freed. `tag` (set by
    forward hooks) attributes each storage to the block that saved it first."""

    def __init__(self):
        self.live: dict[int, list] = {}  # storage pointer -> [bytes, references, tag]
        self.now = self.peak = 0
        self.tag = "root"
        self.first: dict[int, tuple[str, int]] = {}  # every storage ever saved -> (tag, bytes)
        self.exclude: set[int] = set()  # storages counted elsewhere (checkpointed block inputs)
        self.what: dict[int, list] = {}  # live storage -> [tags that saved it, tensor elements, fp32, storage elements]
        self.freed: list[list] = []  # the same for the storages released

    def hold(self, key: int, nbytes: int, tag: str, t: torch.Tensor) -> None:
        what = self.what.setdefault(key, [set(), t.numel(), t.dtype == torch.float32, nbytes // t.element_size()])
        what[0].add(tag)
        if key in self.live:
            self.live[key][1] += 1
            return
        self.live[key] = [nbytes, 1, tag]
        self.first.setdefault(key, (tag, nbytes))
        self.now += nbytes
        self.peak = max(self.peak, self.now)

    def release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            del self.live[key]
            self.now -= entry[0]
            self.freed.append(self.what.pop(key))

    def pack(self, t: torch.Tensor):
        base = t._base if t._base is not None else t
        if isinstance(t, nn.Parameter) or isinstance(base, nn.Parameter) or t.device.type == "meta":
            return t
        st = t.untyped_storage()
        if st.nbytes() == 0:
            return t
        self.hold(st.data_ptr(), st.nbytes(), self.tag, t)
        return _Held(self, st.data_ptr(), t)

    @staticmethod
    def unpack(h):
        return h.t if isinstance(h, _Held) else h

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _Held:
    __slots__ = ("owner", "key", "t")

    def __init__(self, owner: SavedBytes, key: int, t: torch.Tensor):
        self.owner, self.key, self.t = owner, key, t

    def __del__(self):
        self.owner.release(self.key)


def tensors_in(args) -> list[torch.Tensor]:
    out = []
    for a in args:
        if torch.is_tensor(a):
            out.append(a)
        elif isinstance(a, (tuple, list)):
            out += tensors_in(a)
    return out


def instrument(net: nn.Module, blocks, meter_box: list) -> None:
    """Tags saves by block; records block inputs; counts the inputs a checkpointed block keeps."""
    for i, b in enumerate(blocks):
        def pre(m, args, kwargs=None, i=i):
            meter = meter_box[0]
            if meter is not None:
                meter.tag = f"block{i}"
                meter.block_inputs.update(t.untyped_storage().data_ptr() for t in tensors_in(args))
        b.register_forward_pre_hook(pre)

        def post(m, args, out):
            if meter_box[0] is not None:
                meter_box[0].tag = "root"
        b.register_forward_hook(post)
    orig = getattr(net, "_gradient_checkpointing_func", None)
    if orig is None:
        return

    def counted(block, *args):
        meter = meter_box[0]
        if meter is not None and torch.is_grad_enabled():
            for t in tensors_in(args):  # kept by the checkpoint until this block's backward: held to the step's end
                st = t.untyped_storage()
                meter.hold(st.data_ptr(), st.nbytes(), "checkpointed inputs", t)
                meter.pinned.append(st.data_ptr())
        return orig(block, *args)
    net._gradient_checkpointing_func = counted


@contextlib.contextmanager
def metered(meter_box: list):
    meter = SavedBytes()
    meter.block_inputs, meter.pinned = set(), []
    meter_box[0] = meter
    try:
        with meter.hooks():
            yield meter
    finally:
        meter_box[0] = None


def block_own(meter: SavedBytes) -> int:
    """The largest block's own saved bytes: storages a block saved first, less its input (held by the checkpoint)."""
    per = collections.Counter()
    for key, (tag, nbytes) in meter.first.items():
        if tag.startswith("block") and key not in meter.block_inputs:
            per[tag] += nbytes
    return max(per.values(), default=0)


def tally(meter: SavedBytes, elements: dict[str, int], block: str) -> dict:
    """The storages one step saved, in the terms of the tables in dfd_video/planning/tables.py: {"block": `block`'s own saves,
    "root": what the root saves and what several blocks save once (RoPE tables, text), "checkpointed": inputs only the
    checkpoint keeps}, each {shape: [compute-dtype tensors, fp32 tensors]}. A storage is named by the element count of
    the tensor saved on it (the bench model's widths make that unambiguous); a storage holding m such tensors (the
    chunks of Cosmos's [S, 3D] modulation) counts m, and an expanded view counts its storage. Scalars are left out."""
    names = collections.defaultdict(list)
    for name, n in elements.items():
        names[n].append(name)
    out = {part: collections.defaultdict(lambda: [0, 0]) for part in ("block", "root", "checkpointed")}
    for tags, numel, fp32, stored in meter.freed + list(meter.what.values()):
        numel = min(numel, stored)  # an expanded view is named by what its storage holds
        if numel <= 1:
            continue
        # a shape of its own, else one multiple of one (the [S, 3D] modulation saved whole: 3 of S x D)
        found = [(m, k) for m in (1, 2, 3, 4, 6) if numel % m == 0 for k in names[numel // m]]
        found = [f for f in found if f[0] == 1] or found
        if len(found) != 1 or stored % (numel // found[0][0]):
            raise SystemExit(f"--count: a saved tensor of {numel} elements on a storage of {stored} is "
                             f"{' or '.join(f'{m} x {k}' for m, k in found) or 'no known shape'}; pick widths that "
                             "tell them apart")
        numel //= found[0][0]
        if tags == {"checkpointed inputs"}:
            part = "checkpointed"
        elif tags == {block}:
            part = "block"
        elif "root" in tags or len(tags) > 1:
            part = "root"
        else:
            continue  # another block's own
        out[part][found[0][1]][fp32] += stored // numel
    return out


def model(name: str):
    """(adapter, network class, bench config, CFG guidance of the teacher) of --model."""
    if name == "wan":
        from diffusers import WanTransformer3DModel

        import wan_dfd
        return wan_dfd.WanAdapter(), WanTransformer3DModel, BENCH_NET, 5.0
    from diffusers import CosmosTransformer3DModel

    import cosmos_dfd
    cosmos_dfd.ensure_padding_mask_resize()
    return cosmos_dfd.CosmosAdapter(), CosmosTransformer3DModel, COSMOS_NET, 3.0


def make_batch(name: str, n: int, size: tuple[int, int, int], g: torch.Generator) -> tuple[tuple, dict]:
    """n clips for dfd's steps and the negative prompt: Wan's (latents, text); Cosmos's (latents, its condition: a
    prompt and the first latent frame as the image, the loss mask of the generated frames)."""
    x = torch.randn(n, 16, *size, generator=g)
    if name == "wan":
        return (x, torch.randn(n, TEXT_LEN, 64, generator=g)), {"text": torch.randn(TEXT_LEN, 64, generator=g)}
    import cosmos_dfd
    width = COSMOS_NET["crossattn_proj_in_channels"]
    cond = cosmos_dfd.CosmosCond(torch.randn(n, TEXT_LEN, width, generator=g), x[:, :, :1].clone())
    return (x, cond, cosmos_dfd.generated_mask(x, 1)), {"text": torch.randn(TEXT_LEN, width, generator=g)}


def build(args, ckpt: bool, lora_rank: int, dtype):
    """Student, fake score and teacher of the bench model sharded as dfd_video.train shards them (world of one)."""
    from dfd_video import distributed, lora
    adapter, cls, config, _ = model(args.model)
    d = distributed.setup_distributed("cpu")
    nets = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        nets.append(cls(**config))
    teacher_net, student_net, fake_net = nets
    info = {"rank": lora_rank, "alpha": float(lora_rank), "targets": adapter.lora_targets}
    if lora_rank:  # the fake score on the teacher's base (no critic): dfd_video.lora.build_networks' shared case
        lora.attach(teacher_net, info, 1)
        teacher_net = fake_net = lora.shard_lora(teacher_net, adapter, d, dtype, ckpt)
        lora.attach(student_net, info, 0)
        student_net = lora.shard_lora(student_net, adapter, d, dtype, ckpt)
    else:
        for net, trainable in ((teacher_net, False), (student_net, True), (fake_net, True)):
            distributed.shard(net, adapter.blocks(net), d, dtype, adapter.fp32_islands(net), ckpt and trainable,
                              trainable)
    return adapter, d, teacher_net, student_net, fake_net


def run_case(args, size: tuple[int, int, int], ckpt: bool, lora_rank: int, dtype_name: str) -> dict:
    import dfd
    from dfd_video import distributed, lora
    from dfd_video.planning import memory
    dtype = torch.bfloat16 if dtype_name == "bf16" else None
    adapter, d, teacher_net, student_net, fake_net = build(args, ckpt, lora_rank, dtype)
    box = [None]
    for net in {id(n): n for n in (student_net, fake_net)}.values():
        instrument(net, adapter.blocks(net), box)
    batch, uncond = make_batch(args.model, args.batch, size, torch.Generator().manual_seed(0))
    teacher = adapter.denoiser(teacher_net, model(args.model)[3], uncond, dtype)
    student, fake = adapter.denoiser(student_net, dtype=dtype), adapter.denoiser(fake_net, dtype=dtype)
    if lora_rank:
        teacher = lora.AdaptersOff(teacher, teacher_net)
    adamw = lambda net: torch.optim.AdamW([q for q in net.parameters() if q.requires_grad], lr=1e-5)
    opt_s, opt_f = adamw(student_net), adamw(fake_net)
    c = dfd.DFDConfig(fake_updates=1, monitor_every=0, grad_clip=0.0)
    with metered(box) as m_fake:
        dfd.fake_score_step(student, fake, opt_f, [batch], c, 0, 0)
    with metered(box) as m_student:
        dfd.student_step(student, teacher, fake, opt_s, [batch], c, 0)
    # exact parts after both updates, with gradients as they stand at an optimizer step (dfd zeroes them after it)
    x, cond = batch[:2]
    for net in (student, fake):
        net(x, torch.full((args.batch,), 0.5), cond).float().square().mean().backward()
    # FSDP2 leaves the root of a network run without grad (the teacher) gathered, in the compute dtype, after its
    # forward; the planner counts that under "gathered". Reshard, so that the stored fp32 shards are counted.
    teacher_net.reshard()
    trained = distributed.train_state_bytes(student_net, opt_s) + distributed.train_state_bytes(fake_net, opt_f)
    if lora_rank:  # the shared network: its base is the teacher's; count each parameter once
        everything = distributed.train_state_bytes(student_net, teacher_net, opt_s, opt_f)
    else:
        everything = trained + distributed.train_state_bytes(teacher_net)
    if d.world > 1:  # the planner's figure is the largest rank's (rank 0: FSDP2 gives it the padded share)
        import torch.distributed as dist
        per_rank = [None] * d.world
        dist.all_gather_object(per_rank, everything)
        everything = max(per_rank)
    sizes = memory.network_sizes(adapter, _plain(args.model))
    cfg = memory.PlanConfig(world=d.world, lora_rank=lora_rank, shared_fake=bool(lora_rank), compute_bytes=2 if dtype else 4,
                            ema=False, batch_per_gpu=args.batch, latent=(16, *size), text_len=TEXT_LEN,
                            checkpointing=ckpt)
    plan = memory.plan_memory(sizes, cfg, memory.SAVED_FOR_BACKWARD.get(adapter.name))
    if not args.worker:  # under torchrun the process group is kept for the next case (a second init would hang)
        distributed.teardown_distributed()
    measured = {"state": everything, "student_step": m_student.peak, "fake_step": m_fake.peak,
                "block_own": max(block_own(m_student), block_own(m_fake))}
    return {"plan": plan, "measured": measured, "trained": trained, "sizes": sizes, "cfg": cfg,
            "meters": {"student_step": m_student, "fake_step": m_fake}}


def _plain(name: str):
    _, cls, config, _ = model(name)
    with torch.device("meta"):
        return cls(**config)


def count(args) -> None:
    """--count: the table of planning/tables.py measured on the bench model (each --dtype, the first size), per step:
    "block" and "root" from the step without checkpointing; "checkpointed": what the step with it keeps outside the
    blocks beyond each block's input (S x D in the compute dtype) and the root's own saves. In an fp32 run every tensor
    is in the fp32 column."""
    from dfd_video.planning import memory
    size = tuple(int(v) for v in args.sizes[0].split("x"))
    for dt, r in ((dt, r) for dt in args.dtype for r in args.lora_rank):
        runs = [run_case(args, size, ckpt, r, dt) for ckpt in (False, True)]
        sizes = runs[0]["sizes"]
        elements = memory.shape_elements(sizes, runs[0]["cfg"])
        for step in ("student_step", "fake_step"):
            plain, ckpt = (tally(res["meters"][step], elements, f"block{sizes['n_blocks'] // 2}") for res in runs)
            extra = collections.defaultdict(lambda: [0, 0])
            for table, sign in ((ckpt["root"], 1), (ckpt["checkpointed"], 1), (plain["root"], -1),
                                ({"S*D": (sizes["n_blocks"], 0)}, -1)):
                for k, (n_c, n_32) in table.items():
                    extra[k][0] += sign * n_c
                    extra[k][1] += sign * n_32
            table = {"block": plain["block"], "root": plain["root"],
                     "checkpointed": {k: v for k, v in extra.items() if any(v)}}
            print(f"{'lora' if r else 'full'} ({dt}, {step}): "
                  + str({part: {k: tuple(v) for k, v in t.items()} for part, t in table.items()}))


def ranks_worker(args) -> None:
    """Under torchrun: the train state per rank of full weights and LoRA (bf16, first size), against the planner."""
    import json
    size = tuple(int(v) for v in args.sizes[0].split("x"))
    rows = []
    for r in args.lora_rank:
        res = run_case(args, size, True, r, "bf16")
        rows.append({"lora_rank": r, "predicted": res["plan"]["state"], "measured": res["measured"]["state"]})
    if int(os.environ.get("RANK", "0")) == 0:
        with open(args.worker, "w") as f:
            json.dump(rows, f)
    from dfd_video import distributed
    distributed.teardown_distributed()


def check_ranks(args, world: int) -> None:
    """The exact parts at `world` ranks (torchrun, gloo): bytes of the largest rank against the planner."""
    import json
    import subprocess
    import tempfile
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               os.path.abspath(__file__), "--worker", out, "--model", args.model, "--sizes", args.sizes[0],
               "--batch", str(args.batch),
               "--lora-rank", *map(str, args.lora_rank)]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"the {world}-rank worker failed (exit {r.returncode}):\n{r.stderr[-4000:]}")
        with open(out) as f:
            rows = json.load(f)
    for row in rows:
        same = row["predicted"] == row["measured"]
        print(f"{world} ranks, bf16, {'LoRA r=' + str(row['lora_rank']) if row['lora_rank'] else 'full'}: params + "
              f"grads + AdamW per rank predicted / measured = {row['predicted']} / {row['measured']} "
              f"{'exact' if same else 'DIFFERS'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="wan", choices=("wan", "cosmos"),
                    help="the bench model: Wan2.1's (bench/bench_wan_memory.py) or Cosmos-Predict2.5's (COSMOS_NET)")
    ap.add_argument("--count", action="store_true", help="print what one block and the root save (the adapter's "
                    "planning/tables.py) instead of checking it")
    ap.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"),
                    help="compute dtypes to measure")
    ap.add_argument("--sizes", nargs="+", default=["2x8x8", "3x16x16", "5x24x32"],
                    help="latent sizes T x H x W (patch 1 x 2 x 2: tokens = T H W / 4)")
    ap.add_argument("--lora-rank", type=int, nargs="+", default=[0, 8], help="0: full weights")
    ap.add_argument("--batch", type=int, default=1, help="clips per step")
    ap.add_argument("--ranks", type=int, default=2, help="also check the exact parts at this many ranks under "
                    "torchrun (gloo; 1: skip)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    add_out_flag(ap)
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    torch.set_num_threads(1)
    if args.worker:
        return ranks_worker(args)
    title = f"The memory planner against measurement on the {'Wan' if args.model == 'wan' else 'Cosmos'} bench model (CPU)"
    with result_file(args.out, title + (": what autograd saves, counted" if args.count else "")):
        count(args) if args.count else check(args)


def check(args: argparse.Namespace) -> None:
    """Predicted / measured per case as a markdown table, then the exact parts at --ranks ranks."""
    print("| dtype | weights | latent | tokens | checkpointing | activations predicted / measured (student step, "
          "fake step) | measured MiB | params + grads + AdamW predicted / measured |")
    print("| --- | --- | --- | ---: | --- | ---: | ---: | ---: |")
    worst = 0.0
    for dt in args.dtype:
        for r in args.lora_rank:
            for s in args.sizes:
                size = tuple(int(v) for v in s.split("x"))
                runs = {}
                for ckpt in (False, True):
                    runs[ckpt] = run_case(args, size, ckpt, r, dt)
                for ckpt in (False, True):
                    res, meas = runs[ckpt], dict(runs[ckpt]["measured"])
                    if ckpt:  # + what backward recomputes: the largest block's own saves, measured without checkpointing
                        for k in ("student_step", "fake_step"):
                            meas[k] += runs[False]["measured"]["block_own"]
                    pred = res["plan"]["activations"]
                    ratios = [pred / meas[k] for k in ("student_step", "fake_step")]
                    worst = max(worst, *(abs(x - 1) for x in ratios))
                    state_pred = res["plan"]["state"]
                    tokens = size[0] * size[1] * size[2] // 4
                    print(f"| {dt} | {'LoRA r=' + str(r) if r else 'full'} | {s} | {tokens} | {'on' if ckpt else 'off'} | "
                          f"{ratios[0]:.3f}, {ratios[1]:.3f} | {meas['student_step'] / 2**20:.2f}, "
                          f"{meas['fake_step'] / 2**20:.2f} | {state_pred} / {meas['state']} "
                          f"{'exact' if state_pred == meas['state'] else 'DIFFERS'} |", flush=True)
    print(f"largest activation error: {100 * worst:.1f} % (goal: within 10 %)")
    if args.ranks > 1:
        check_ranks(args, args.ranks)


if __name__ == "__main__":
    main()
