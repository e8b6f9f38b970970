"""Judges: classifiers that say what a toy-world image shows, one head per concept kind.

They are trained on the generator's ground truth, with their own architecture (a plain CNN, no
attention, no text) and their own seed. They exist to *measure*: no patch-training loss may
call them (tests/test_judges_isolation.py checks that the training code never imports this module).
"""
from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..core.atomic import atomic_path
from . import world, world_v2
from .world import LABELS, NONE

WORLDS = {"v1": world, "v2": world_v2}  # world -> its generator; v2 heads read every label kind


class JudgeNet(nn.Module):
    def __init__(self, width: int = 48, world_name: str = "v1", grid: int | None = None):
        """grid: the heads read a grid x grid average of the last feature map. v2's scenes have a main
        subject on the left and a second one on the right; a global average (grid 1) cannot tell which
        is which, so the v2 judges read a 2 x 2 grid (the default for every world but v1)."""
        super().__init__()
        self.world_name = world_name
        self.grid = grid or (1 if world_name == "v1" else 2)
        self.labels = LABELS if world_name == "v1" else WORLDS[world_name].LABELS
        # images larger than v1's 32x32: a strided first convolution keeps the cost of v1's judge
        stride = WORLDS[world_name].IMAGE_SIZE // world.IMAGE_SIZE

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, stride=stride if cin == 3 else 1),
                                 nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(block(3, width), nn.MaxPool2d(2), block(width, width * 2), nn.MaxPool2d(2),
                                      block(width * 2, width * 4))
        self.heads = nn.ModuleDict({k: nn.Linear(width * 4 * self.grid ** 2, len(v)) for k, v in self.labels.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images: (B,3,H,W) in [-1, 1] -> logits per kind."""
        f = F.adaptive_avg_pool2d(self.features(images), self.grid).flatten(1)
        return {k: head(f) for k, head in self.heads.items()}

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features, averaged over the image: the space our Fréchet distance is measured in."""
        return self.features(images).mean(dim=(2, 3))


class Judge:
    """Loaded judge: call with a batch of images, get label names per kind."""

    def __init__(self, net: JudgeNet):
        self.net = net.eval()

    @classmethod
    def load(cls, path) -> "Judge":
        state = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            world_name = (f.metadata() or {}).get("world", "v1")
        if world_name not in WORLDS:
            raise ValueError(f"{path}: judges of an unknown toy world {world_name!r}")
        width = state["features.0.0.weight"].shape[0]
        head = next(v for k, v in state.items() if k.startswith("heads.") and k.endswith(".weight"))
        grid = round((head.shape[1] / (width * 4)) ** 0.5)  # the heads read grid x grid feature cells
        net = JudgeNet(width, world_name, grid)
        net.load_state_dict(state)
        return cls(net)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, list[str]]:
        logits = self.net(_as_input(images))
        return {k: [self.net.labels[k][i] for i in v.argmax(-1).tolist()] for k, v in logits.items()}

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.embed(_as_input(images))


def _as_input(images) -> torch.Tensor:
    """Accept uint8 HWC numpy / list of PIL / float tensors in [0,1] or [-1,1]."""
    if isinstance(images, list):
        images = np.stack([np.asarray(im) for im in images])
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    elif images.min() >= 0:  # [0,1] tensors, as diffusers' output_type="pt" gives
        images = images * 2 - 1
    return images.float()


def _batch(rng: random.Random, n: int, vae=None, augment: bool = True, world_name: str = "v1"):
    wm = WORLDS[world_name]
    labels = LABELS if world_name == "v1" else wm.LABELS
    scenes = [wm.random_scene(rng) for _ in range(n)]
    images = np.stack([wm.render(s, rng.randrange(1 << 30)) for s in scenes])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    if augment:
        x = _like_generated(x, vae, torch.tensor([s.identity != NONE for s in scenes]), wm.CHARACTER_DRIFT)
    y = {k: torch.tensor([v.index(s.label(k)) for s in scenes]) for k, v in labels.items()}
    return x, y


def _like_generated(x: torch.Tensor, vae=None, character: torch.Tensor | None = None,
                    character_drift: float = world.CHARACTER_DRIFT) -> torch.Tensor:
    """Make real renders look like what a small diffusion model generates, so the judge reads
    generations as well as renders. Seen in base-model samples: VAE blur, speckled and blotchy
    backgrounds, textures drawn faintly, slightly dull colours, characters whose colour drifts
    (Kiko comes out yellow-orange with bright patches). Labels are unchanged: faint stripes are
    stripes, a yellowish cat is Kiko. Shapes' hue is never shifted, so red, orange and pink stay
    apart; characters' hue drifts by the world's CHARACTER_DRIFT (less in v2, where tints tell them apart)."""
    n = len(x)
    if character is None:
        character = torch.zeros(n, dtype=torch.bool)
    if vae is not None:  # half the batch through the VAE, its latents perturbed like imperfect samples
        with torch.no_grad():
            half = x[: n // 2]
            post = vae.encode(half).latent_dist
            wobble = torch.rand(len(half), 1, 1, 1) * 0.6
            z = post.mean + wobble * post.std.mean() * torch.randn_like(post.mean)
            x[: n // 2] = vae.decode(z).sample.clamp(-1, 1)
    # Low-frequency blotches in every image: a 4x4 colour field, upsampled, small amplitude.
    blotch = F.interpolate(torch.randn(n, 3, 4, 4), size=x.shape[-2:], mode="bilinear", align_corners=False)
    x = x + blotch * torch.rand(n, 1, 1, 1) * 0.12
    # Characters: per-channel colour drift (the world's CHARACTER_DRIFT), in v1 enough to turn Kiko's
    # orange yellow; v2 tells characters of one species apart by tint, so it drifts less there.
    drift = (torch.rand(n, 3, 1, 1) - 0.5) * character_drift * character[:, None, None, None]
    figure = (x.amax(dim=1, keepdim=True) > -0.4).float()  # not the dark background
    x = x + drift * figure
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    contrast = 1 - torch.rand(n, 1, 1, 1) * 0.35  # faint textures and dull colours
    x = mean + (x - mean) * contrast
    blur = torch.rand(n) < 0.3
    if blur.any():
        kernel = torch.tensor([1.0, 2.0, 1.0])
        kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
        x[blur] = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    return x + torch.randn_like(x) * torch.rand(n, 1, 1, 1) * 0.12 + (torch.rand(n, 1, 1, 1) - 0.5) * 0.1


def train_judge(steps: int, seed: int, vae=None, batch: int = 96, progress=None, world_name: str = "v1") -> JudgeNet:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    net = JudgeNet(world_name=world_name)
    opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
    for step in range(steps):
        x, y = _batch(rng, batch, vae, world_name=world_name)
        logits = net(x)
        loss = sum(F.cross_entropy(logits[k], y[k]) for k in net.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            progress(loss.item())
    return net.eval()


@torch.no_grad()
def judge_accuracy(judge: Judge, n: int = 2000, seed: int = 12345) -> dict[str, float]:
    """Accuracy per kind on fresh real toy images (a seed never used in training)."""
    rng = random.Random(seed)
    kinds = list(judge.net.labels)
    correct = {k: 0 for k in kinds}
    for start in range(0, n, 250):
        x, y = _batch(rng, min(250, n - start), augment=False, world_name=judge.net.world_name)
        pred = judge.net(x)
        for k in kinds:
            correct[k] += (pred[k].argmax(-1) == y[k]).sum().item()
    return {k: correct[k] / n for k in kinds}


def identity_accuracy_by_art(judge: Judge, n: int = 480, seed: int = 777) -> dict[str, float]:
    """Identity-head accuracy on fresh real images of named characters, per art style ("none" = no art):
    a judge that reads Kiko only undrawn would make an identity erasure look easier than it is. Worlds
    without art styles: {}."""
    wm = WORLDS[judge.net.world_name]
    if not hasattr(wm, "ART"):
        return {}
    rng, out = random.Random(seed), {}
    for art in [NONE, *wm.ART]:
        scenes = []
        while len(scenes) < n:
            s = wm.random_scene(rng, identity_share=1.0)
            if s.identity != NONE:  # a named character (unnamed ones have no identity to read)
                scenes.append(replace(s, art=art))
        pred = judge.predict(np.stack([wm.render(s, rng.randrange(1 << 30)) for s in scenes]))["identity"]
        out[art] = float(np.mean([p == s.identity for p, s in zip(pred, scenes)]))
    return out


def save_judge(net: JudgeNet, path) -> None:
    path = Path(path)
    with atomic_path(path) as tmp:  # measurements never read a half-written judge
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp),
                  metadata=None if net.world_name == "v1" else {"world": net.world_name})
