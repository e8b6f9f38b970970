"""All-but-One: surgical concept erasing on the guidance term.

Classifier-free guidance samples with eps(∅) + w·(eps(c) − eps(∅)); the concept lives in the
guidance term g(c) = eps(c) − eps(∅). Change only that, for the concept's prompts, and hold the
unconditional prediction (and every other prompt's guidance term):

    L = || g_theta(x_t, c) - sg(g_goal) ||^2 + lam_uncond || eps_theta(x_t, ∅) - sg(eps*(x_t, ∅)) ||^2
        + preserve_weight || g_theta(x_t, c_p) - sg(g*(x_t, c_p)) ||^2

    g_goal = g*(x_t, c_alt)        when the concept has an alternative (--to, or the prompt with the
                                   concept removed, which the toy world and catalog always give)
           = 0                     guide=zero: the concept's prompt guides nowhere
           = -nu · g*(x_t, c)      guide=negative: it guides away from the concept

(No public code; this is the paper's description made concrete -- see docs/methods.md.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..backbones import Cond
from . import Method, MethodConfig, register


@dataclass
class AOBConfig(MethodConfig):
    steps: int = 80
    lr: float = 2e-3
    guide: str = "auto"  # auto (alternative if any, else zero) | alternative | zero | negative
    nu: float = 1.0
    lam_uncond: float = 1.0


@register("aob")
class AllButOne(Method):
    Config = AOBConfig

    def prepare(self):
        self.load_concept_rows()
        guide = self.hp.guide
        if guide == "auto":
            has_alt = all(s.to or s.world or s.kind not in ("custom",) for s in self.specs)
            guide = "alternative" if has_alt else "zero"
        self.guide = guide

    @classmethod
    def denoiser_rows(cls, hp, batch):
        return 4 * batch, 4 * batch  # [concept | preserve | uncond x2], patched and base

    def loss(self, step):
        tr, hp, b = self.tr, self.hp, self.batch
        idx = tr.pick(self.prompts, b)
        x_t, t, _ = tr.noised(self.refs[idx])
        px, pt, _, pcond, _ = self.preserve_batch(self.refs)
        empty = tr.embed([""] * b, base=True)
        # patched: [concept | preserve | uncond(concept x_t) | uncond(preserve x_t)] in one call
        cond = Cond.cat([tr.embed([self.prompts[i] for i in idx], role="target"), pcond, empty, empty])
        x_all, t_all = torch.cat([x_t, px, x_t, px]), torch.cat([t, pt, t, pt])
        e = tr.predict(x_all, t_all, cond).split(b)
        goal_c = tr.embed([(self.anchors if self.guide == "alternative" else self.prompts)[i] for i in idx], base=True)
        with torch.no_grad():
            base = tr.predict(x_all, t_all, Cond.cat([goal_c, pcond, empty, empty]), base=True).split(b)
        g_goal = base[0] - base[2]
        if self.guide == "zero":
            g_goal = torch.zeros_like(g_goal)
        elif self.guide == "negative":
            g_goal = -hp.nu * g_goal
        l_erase = F.mse_loss(e[0] - e[2], g_goal)
        l_uncond = F.mse_loss(torch.cat([e[2], e[3]]), torch.cat([base[2], base[3]]))
        l_pres = F.mse_loss(e[1] - e[3], base[1] - base[3])
        loss = l_erase + hp.lam_uncond * l_uncond + hp.preserve_weight * l_pres
        return loss, {"erase": l_erase, "pres": l_pres}
