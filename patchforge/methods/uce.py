"""UCE: Unified Concept Editing (Gandikota et al. 2024), closed form, every token.

No training loop. Each projection W that turns text tokens into cross-attention keys and values
(the backbone's text_kv()) is replaced by the ridge least-squares solution that sends the concept's tokens
where the anchor's tokens go and holds every preserve token where it was:

    min_W  Σ_e w_e ||W c_e - v*_e||² + preserve_weight Σ_p ||W c_p - W0 c_p||² + λ ||W - W0||²

    v*_e = W0 a_e - away · (W0 c_e - W0 a_e)

(w_e: 1 for one concept; with `balance`, the default, every listed concept's rows share the same total.)

c_e runs over EVERY token position of every target prompt (the name, the words after it, the
end-of-text and padding tokens that CLIP's causal encoder has filled with the name) and a_e over the
same position of its anchor prompt. UCE's public script edits only through the concept word's last
token: on a small CLIP the later tokens carry the concept on their own and that erases nothing.
`away` extrapolates past the anchor, as ESD's negative guidance does (an anchor "a photo of a shape"
still draws the erased shape at chance rate). The empty prompt is always preserved: it is the
unconditional half of classifier-free guidance. Setting the gradient to zero gives

    ΔW = Σ_e w_e (v*_e - W0 c_e) c_eᵀ · (C_e + preserve_weight C_p + λ I)⁻¹,   C_e = Σ w_e c_e c_eᵀ, C_p = Σ c_p c_pᵀ

(one d×d solve per layer; ΔW's rows live in the span of the target tokens, so it is low rank). ΔW is
factored by truncated SVD, ΔW ≈ (U_r S_r)(V_rᵀ), with r the smallest rank that keeps `energy` of the
squared singular values in every layer, capped at `max_rank`; the relative Frobenius error left by
the truncation is reported. The result is an ordinary LoRA forget patch (B = U_r S_r / scale,
A = V_rᵀ), loaded, stacked, merged and exported like any other.

Hardening (adv_rounds > 0; fmn's default warm start uses 2): the closed form erases the concept's own
token directions, and an optimised prompt steps around them (UnlearnDiffAtk brought the toy star back in
81 % of images). Each round attacks the current edit with UnlearnDiffAtk's per-prompt prefix, adds the
prefixed target prompts to the erased rows and the prefixed preserve prompts (and each attacked prompt's
neighbour twin) to the kept rows, and solves again: RECE's loop, with the published attack as the adversary.
On SD3 / FLUX the rounds run on the pooled projection's rows (solve_pooled): the joint attention's K/V read
the transformer's own text stream, which a closed form cannot re-solve against a prefix.
"""
from __future__ import annotations

import difflib
import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import PatchforgeError
from ..core.lora import ADAPTER
from . import Method, MethodConfig, register


