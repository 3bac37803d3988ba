"""The training package: the DFD loop (dfd.py) wired to video diffusion transformers, one module per role. A file
imports only downward (wan_dfd.py / cosmos_dfd.py -> this package -> dfd.py).

The method path, what `train` runs:
  spec         ModelSpec: every member a driver reads from a model, declared once; the guided-denoiser base
  data         prepared latent shards + manifest, the caption store, the resumable training stream
  weights      --dmd2-ckpt and base-model weights in every known layout; exact loading with clear errors
  distributed  torchrun set-up, FSDP2 sharding with fp32 islands, full state dicts, the compute dtype rule
  runs         the run folder: training checkpoints, --resume, the metric log
  train        the `train` driver: networks, optimizers, dfd.train with a logger and a checkpointer
  length       the run length in FastGen iterations (--iterations) or student updates (--student-steps)
  lora         --lora-rank: peft adapters on frozen bases; export --lora
  gan          --gan-weight: DMD2's GAN head as FastGen trains it (imported only then)
  prepare, sample, export
               the other drivers of the method path; lmdb_latents: Self-Forcing's latent LMDBs as `prepare` input
  throughput   samples/s, tokens/s, TFLOP/s and MFU in the log, from a FLOP count of a step's passes
  webdataset   `prepare --videos` from FastGen's WebDataset tar shards
  model_card   the README.md `export` writes: how the student was made and how to load it
  vae, video, files
               the Wan 2.1 VAE both models share; PyAV and captions; atomic writes and one-line write errors
  causal_wan   Self-Forcing / CausVid students: the block-causal Wan with a KV cache, its rollout, streaming
               sampler and .pt export (wan_dfd.py imports it only for a causal student)
  cli          the subcommands and their flags, the checks before any model loads, main(spec)

Optional layers, imported only by the subcommand that needs them:
  evaluation/  evaluate, VBench dimensions, training probes, plot
  planning/    plan (memory per rank), check (the preflight), the per-model memory tables
  tracking     --tracker wandb | tensorboard (train imports it only with the flag)
"""
