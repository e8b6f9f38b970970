"""Data Redaction by distilling the conditioning network (Kong & Chaudhuri 2023).

Freeze the generator; train only the text encoder (here a LoRA on it) so that redacted prompts are
encoded like their safe reference prompts and every other prompt like before:

    L = || E'(c) - sg(E(ref(c))) ||^2   for redacted c      (ref(c) = anchor prompt: --to or concept removed)
      + preserve_weight || E'(c_p) - sg(E(c_p)) ||^2     for others

on the token embeddings the denoiser sees. No denoiser forward or backward at all: the cheapest method, and
the denoiser is untouched, so an attacker who feeds embeddings directly bypasses it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from . import Method, MethodConfig, register


@dataclass
class RedactConfig(MethodConfig):
    steps: int = 100
    lr: float = 3e-3
    denoiser_targets: str = "none"
    text_encoder: bool = True


@register("redact")
class Redact(Method):
    Config = RedactConfig

    @classmethod
    def denoiser_rows(cls, hp, batch):
        return 0, 0  # trains the text encoder only

    def loss(self, step):
        tr, b = self.tr, self.batch
        idx = tr.pick(self.target, b)
        pidx = tr.pick(self.preserve, b)
        redacted = tr.embed([self.target[i] for i in idx], role="target")
        goal = tr.embed([self.anchor[i] for i in idx], base=True)
        kept = tr.embed([self.preserve[i] for i in pidx], role="preserve")
        keep_goal = tr.embed([self.preserve[i] for i in pidx], base=True)
        l_red = F.mse_loss(redacted.emb, goal.emb)
        l_pres = F.mse_loss(kept.emb, keep_goal.emb)
        if redacted.pooled is not None:  # SDXL: the pooled embedding conditions the denoiser too
            l_red = l_red + F.mse_loss(redacted.pooled, goal.pooled)
            l_pres = l_pres + F.mse_loss(kept.pooled, keep_goal.pooled)
        return l_red + self.hp.preserve_weight * l_pres, {"redact": l_red, "pres": l_pres}
