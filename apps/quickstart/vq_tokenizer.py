"""The quickstart's image tokenizer: Janus's VQ-VAE (transformers' JanusVQVAE, the model the `janus_vq`
decoder loads) trained on the training digit scans, saved with `save_pretrained`.

The codebook is used L2-normalised, as `JanusVQVAE.decode` reads it: training quantises the normalised
latent to the nearest normalised code (straight-through) and the saved codebook is normalised, so HF's
own `encode` (nearest code) and `decode` agree with what was trained. Codes unused in a step are moved
onto latents of that batch (no dead codes).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def _images(scans8: np.ndarray, size: int) -> torch.Tensor:
    """(n, 8, 8) scans -> (n, 3, size, size) in [-1, 1], as the decoder's processor feeds the VQ-VAE."""
    from digits import digit_image

    pixels = np.stack([np.asarray(digit_image(s, size), dtype=np.float32) / 255.0 for s in scans8])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2) * 2 - 1


def image_size(cfg) -> int:
    """The side (px) of the images a JanusVQVAEConfig's codes cover: the grid times the downsampling."""
    return cfg.num_patches * 2 ** (len(cfg.channel_multiplier) - 1)


def _latents(vq, x: torch.Tensor) -> torch.Tensor:
    """The encoder's normalised latents of images `x`, one row per code position."""
    z = F.normalize(vq.quant_conv(vq.encoder(x)), dim=1)
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def _quantize(vq, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(straight-through quantised latent, commitment + codebook loss, code indices)."""
    z = F.normalize(z, dim=1)
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    book = F.normalize(vq.quantize.embedding.weight, dim=1)
    idx = (flat @ book.T).argmax(dim=1)
    q = book[idx]
    loss = F.mse_loss(q, flat.detach()) + 0.25 * F.mse_loss(flat, q.detach())
    q = (flat + (q - flat).detach()).view(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)
    return q, loss, idx


def train_vq(config: dict[str, Any], out: Path, steps: int = 300, batch: int = 32, seed: int = 0) -> Path:
    """Train the VQ-VAE of `config` (a JanusVQVAEConfig's fields) on the training scans; save it to `out`."""
    from transformers import JanusVQVAEConfig

    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the same arithmetic wherever the data is made: the dataset is reproducible
    try:
        return _train(JanusVQVAEConfig(**config), out, steps, batch, seed)
    finally:
        torch.set_num_threads(threads)


def _train(cfg, out: Path, steps: int, batch: int, seed: int) -> Path:
    from digits import scans
    from transformers.models.janus.modeling_janus import JanusVQVAE

    vq = JanusVQVAE(cfg).train()
    images = _images(scans("train")[0], image_size(cfg))
    opt = torch.optim.Adam(vq.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    with torch.no_grad():  # codebook from the latents of the untrained encoder (no code starts dead)
        z = _latents(vq, images[:batch])
        vq.quantize.embedding.weight.copy_(z[torch.randperm(len(z), generator=gen)[: cfg.num_embeddings]])
    for step in range(steps):
        x = images[torch.randint(len(images), (batch,), generator=gen)]
        q, vq_loss, idx = _quantize(vq, vq.quant_conv(vq.encoder(x)))
        rec = vq.decoder(vq.post_quant_conv(q))
        loss = F.mse_loss(rec, x) + vq_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():  # codes this batch did not use move onto its latents
            dead = torch.ones(cfg.num_embeddings, dtype=torch.bool)
            dead[idx] = False
            if dead.any():
                flat = _latents(vq, x)
                pick = torch.randint(len(flat), (int(dead.sum()),), generator=gen)
                vq.quantize.embedding.weight[dead] = flat[pick]
        if step % 100 == 0 or step == steps - 1:
            print(
                f"  vq step {step}: reconstruction {F.mse_loss(rec, x).item():.4f} ({time.perf_counter() - t0:.0f} s)"
            )
    with torch.no_grad():
        vq.quantize.embedding.weight.copy_(F.normalize(vq.quantize.embedding.weight, dim=1))
    vq.eval().save_pretrained(out)
    return out