@dataclass
class UCEConfig(MethodConfig):
    steps: int = 0  # closed form: no optimisation step
    # the layers the backbone's text_kv() and pooled_text_in() list, which this edits (SD 1.x / 2.x / XL: the
    # K/V alone; SD3 / FLUX: the pooled projection too, where the DiT toy reads the object from)
    denoiser_targets: str = "xattn-kv+pooled"
    # weight of each preserve token against each erased token. 6 with the anchors kept (below): on the toy's
    # lists it took compositional prompts from 75 to 84 % of base at 8 concepts and from 62 to 95 % for every
    # colour but red; 8 left Kiko at 50 % in a list of 4, 4 kept less (docs/methods.md, "Many concepts")
    preserve_weight: float = 6.0
    erase_weight: float = 1.0
    away: float = 1.0  # v* = W0 a - away (W0 c - W0 a): past the anchor, away from the concept
    # the push per kind, "kind=value,..." (kinds not named: `away`; cross-attention models only). Half the
    # push for styles: a full one moves the rest of the scene (one stripes patch kept 83 % of its
    # compositional prompts at 1, 92 % at 0.5); with `balance` and the lists' colour anchors, the toy's lists
    # of 4, 8 and 16 kept 94 / 89 / 98 % of them (91 / 81 / 97 % at 1) with every listed concept still 0 %;
    # at 0 a listed heart came back (17 % held-out) and outline in all-but-one style (67 %). Halving the
    # objects' and colours' push too let a listed heart back (docs/methods.md, "Many concepts")
    away_by_kind: str = "style=0.5"
    ridge: float = 0.1  # λ, relative to the mean diagonal of the token covariance
    energy: float = 0.999  # share of ΔW's squared singular values the LoRA keeps, per layer
    max_rank: int = 32
    # each target token's goal is the anchor token it lines up with, word by word ("a blue square" ->
    # "a square": "square" -> "square", the removed "blue" -> the "a" before it), not the token at the same
    # position ("blue" -> "square", "square" -> end-of-text). Off: position by position, as UCE's script
    align: bool = False
    # the anchor prompts join the kept rows: what the target is mapped to is itself held where it is, so the
    # edit cannot drift a composition ("a star on stripes" -> "a star") off the anchor's own picture
    preserve_anchors: bool = True
    # hardening rounds (RECE-style, with UnlearnDiffAtk's prefix as the adversary): after each solve, a
    # per-prompt soft prefix is optimised against the edited model to bring the concept back; the
    # prefixed target prompts join the erased rows, the prefixed preserve prompts the kept ones; solve again
    adv_rounds: int = 0
    adv_steps: int = 20  # Adam steps of each round's prefix attack
    adv_tokens: int = 5  # prefix length (UnlearnDiffAtk's published 5)
    adv_lr: float = 0.01
    adv_prompts: int = 8  # target prompts attacked per round (at most the training batch: its memory)
    adv_keep: float = 1.0  # weight of each prefixed preserve token, relative to preserve_weight
    # SPEED's null-space constraint (Li et al. 2025): the edit acts only in directions the kept rows do not
    # use -- the top eigen-directions of their covariance that hold this share of its trace are projected
    # out of every row before the solve, so a kept token moves only by what lies outside them. 0 = off
    # (the ridge's soft hold alone)
    null_space: float = 0.0
    # each listed concept's rows weigh the same in the solve, however many prompts it has (a toy identity
    # has 3, a colour 16): without it a list's identities are a small share of the erased rows, and Kiko
    # came back (50 %) in the toy's list of 4 once its colour was anchored on another colour. One concept:
    # every weight is 1, the solve as before
    balance: bool = True

    def __post_init__(self):
        away_table(self.away_by_kind)  # a malformed value fails with the other options, before any model loads


