"""UCE: Unified Concept Editing (Gandikota et al. 2024), closed form, every token.

No training loop. Each projection W that turns text tokens into cross-attention keys and values
(the backbone's text_kv()) is replaced by the ridge least-squares solution that sends the concept's tokens
where the anchor's tokens go and holds every preserve token where it was:

    min_W  Σ_e ||W c_e - v*_e||² + preserve_weight Σ_p ||W c_p - W0 c_p||² + λ ||W - W0||²

    v*_e = W0 a_e - away · (W0 c_e - W0 a_e)

c_e runs over EVERY token position of every target prompt (the name, the words after it, the
end-of-text and padding tokens that CLIP's causal encoder has filled with the name) and a_e over the
same position of its anchor prompt. UCE's public script edits only through the concept word's last
token: on a small CLIP the later tokens carry the concept on their own and that erases nothing.
`away` extrapolates past the anchor, as ESD's negative guidance does (an anchor "a photo of a shape"
still draws the erased shape at chance rate). The empty prompt is always preserved: it is the
unconditional half of classifier-free guidance. Setting the gradient to zero gives

    ΔW = Σ_e (v*_e - W0 c_e) c_eᵀ · (C_e + preserve_weight C_p + λ I)⁻¹,   C = Σ c cᵀ

(one d×d solve per layer; ΔW's rows live in the span of the target tokens, so it is low rank). ΔW is
factored by truncated SVD, ΔW ≈ (U_r S_r)(V_rᵀ), with r the smallest rank that keeps `energy` of the
squared singular values in every layer, capped at `max_rank`; the relative Frobenius error left by
the truncation is reported. The result is an ordinary LoRA forget patch (B = U_r S_r / scale,
A = V_rᵀ), loaded, stacked, merged and exported like any other.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PatchforgeError
from ..core.lora import ADAPTER
from . import Method, MethodConfig, register


@dataclass
class UCEConfig(MethodConfig):
    steps: int = 0  # closed form: no optimisation step
    denoiser_targets: str = "xattn-kv"  # the layers the backbone's text_kv() lists, which this edits
    preserve_weight: float = 1.0  # weight of each preserve token against each erased token
    erase_weight: float = 1.0
    away: float = 1.0  # v* = W0 a - away (W0 c - W0 a): past the anchor, away from the concept
    ridge: float = 0.1  # λ, relative to the mean diagonal of the token covariance
    energy: float = 0.999  # share of ΔW's squared singular values the LoRA keeps, per layer
    max_rank: int = 32


@register("uce")
class UCE(Method):
    Config = UCEConfig
    closed_form = True

    def prepare(self):
        hp = self.hp
        if not 0 < hp.energy <= 1 or hp.max_rank < 1 or hp.ridge < 0 or hp.preserve_weight < 0:
            raise PatchforgeError("uce needs 0 < energy <= 1, max_rank >= 1, ridge >= 0 and preserve_weight >= 0")
        layers = self.tr.backbone.text_kv()
        if not layers:
            raise PatchforgeError("uce: this model has no text cross-attention key/value projections to edit")
        tr = self.tr
        if not tr.backbone.text_kv_reads_text:
            self.prepare_joint(layers)
            return
        with torch.no_grad():
            c = tr.embed(self.target, base=True).emb.float().flatten(0, 1)  # (targets * tokens, d)
            a = tr.embed(self.anchor, base=True).emb.float().flatten(0, 1)
            p = tr.embed(list(dict.fromkeys(self.preserve + [""])), base=True).emb.float().flatten(0, 1)
            cov = hp.erase_weight * c.T @ c + hp.preserve_weight * p.T @ p
            cov += hp.ridge * cov.diagonal().mean() * torch.eye(len(cov), device=cov.device)
            self.deltas, self.errors = {}, {}
            for name, module in layers:
                w0 = getattr(module, "base_layer", module).weight.float()
                goal = a @ w0.T - hp.away * (c @ w0.T - a @ w0.T)  # (tokens, out): v*_e
                rhs = hp.erase_weight * (goal - c @ w0.T).T @ c  # (out, d)
                self.deltas[name] = torch.linalg.solve(cov, rhs.T).T  # rhs cov⁻¹ (cov is symmetric)
            self.factors = {n: torch.linalg.svd(d, full_matrices=False) for n, d in self.deltas.items()}
        self.rank = min(hp.max_rank, max(_energy_rank(s, hp.energy) for _, s, _ in self.factors.values()))

    def prepare_joint(self, layers) -> None:
        """Joint attention (SD3, FLUX): add_k/add_v read the transformer's text stream, which depends on the
        block, the timestep and the image, so c_e, a_e and c_p are each layer's actual inputs, captured from
        the frozen base on the concept's reference latents noised at seeded random timesteps, a_e on the
        same x_t and t as c_e (methods.text_kv_moments). Only their sums enter the solution:

            ΔW = (1 + away) W0 (S_ac − S_cc) · (C_e + preserve_weight C_p + λ I)⁻¹

        An edit in one block also changes the text stream the next block reads; the capture sees the base's."""
        from . import text_kv_moments

        hp, tr = self.hp, self.tr
        refs = self.concept_refs()
        erased = text_kv_moments(tr, self.target, refs, paired=self.anchor, seed=tr.cfg.seed)
        kept = text_kv_moments(tr, list(dict.fromkeys(self.preserve + [""])), refs, seed=tr.cfg.seed)
        self.deltas, self.errors = {}, {}
        with torch.no_grad():
            for name, module in layers:
                s_cc, s_ac, _ = erased[name]
                cov = hp.erase_weight * s_cc + hp.preserve_weight * kept[name][0]
                cov += hp.ridge * cov.diagonal().mean() * torch.eye(len(cov), device=cov.device)
                w0 = getattr(module, "base_layer", module).weight.float()
                rhs = hp.erase_weight * (1 + hp.away) * w0 @ (s_ac - s_cc)  # (out, d)
                self.deltas[name] = torch.linalg.solve(cov, rhs.T).T
            self.factors = {n: torch.linalg.svd(d, full_matrices=False) for n, d in self.deltas.items()}
        self.rank = min(hp.max_rank, max(_energy_rank(s, hp.energy) for _, s, _ in self.factors.values()))

    def lora_rank(self) -> int:
        return self.rank

    def solve(self, scale: float) -> dict:
        """Write B·A·scale = the rank-r truncation of ΔW into each layer's LoRA; return the residual."""
        modules = dict(self.tr.denoiser.named_modules())
        r, worst, num, den = self.rank, 0.0, 0.0, 0.0
        with torch.no_grad():
            for name, (u, s, vh) in self.factors.items():
                lora = modules[name]
                a, b = vh[:r], u[:, :r] * s[:r] / scale
                lora.lora_A[ADAPTER].weight.copy_(a)
                lora.lora_B[ADAPTER].weight.copy_(b)
                delta = self.deltas[name]
                err = float((delta - (b @ a) * scale).norm())
                worst = max(worst, err / max(float(delta.norm()), 1e-12))
                num, den = num + err ** 2, den + float(delta.norm()) ** 2
        return {"rank": r, "residual": (num / max(den, 1e-24)) ** 0.5, "residual_max_layer": worst,
                "layers": len(self.factors)}


def _energy_rank(s: torch.Tensor, energy: float) -> int:
    """Smallest k with Σ_{i<k} s_i² >= energy · Σ s_i² (at least 1)."""
    share = (s ** 2).cumsum(0) / max(float((s ** 2).sum()), 1e-30)
    return min(len(s), int((share < energy - 1e-12).sum()) + 1)
