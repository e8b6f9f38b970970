"""Seconds per training step of the toy model's networks at v1's size and at world v2's candidate
resolutions: a short pilot (a few steps each, one thread) to size the v2 build before running it.

    OMP_NUM_THREADS=1 python benchmarks/pilot_toy_v2_size.py [--steps 12] [--only '/4']

UNet + text-encoder step at batch 64 (what `toy train` repeats thousands of times) and VAE step at
batch 32, for: v1 (32 px, VAE /2 -> 16x16 latents), 48 px /2 (24x24), 64 px /2 (32x32), and 64 px
through a VAE that downsamples /4 (16x16 latents: the UNet costs what v1's does).
"""
import argparse
import time

import torch
import torch.nn.functional as F


def vae(size: int, factor: int):
    from diffusers import AutoencoderKL

    blocks = (32, 64) if factor == 2 else (32, 64, 64)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=size,
                         down_block_types=("DownEncoderBlock2D",) * len(blocks),
                         up_block_types=("UpDecoderBlock2D",) * len(blocks),
                         block_out_channels=blocks, layers_per_block=1)


def time_steps(step, n: int) -> float:
    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n


def main() -> None:
    from diffusers import UNet2DConditionModel

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--only", default=None, help="run only the configurations whose name contains this")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    for name, pixels, factor in (("v1 32px /2", 32, 2), ("48px /2", 48, 2), ("64px /2", 64, 2),
                                 ("64px /4", 64, 4)):
        if args.only and args.only not in name:
            continue
        latent = pixels // factor
        unet = UNet2DConditionModel(sample_size=latent, in_channels=4, out_channels=4,
                                    block_out_channels=(32, 64, 128),
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                    layers_per_block=1, cross_attention_dim=128, attention_head_dim=8)
        opt = torch.optim.AdamW(unet.parameters(), 1e-4)
        x, cond = torch.randn(64, 4, latent, latent), torch.randn(64, 32, 128)
        t = torch.randint(0, 1000, (64,))

        def unet_step():
            loss = F.mse_loss(unet(x, t, cond).sample, x)
            opt.zero_grad()
            loss.backward()
            opt.step()

        v = vae(pixels, factor)
        vopt = torch.optim.AdamW(v.parameters(), 1e-4)
        img = torch.rand(32, 3, pixels, pixels) * 2 - 1

        def vae_step():
            post = v.encode(img).latent_dist
            loss = F.mse_loss(v.decode(post.sample()).sample, img)
            vopt.zero_grad()
            loss.backward()
            vopt.step()

        su = time_steps(unet_step, args.steps)
        sv = time_steps(vae_step, max(3, args.steps // 3))
        print(f"{name}: latents {latent}x{latent}: UNet step {su:.2f} s (batch 64), VAE step {sv:.2f} s (batch 32)",
              flush=True)


if __name__ == "__main__":
    main()