@register("uce")
class UCE(Method):
    Config = UCEConfig
    closed_form = True

    def prepare(self):
        hp = self.hp
        if not 0 < hp.energy <= 1 or hp.max_rank < 1 or hp.ridge < 0 or hp.preserve_weight < 0:
            raise PatchforgeError("uce needs 0 < energy <= 1, max_rank >= 1, ridge >= 0 and preserve_weight >= 0")
        if hp.adv_rounds < 0 or hp.adv_keep < 0:
            raise PatchforgeError("uce needs adv_rounds >= 0 and adv_keep >= 0")
        if not 0 <= hp.null_space < 1:
            raise PatchforgeError("uce needs 0 <= null_space < 1 (the share of the kept rows' energy held exactly)")
        self.prefixes = []  # each hardening round's attack (SoftPrefix): fmn trains on them after its warm start
        layers = self.tr.backbone.text_kv()
        if not layers:
            raise PatchforgeError("uce: this model has no text cross-attention key/value projections to edit")
        tr = self.tr
        if not tr.backbone.text_kv_reads_text:
            if hp.adv_rounds > 0 and not self.pooled_layers():
                raise PatchforgeError("uce hardening (adv_rounds) on SD3 / FLUX hardens the pooled projection: keep "
                                      "it in the targets (--targets xattn-kv+pooled) or add --set adv_rounds=0")
            if hp.null_space > 0:
                raise PatchforgeError("uce null_space supports cross-attention models (SD 1.x / 2.x / XL) for now; "
                                      "on SD3 / FLUX leave it at 0")
            self.prepare_joint(layers)
            return
        with torch.no_grad():
            c = tr.embed(self.target, base=True).emb.float().flatten(0, 1)  # (targets * tokens, d)
            a = tr.embed(self.anchor, base=True).emb.float()
            if hp.align:
                a = a.gather(1, _alignment(tr.pipe.tokenizer, self.target, self.anchor, a.shape[1])
                             [..., None].expand(-1, -1, a.shape[2]))
            a = a.flatten(0, 1)
            kept = self.preserve + [""] + (self.anchor if hp.preserve_anchors else [])
            p = tr.embed(list(dict.fromkeys(kept)), base=True).emb.float().flatten(0, 1)
        per_prompt = len(c) // len(self.target)
        away = self.row_away().repeat_interleave(per_prompt)[:, None]  # one per token row
        weight = self.row_weight().repeat_interleave(per_prompt)[:, None]
        refs = self.concept_refs() if hp.adv_rounds > 0 else None  # once: with --images it encodes them
        self.deltas = {}  # the hardening rounds' attacks read the current edit here
        self.deltas = self.solve_hardened(layers, c, a, p, away, weight, refs, attacked=layers)
        self.factor()

    def factor(self) -> None:
        """The SVD of every layer's ΔW, and the LoRA rank that keeps `energy` of each (at most max_rank)."""
        with torch.no_grad():
            self.factors = {n: torch.linalg.svd(d, full_matrices=False) for n, d in self.deltas.items()}
        self.rank = min(self.hp.max_rank, max(_energy_rank(s, self.hp.energy) for _, s, _ in self.factors.values()))

    def solve_hardened(self, layers, c, a, p, away, weight, refs, attacked, pooled: bool = False) -> dict:
        """ΔW of `layers` for these rows (solve_text), then adv_rounds hardening rounds: each attacks the whole
        current edit through the `attacked` layers, adds the prefixed rows (adversarial_rows; `pooled`: their
        pooled embeddings) and solves again."""
        hp = self.hp
        deltas = self.solve_text(layers, c, a, p, away, weight)
        for r in range(hp.adv_rounds):
            self.deltas.update(deltas)  # the attack runs against the whole current edit
            ca, aa, pa = self.adversarial_rows(attacked, refs, r, pooled=pooled)
            c, a, p = torch.cat([c, ca]), torch.cat([a, aa]), torch.cat([p, pa * hp.adv_keep ** 0.5])
            away = torch.cat([away, torch.full((len(ca), 1), hp.away)])
            weight = torch.cat([weight, torch.ones(len(ca), 1)])
            deltas = self.solve_text(layers, c, a, p, away, weight)
        return deltas

    def concept_of(self) -> list[int]:
        """The listed concept (index into specs) each target prompt belongs to: the first that names it."""
        owner = {}
        for i, spec in enumerate(self.specs):
            for t in spec.target:
                owner.setdefault(t, i)
        return [owner.get(t, 0) for t in self.target]

    def row_away(self) -> torch.Tensor:
        """The push past the anchor for each target prompt: its concept's kind's (away_by_kind), else away."""
        by_kind = away_table(self.hp.away_by_kind)
        return torch.tensor([by_kind.get(self.specs[i].kind, self.hp.away) for i in self.concept_of()])

    def row_weight(self) -> torch.Tensor:
        """Each target prompt's weight: 1, or with `balance` 1 / its concept's prompt count, rescaled so the
        rows' mean weight stays 1 (the preserve weight keeps its meaning)."""
        owner = torch.tensor(self.concept_of())
        if not self.hp.balance:
            return torch.ones(len(owner))
        w = 1.0 / torch.bincount(owner)[owner].float()
        return w / w.mean()

    def solve_text(self, layers, c: torch.Tensor, a: torch.Tensor, p: torch.Tensor, away: torch.Tensor,
                   weight: torch.Tensor) -> dict:
        """ΔW of every layer for erased tokens c (their anchors a, row by row, each pushed `away` past its
        anchor and weighted by `weight`) and preserve tokens p."""
        hp, out = self.hp, {}
        with torch.no_grad():
            if hp.null_space > 0:  # the solution's rows then lie in the projector's range: ΔW = ΔW P
                proj = _null_projector(p, hp.null_space)
                c_in = c @ proj
                p = p @ proj
            else:
                c_in = c
            cov = hp.erase_weight * (c_in * weight).T @ c_in + hp.preserve_weight * p.T @ p
            cov += hp.ridge * cov.diagonal().mean() * torch.eye(len(cov), device=cov.device)
            for name, module in layers:
                w0 = getattr(module, "base_layer", module).weight.float()
                goal = a @ w0.T - away * (c @ w0.T - a @ w0.T)  # (tokens, out): v*_e
                rhs = hp.erase_weight * ((goal - c @ w0.T) * weight).T @ c_in  # (out, d)
                out[name] = torch.linalg.solve(cov, rhs.T).T  # rhs cov⁻¹ (cov is symmetric)
        return out

    def adversarial_rows(self, layers, refs: torch.Tensor, round_: int, pooled: bool = False):
        """One hardening round: UnlearnDiffAtk's per-prompt prefix, optimised against the model edited by
        the current ΔW (forward hooks; the weights are not touched) to denoise the concept's reference
        images, gives erased rows "<prefix> target" (anchored on the plain anchor prompt's tokens, position
        by position, as the plain rows are) and kept rows "<prefix> preserve prompt": the neighbours are
        held inside the region the attack reaches, not only on their plain prompts. `pooled`: the same rows'
        pooled embeddings (one per prompt) instead of their tokens."""
        from ..pipeline.soft_tokens import unlearndiff_attack

        hp, tr = self.hp, self.tr
        n = min(hp.adv_prompts, len(self.target), len(refs), self.batch)  # a training step's rows at most
        prompts, anchors = self.target[:n], self.anchor[:n]
        with _edited(layers, self.deltas):
            soft = unlearndiff_attack(tr.pipe, prompts, refs[:n], steps=hp.adv_steps, n_tokens=hp.adv_tokens,
                                      lr=hp.adv_lr, seed=tr.cfg.seed + 1 + round_)
        self.prefixes.append(soft)
        kept = list(dict.fromkeys(self.preserve + [""]))
        sets = [j % n for j in range(len(kept))]
        # each attacked prompt's neighbour twin ("a star" -> "a cross") under that prompt's own prefix
        twins = [(i, c) for i, c in enumerate(self.contrast_prompts[:n]) if c]
        kept, sets = kept + [c for _, c in twins], sets + [i for i, _ in twins]
        with torch.no_grad():
            if pooled:
                return (soft.encode(prompts).pooled.float(), tr.embed(anchors, base=True).pooled.float(),
                        soft.encode(kept, sets).pooled.float())
            ca = soft.encode(prompts).emb.float().flatten(0, 1)
            aa = _shifted(tr.embed(anchors, base=True).emb.float(), soft.offsets[0], hp.adv_tokens).flatten(0, 1)
            pa = soft.encode(kept, sets).emb.float().flatten(0, 1)
        return ca, aa, pa

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
        self.deltas = {}
        with torch.no_grad():
            for name, module in layers:
                s_cc, s_ac, _ = erased[name]
                cov = hp.erase_weight * s_cc + hp.preserve_weight * kept[name][0]
                cov += hp.ridge * cov.diagonal().mean() * torch.eye(len(cov), device=cov.device)
                w0 = getattr(module, "base_layer", module).weight.float()
                rhs = hp.erase_weight * (1 + hp.away) * w0 @ (s_ac - s_cc)  # (out, d)
                self.deltas[name] = torch.linalg.solve(cov, rhs.T).T
        self.deltas.update(self.solve_pooled(refs))
        self.factor()

    def pooled_layers(self) -> list:
        """The layers that read the pooled prompt embedding (SD3 / FLUX) among this run's LoRA targets, matched
        as PEFT matches them: the whole name."""
        pattern = self.tr.backbone.target_pattern(self.hp.denoiser_targets)
        return [(n, m) for n, m in self.tr.backbone.pooled_text_in() if pattern and re.fullmatch(pattern, n)]

    def solve_pooled(self, refs) -> dict:
        """ΔW of the pooled-embedding layers: the same solve as cross-attention's, one row per prompt, then
        adv_rounds hardening rounds on the pooled rows. The pooled vector carries the whole prompt, and the
        DiT toy draws the object from it alone: with a star's tokens and a circle prompt's pooled vector it
        draws no star, with a circle's tokens and a star's pooled vector a star every time. An edit of the
        joint attention's K/V alone left the star in 94 % of images; and UnlearnDiffAtk's prefix brings the
        star back through the pooled vector alone (its pooled vector with the plain tokens: every image)."""
        layers, tr, hp = self.pooled_layers(), self.tr, self.hp
        if not layers:
            return {}
        with torch.no_grad():
            c = tr.embed(self.target, base=True).pooled.float()
            a = tr.embed(self.anchor, base=True).pooled.float()
            kept = self.preserve + [""] + (self.anchor if hp.preserve_anchors else [])
            p = tr.embed(list(dict.fromkeys(kept)), base=True).pooled.float()
        return self.solve_hardened(layers, c, a, p, self.row_away()[:, None], self.row_weight()[:, None], refs,
                                   attacked=list(tr.backbone.text_kv()) + layers, pooled=True)

    @classmethod
    def hardening(cls, hp, batch: int) -> tuple[int, int]:
        return hp.adv_rounds * hp.adv_steps, min(hp.adv_prompts, batch)

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


