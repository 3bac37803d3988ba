"""The Wan 2.1 VAE (AutoencoderKLWan), which Wan2.1 and Cosmos-Predict2.5 share: videos <-> normalised latents.

Latents are z = (z_vae - latents_mean) / latents_std, [16, (T-1)/4 + 1, H/8, W/8], exactly as the diffusers
pipelines decode them. z_vae is a seeded sample of the VAE posterior (what FastGen's trainer encodes real videos
with, `WanVideoEncoder.encode(mode="sample")`) or its mode (what the pipelines use for a conditioning image)."""
from __future__ import annotations

import os

import torch


class WanVAE:
    def __init__(self, model_dir: str, device: torch.device):
        from diffusers import AutoencoderKLWan
        self.device = device
        if not os.path.isdir(os.path.join(model_dir, "vae")):
            raise ValueError(f"--model-dir {model_dir}: no vae/ folder (expected a diffusers pipeline folder)")
        try:
            self.vae = AutoencoderKLWan.from_pretrained(os.path.join(model_dir, "vae")).to(device).eval()
        except Exception as e:
            raise ValueError(f"--model-dir {model_dir}: cannot load the VAE "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None

    def _stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.vae.config
        shape = (1, cfg.z_dim, 1, 1, 1)
        return (torch.tensor(cfg.latents_mean).view(shape).to(self.device),
                torch.tensor(cfg.latents_std).view(shape).to(self.device))

    @torch.no_grad()
    def encode_video(self, frames: torch.Tensor, seed: int | None = None) -> dict[str, torch.Tensor]:
        """uint8 [T, H, W, 3] -> {"latents": [16, (T-1)/4+1, H/8, W/8]}, normalised (z - mean) / std, the
        inverse of the pipeline's decode. seed=None: z is the posterior mode; else a posterior sample
        mean + std * eps with eps from a CPU generator seeded with `seed` (the same on every device)."""
        x = frames.to(self.device).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0  # [1, 3, T, H, W] in [-1, 1]
        posterior = self.vae.encode(x.to(self.vae.dtype)).latent_dist
        if seed is None:
            z = posterior.mode().float()
        else:
            eps = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
            z = posterior.mean.float() + posterior.std.float() * eps.to(self.device)
        mean, std = self._stats()
        return {"latents": ((z - mean) / std)[0]}

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, 16, T', h, w] normalised latents -> uint8 [B, T, H, W, 3], as the pipeline decodes."""
        mean, std = self._stats()
        z = latents.float() * std + mean
        video = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0].float()  # [B, 3, T, H, W] in [-1, 1]
        return ((video / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 4, 1)
