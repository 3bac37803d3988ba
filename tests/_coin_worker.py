"""Worker for tests/test_dfd_distributed.py, launched as
    python -m torch.distributed.run --nproc_per_node=2 tests/_coin_worker.py OUT_DIR STEPS
Each rank draws the per-step DFD coin (and the per-sample one) for STEPS steps, gathers every rank's
coins over gloo, and rank 0 writes them to OUT_DIR/coins.pt for the test to compare."""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dfd  # noqa: E402


def main() -> None:
    out_dir, steps = sys.argv[1], int(sys.argv[2])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    per_step = torch.stack([dfd.dfd_coin(s, 0.5, seed=7) for s in range(steps)]).to(torch.uint8)  # [steps]
    per_sample = torch.stack([dfd.dfd_coin(s, 0.5, seed=7, batch=4, rank=rank) for s in range(steps)]).to(torch.uint8)
    gathered = [torch.empty_like(per_step) for _ in range(world)]
    dist.all_gather(gathered, per_step)
    gathered_ps = [torch.empty_like(per_sample) for _ in range(world)]
    dist.all_gather(gathered_ps, per_sample)
    if rank == 0:
        torch.save({"world": world, "per_step": torch.stack(gathered), "per_sample": torch.stack(gathered_ps)},
                   os.path.join(out_dir, "coins.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