def _null_projector(p: torch.Tensor, share: float) -> torch.Tensor:
    """I - U Uᵀ, U the fewest eigenvectors of the kept rows' covariance pᵀp that hold `share` of its trace."""
    vals, vecs = torch.linalg.eigh(p.T @ p)
    vals, vecs = vals.flip(0), vecs.flip(1)  # largest first
    u = vecs[:, :_energy_rank(vals.clamp_min(0).sqrt(), share)]
    return torch.eye(len(vals), dtype=p.dtype, device=p.device) - u @ u.T


def _energy_rank(s: torch.Tensor, energy: float) -> int:
    """Smallest k with Σ_{i<k} s_i² >= energy · Σ s_i² (at least 1)."""
    share = (s ** 2).cumsum(0) / max(float((s ** 2).sum()), 1e-30)
    return min(len(s), int((share < energy - 1e-12).sum()) + 1)


@contextmanager
def _edited(layers, deltas: dict):
    """The layers act as W0 + ΔW while inside (forward hooks add ΔW x; no weight is written)."""
    def hook_for(delta):
        def hook(module, args, output):
            return output + F.linear(args[0].to(delta.dtype), delta).to(output.dtype)
        return hook

    handles = [m.register_forward_hook(hook_for(deltas[n])) for n, m in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def away_table(text: str) -> dict[str, float]:
    """away_by_kind's "kind=number,..." as {kind: number}; anything else is one clear error."""
    out = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        kind, _, value = item.partition("=")
        try:
            out[kind.strip()] = float(value)
        except ValueError:
            raise PatchforgeError(f"uce away_by_kind: {item!r} is not kind=number "
                                  "(e.g. style=0.5,object=0.5; empty for `away` everywhere)") from None
    return out


def _alignment(tokenizer, targets: list[str], anchors: list[str], length: int) -> torch.Tensor:
    """(targets, length) index of the anchor position each target token maps to: equal tokens to their
    counterparts, a replaced span to the replacement's end ("Kiko" -> "a character": to "character", which
    CLIP's causal encoder gives the whole phrase), a removed token to the anchor token before it."""
    ids = [tokenizer(p, padding="max_length", max_length=length, truncation=True).input_ids
           for p in (targets, anchors)]
    out = torch.zeros(len(targets), length, dtype=torch.long)
    for row, (t, a) in enumerate(zip(*ids)):
        for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=t, b=a, autojunk=False).get_opcodes():
            for k in range(i1, i2):  # an insertion (i1 == i2) has no target token to map
                out[row, k] = max(j2 - (i2 - k), j1) if op != "delete" else max(j1 - 1, 0)
    return out


def _shifted(anchor: torch.Tensor, offset: int, k: int) -> torch.Tensor:
    """The anchor's tokens lined up with a prompt that has k prefix tokens at `offset`: the anchor's words
    move k places right (the last k positions, padding, drop off) and the prefix's positions get the token
    before them (CLIP's begin-of-text, whose output carries no prompt), so the prefix maps to nothing."""
    before = anchor[:, offset - 1:offset] if offset > 0 else anchor[:, :1]
    return torch.cat([anchor[:, :offset], before.expand(-1, k, -1), anchor[:, offset:anchor.shape[1] - k]], 1)
