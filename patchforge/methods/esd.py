"""ESD-x: Erased Stable Diffusion (Gandikota et al. 2023), cross-attention variant.

Fine-tune the patched model so that, conditioned on the concept, it predicts what the frozen model
would predict under *negative* guidance away from the concept:

    target = eps*(x_t, c) - eta * (eps*(x_t, c) - eps*(x_t, "")),     L = || eps_theta(x_t, c) - target ||^2

ESD-x trains only cross-attention (here: the LoRA on the text attention), which keeps unrelated prompts better
than ESD-u. The original draws x_t by sampling the frozen model up to a random step; we noise the
frozen model's own finished samples of the concept to a random t (same marginal, far cheaper). No
preservation term: this is the baseline as published.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from . import Method, MethodConfig, register


@dataclass
class ESDConfig(MethodConfig):
    steps: int = 80
    lr: float = 2e-3
    eta: float = 1.0  # negative-guidance strength


@register("esd")
class ESD(Method):
    Config = ESDConfig

    def prepare(self):
        self.load_concept_rows()

    @classmethod
    def denoiser_rows(cls, hp, batch):
        return batch, 2 * batch  # patched on the concept; base on the concept and on the empty prompt

    def loss(self, step):
        tr, eta = self.tr, self.hp.eta * self.specs[0].guidance
        idx = tr.pick(self.prompts, self.batch)
        x_t, t, _ = tr.noised(self.refs[idx])
        cond = tr.embed([self.prompts[i] for i in idx], role="target")
        e_c = tr.predict(x_t, t, tr.embed([self.prompts[i] for i in idx], base=True), base=True)
        e_0 = tr.predict(x_t, t, tr.embed([""] * len(idx), base=True), base=True)
        loss = F.mse_loss(tr.predict(x_t, t, cond), e_c - eta * (e_c - e_0))
        return loss, {}
