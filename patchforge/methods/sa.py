"""Selective Amnesia (Heng & Soh 2023), on a LoRA.

Forgetting as continual learning: learn a *surrogate* for the concept, replay everything else, and
hold the weights that matter (EWC):

    L = E_{x ~ q}      || eps_theta(x_t, c_f) - eps ||^2          surrogate: base-model images of the
                                                                  anchor, trained under the concept's prompts
      + gamma E_replay || eps_theta(x_t, c_r) - eps ||^2          base-model images of preserve prompts
      + lam   sum_i F_i (theta_i - theta*_i)^2                    EWC, diagonal Fisher of the base

With a LoRA, theta - theta* of a layer is its merged delta B·A·scale. F (squared gradients of the
denoising loss over samples and timesteps, on base-model generations of general prompts) is
estimated once per base model and target set and cached in $PATCHFORGE_CACHE/fisher/. F is
normalised to mean 1 and the penalty averaged over the targeted weights, so lam is a plain
weight on an importance-weighted mean square of the delta, whatever the model's size.
(eps is v for v-prediction bases.)
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.atomic import atomic_path
from ..core.cache import cache_dir
from ..backbones import Cond
from ..core.lora import has_adapter, lora_delta
from ..io.fingerprint import model_key
from . import Method, MethodConfig, cycle, register


@dataclass
class SAConfig(MethodConfig):
    steps: int = 80
    lr: float = 2e-3
    gamma: float = 1.0  # replay weight
    lam: float = 50.0  # EWC weight
    fisher_samples: int = 16


@register("sa")
class SelectiveAmnesia(Method):
    Config = SAConfig

    def prepare(self):
        tr = self.tr
        # q: what the anchor prompts look like to the base model, paired with the concept's prompts
        anchors = (self.anchor * self.hp.n_refs)[:self.hp.n_refs]
        self.surrogate = tr.reference_latents(anchors, "surrogate-" + "+".join(s.key for s in self.specs))
        self.prompts = cycle(self.target, len(self.surrogate))
        self.replay = self.preserve_refs()
        self.fisher = self.load_fisher()

    def fisher_prompts(self) -> list[str]:
        from ..core import worlds
        from ..core.concepts import GENERAL_PRESERVE

        world = next((s.world for s in self.specs if s.world), None)
        if world:  # a concept world: one prompt of each of its concepts
            return worlds.get(world).general_prompts()
        return [p for p in GENERAL_PRESERVE if p]

    def load_fisher(self) -> dict[str, torch.Tensor]:
        """Diagonal Fisher of the LoRA-targeted base weights, cached once per base model."""
        from safetensors.torch import load_file, save_file

        tr, targets = self.tr, self.tr.backbone.target_pattern(self.hp.denoiser_targets)
        prompts = self.fisher_prompts()
        tag = hashlib.sha256(f"{targets}|{prompts}|{self.hp.fisher_samples}".encode()).hexdigest()[:10]
        path = cache_dir() / "fisher" / f"{model_key(tr.pipe)}-{tag}.safetensors"
        if path.exists():
            return {k: v.to(tr.device) for k, v in load_file(str(path)).items()}
        import re
        weights = {n: m.weight for n, m in tr.denoiser.named_modules()
                   if isinstance(m, torch.nn.Linear) and re.fullmatch(targets, n)}
        fisher = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in weights.items()}
        latents = tr.reference_latents(prompts, "fisher")
        gen = torch.Generator("cpu").manual_seed(1234)  # fixed: the cache must not depend on the run's seed
        for w in weights.values():
            w.requires_grad_(True)
        for i in range(self.hp.fisher_samples):  # per-sample squared gradients
            j = i % len(prompts)
            x0 = latents[j:j + 1]
            x_t, t, noise = tr.backbone.noised(x0, gen)
            loss = F.mse_loss(tr.predict(x_t, t, tr.embed([prompts[j]], base=True)), tr.target(x0, noise, t))
            grads = torch.autograd.grad(loss, list(weights.values()))
            for (n, _), g in zip(weights.items(), grads):
                fisher[n] += g.float() ** 2 / self.hp.fisher_samples
        for w in weights.values():
            w.requires_grad_(False)
        mean = torch.cat([f.flatten() for f in fisher.values()]).mean().clamp_min(1e-20)
        fisher = {n: (f / mean).contiguous().cpu() for n, f in fisher.items()}
        with atomic_path(path) as tmp:
            save_file(fisher, str(tmp))
        return {k: v.to(tr.device) for k, v in fisher.items()}

    def start(self):
        # peft wraps each targeted Linear as a LoRA layer under the same module name
        modules = dict(self.tr.denoiser.named_modules())
        self.layers = [(modules[n], f) for n, f in self.fisher.items() if n in modules and has_adapter(modules[n])]
        self.n_weights = max(1, sum(f.numel() for _, f in self.layers))

    @classmethod
    def denoiser_rows(cls, hp, batch):
        return 2 * batch, 0  # forget and replay rows against the true noise

    def loss(self, step):
        tr, hp, b = self.tr, self.hp, self.batch
        idx = tr.pick(self.prompts, b)
        ridx = tr.pick(self.replay, b)
        x0 = torch.cat([self.surrogate[idx], self.replay[ridx]])
        x_t, t, noise = tr.noised(x0)
        cond = Cond.cat([tr.embed([self.prompts[i] for i in idx], role="target"),
                         tr.embed([self.preserve[i] for i in ridx], role="preserve")])
        err = (tr.predict(x_t, t, cond) - tr.target(x0, noise, t)).pow(2).flatten(1).mean(1)
        l_forget, l_replay = err[:b].mean(), err[b:].mean()
        # mean over the targeted weights, so lam does not scale with the model's size
        l_ewc = sum((f * lora_delta(m).pow(2)).sum() for m, f in self.layers) / self.n_weights
        loss = l_forget + hp.gamma * l_replay + hp.lam * l_ewc
        return loss, {"forget": l_forget, "replay": l_replay, "ewc": l_ewc}
