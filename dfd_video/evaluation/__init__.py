"""The evaluation layer: what measures samples and runs, never imported by the method path.

  evaluate  the `evaluate` subcommand: Eq. 11 diversity, camera-pose diversity, saturation, VBench dimensions
  vbench/   the VBench quality dimensions, one file each, and the networks written for them (RAFT, AMT-S, MUSIQ,
            DreamSim)
  probes    `train --probe-every`: fixed conditions and seeds sampled while a run trains (imported only then)
  plot      the `plot` subcommand: a run's metrics over steps as one PNG
"""
