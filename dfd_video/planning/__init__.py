"""The planning layer: what to know before a cluster job, never imported by the method path.

  memory    the memory model: the exact training state under FSDP2 + AdamW (full weights or LoRA), activations counted
            per block, the largest batch that fits
  tables    the per-model tables it counts with, and the public configs `plan` reads without --model-dir
  plan      the `plan` subcommand: GPU memory per rank by part, no model loaded
  check     the `check` subcommand: the preflight (checkpoint layout, teacher parity with the diffusers pipeline, a
            student sample with delta^2, memory)
"""
