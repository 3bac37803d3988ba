"""The video machinery shared by wan_dfd.py and cosmos_dfd.py: one module per role, importing only downward
(adapters -> this package -> dfd.py).

  adapter      the interface a model implements (Adapter), the guided-denoiser base, loading a transformer folder
  vae          the Wan 2.1 VAE (Wan and Cosmos-Predict2.5 share it): videos <-> normalised latents
  distributed  torchrun set-up, FSDP2 sharding, full state dicts, compute dtype
  weights      --dmd2-ckpt and base-model weights in every known layout; exact loading with clear errors
  data         prepared latent shards + manifest; the resumable training stream
  video        PyAV decode / encode, prompts files, folders of captioned videos
  files        atomic writes; one-line errors for unwritable paths and full disks
  runs         the run folder: training checkpoints, --resume, the metric log
  lora         --lora-rank: peft adapters on frozen bases; export --lora
  memory       the estimated peak GPU memory per rank of a train run
  vbench/      evaluate's VBench quality dimensions, one file each
  prepare, train, sample, evaluate, plot, check
               the subcommand drivers, each taking an adapter
  probes       samples fixed conditions and seeds while a run trains (--probe-every)
  cli          every subcommand's flags, the checks run before any model loads, main(adapter)
"""
