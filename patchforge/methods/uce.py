"""UCE: Unified Concept Editing (Gandikota et al. 2024), closed form, every token.

No training loop. Each layer that reads the text encoders' output (--targets text-in: a UNet's cross-attention
keys and values, the backbone's text_kv(); on SD3 / FLUX the tokens' projection into the transformer's text
stream, token_text_in(), and the pooled embedding's, pooled_text_in(), one row per prompt) is replaced by the
ridge least-squares solution that sends the concept's tokens where the anchor's tokens go and holds every
preserve token where it was:

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
On SD3 / FLUX the rounds run on the rows of the layers that read the prompt itself (the pooled projection,
and with --targets text-in the tokens' projection, context_embedder): the joint attention's K/V read the
transformer's own text stream, which a closed form cannot re-solve against a prefix.
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
    # the layers that read the text encoders' output, which this edits: SD 1.x / 2.x / XL, the cross-attention
    # K/V; SD3 / FLUX, the tokens' projection into the text stream (context_embedder) and the pooled one (where
    # the DiT toy reads the object from). On the DiT toy's list of 8 this left 1 % / 0 % pooled where the
    # joint K/V plus the pooled projection ("xattn-kv+pooled") left 12 % / 5 % and red 67 % (the joint K/V read
    # the transformer's own text stream, which the closed form only approximates); docs/methods.md
    denoiser_targets: str = "text-in"
    # weight of each preserve token against each erased token. 6 with the anchors kept (below): on the toy's
    # lists it took compositional prompts from 75 to 84 % of base at 8 concepts and from 62 to 95 % for every
    # colour but red; 8 left Kiko at 50 % in a list of 4, 4 kept less (docs/methods.md, "Many concepts")
    preserve_weight: float = 6.0
    erase_weight: float = 1.0
    away: float = 1.0  # v* = W0 a - away (W0 c - W0 a): past the anchor, away from the concept
    # the push per kind, "kind=value,..." (kinds not named: `away`; every row but the joint K/V's). Half the
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
    # each target prompt's neighbour twin ("a red star" -> "a red cross") joins the kept rows: on the DiT toy
    # the star's pooled edit turned "a blue pentagon" (kept) into a circle in 3 of 4 images and left no
    # pentagon in "a red pentagon" (4 of 4): one row per prompt, and short prompts' pooled vectors lie close
    hold_twins: bool = False

    def __post_init__(self):
        away_table(self.away_by_kind)  # a malformed value fails with the other options, before any model loads


@dataclass
class Rows:
    """One solve's rows for some layers: erased inputs c, their anchors a, kept inputs p (one row each), each
    erased row's push past its anchor and weight; `pooled`: rows are pooled embeddings, else tokens."""
    layers: list
    c: torch.Tensor
    a: torch.Tensor
    p: torch.Tensor
    away: torch.Tensor
    weight: torch.Tensor
    pooled: bool


@register("uce")
class UCE(Method):
    Config = UCEConfig
    closed_form = True

    def prepare(self):
        hp, tr = self.hp, self.tr
        if not 0 < hp.energy <= 1 or hp.max_rank < 1 or hp.ridge < 0 or hp.preserve_weight < 0:
            raise PatchforgeError("uce needs 0 < energy <= 1, max_rank >= 1, ridge >= 0 and preserve_weight >= 0")
        if hp.adv_rounds < 0 or hp.adv_keep < 0:
            raise PatchforgeError("uce needs adv_rounds >= 0 and adv_keep >= 0")
        if not 0 <= hp.null_space < 1:
            raise PatchforgeError("uce needs 0 <= null_space < 1 (the share of the kept rows' energy held exactly)")
        self.prefixes = []  # each hardening round's attack (SoftPrefix): fmn trains on them after its warm start
        backbone = tr.backbone
        if backbone.text_kv_reads_text:  # UNet cross-attention: the K/V read the prompt's tokens themselves
            tokens_in, joint, pooled = self.targeted(backbone.text_kv()), [], []
            if not tokens_in:
                raise PatchforgeError(f"uce: the targets {hp.denoiser_targets[:40]!r} name no cross-attention "
                                      "key/value projection of this model (give --targets text-in)")
        else:  # SD3 / FLUX: whichever of the tokens' projection, the joint K/V and the pooled projection it targets
            tokens_in, joint, pooled = (self.targeted(backbone.token_text_in()), self.targeted(backbone.text_kv()),
                                        self.targeted(backbone.pooled_text_in()))
            if not (tokens_in or joint or pooled):
                raise PatchforgeError(f"uce: the targets {hp.denoiser_targets[:40]!r} name no layer that reads the "
                                      "prompt (give --targets text-in or xattn-kv+pooled)")
            if hp.adv_rounds > 0 and not (tokens_in or pooled):
                raise PatchforgeError("uce hardening (adv_rounds) on SD3 / FLUX hardens the layers that read the "
                                      "prompt itself: keep them in the targets (--targets text-in or "
                                      "xattn-kv+pooled) or add --set adv_rounds=0")
            if hp.null_space > 0 or hp.align:
                raise PatchforgeError("uce null_space and align support cross-attention models (SD 1.x / 2.x / XL) "
                                      "for now; on SD3 / FLUX leave them off")
        refs = self.concept_refs() if hp.adv_rounds > 0 or joint else None  # once: with --images it encodes them
        self.deltas = {}  # the hardening rounds' attacks read the current edit here
        if joint:
            self.deltas.update(self.solve_joint(joint, refs))
        groups = ([self.token_rows(tokens_in)] if tokens_in else []) + ([self.pooled_rows(pooled)] if pooled else [])
        self.deltas.update(self.solve_hardened(groups, refs))
        self.factor()

    def targeted(self, layers) -> list:
        """The layers among this run's LoRA targets, matched as PEFT matches them: the whole name."""
        pattern = self.tr.backbone.target_pattern(self.hp.denoiser_targets)
        return [(n, m) for n, m in layers if pattern and re.fullmatch(pattern, n)]

    def token_rows(self, layers) -> "Rows":
        """One row per token position of every target prompt (c), its anchor's token at that position (a,
        or the aligned one) and every kept prompt's tokens (p)."""
        hp, tr = self.hp, self.tr
        with torch.no_grad():
            c = tr.embed(self.target, base=True).emb.float()
            a = tr.embed(self.anchor, base=True).emb.float()
            if hp.align:
                a = a.gather(1, _alignment(tr.pipe.tokenizer, self.target, self.anchor, a.shape[1])
                             [..., None].expand(-1, -1, a.shape[2]))
            p = tr.embed(self.kept_prompts(), base=True).emb.float()
        per_prompt = c.shape[1]
        return Rows(layers, c.flatten(0, 1), a.flatten(0, 1), p.flatten(0, 1),
                    self.row_away().repeat_interleave(per_prompt)[:, None],
                    self.row_weight().repeat_interleave(per_prompt)[:, None], pooled=False)

    def pooled_rows(self, layers) -> "Rows":
        """The same rows for the pooled-embedding layers: one per prompt. The pooled vector carries the whole
        prompt, and the DiT toy draws the object from it alone: with a star's tokens and a circle prompt's
        pooled vector it draws no star, with a circle's tokens and a star's pooled vector a star every time.
        An edit of the joint attention's K/V alone left the star in 94 % of images; and UnlearnDiffAtk's
        prefix brings the star back through the pooled vector alone (its pooled vector with the plain
        tokens: every image)."""
        tr = self.tr
        with torch.no_grad():
            c = tr.embed(self.target, base=True).pooled.float()
            a = tr.embed(self.anchor, base=True).pooled.float()
            p = tr.embed(self.kept_prompts(), base=True).pooled.float()
        return Rows(layers, c, a, p, self.row_away()[:, None], self.row_weight()[:, None], pooled=True)

    def kept_prompts(self) -> list[str]:
        """The preserve prompts, the empty prompt (classifier-free guidance's other half), with preserve_anchors
        the anchors, with hold_twins each target prompt's neighbour twin."""
        twins = [c for c in self.contrast_prompts if c] if self.hp.hold_twins else []
        return list(dict.fromkeys(self.preserve + [""] + (self.anchor if self.hp.preserve_anchors else []) + twins))

    def factor(self) -> None:
        """The SVD of every layer's ΔW, and the LoRA rank that keeps `energy` of each (at most max_rank)."""
        with torch.no_grad():
            self.factors = {n: torch.linalg.svd(d, full_matrices=False) for n, d in self.deltas.items()}
        self.rank = min(self.hp.max_rank, max(_energy_rank(s, self.hp.energy) for _, s, _ in self.factors.values()))

    def solve_hardened(self, groups: list["Rows"], refs) -> dict:
        """ΔW of every group's layers for its rows (solve_text), then adv_rounds hardening rounds: each
        attacks the whole current edit once, adds the prefixed rows to every group (adversarial_rows) and
        solves again."""
        hp = self.hp
        deltas = {}
        for g in groups:
            deltas.update(self.solve_text(g.layers, g.c, g.a, g.p, g.away, g.weight))
        for r in range(hp.adv_rounds):
            self.deltas.update(deltas)  # the attack runs against the whole current edit
            soft, n = self.attack(refs, r)
            rows = self.adversarial_rows(soft, n, pooled=any(g.pooled for g in groups),
                                         tokens=any(not g.pooled for g in groups))
            for g in groups:
                ca, aa, pa = rows[g.pooled]
                g.c, g.a, g.p = torch.cat([g.c, ca]), torch.cat([g.a, aa]), torch.cat([g.p, pa * hp.adv_keep ** 0.5])
                g.away = torch.cat([g.away, torch.full((len(ca), 1), hp.away)])
                g.weight = torch.cat([g.weight, torch.ones(len(ca), 1)])
                deltas.update(self.solve_text(g.layers, g.c, g.a, g.p, g.away, g.weight))
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

    def attack(self, refs: torch.Tensor, round_: int):
        """One hardening round's adversary: UnlearnDiffAtk's per-prompt prefix, optimised against the model
        edited by the current ΔW (forward hooks; the weights are not touched) to denoise the concept's
        reference images -> (the SoftPrefix, how many target prompts it attacked)."""
        from ..pipeline.soft_tokens import unlearndiff_attack

        hp, tr = self.hp, self.tr
        n = min(hp.adv_prompts, len(self.target), len(refs), self.batch)  # a training step's rows at most
        modules = dict(tr.denoiser.named_modules())
        with _edited([(name, modules[name]) for name in self.deltas], self.deltas):
            soft = unlearndiff_attack(tr.pipe, self.target[:n], refs[:n], steps=hp.adv_steps,
                                      n_tokens=hp.adv_tokens, lr=hp.adv_lr, seed=tr.cfg.seed + 1 + round_)
        self.prefixes.append(soft)
        return soft, n

    def adversarial_rows(self, soft, n: int, pooled: bool, tokens: bool) -> dict:
        """The rows one attack adds: erased rows "<prefix> target" (anchored on the plain anchor prompt's
        tokens, position by position, as the plain rows are) and kept rows "<prefix> preserve prompt": the
        neighbours are held inside the region the attack reaches, not only on their plain prompts.
        -> {False: the token rows (if `tokens`), True: the same rows' pooled embeddings, one per prompt (if
        `pooled`)}, from one encoding of the prefixed prompts."""
        tr = self.tr
        prompts, anchors = self.target[:n], self.anchor[:n]
        kept = list(dict.fromkeys(self.preserve + [""]))
        sets = [j % n for j in range(len(kept))]
        # each attacked prompt's neighbour twin ("a star" -> "a cross") under that prompt's own prefix
        twins = [(i, c) for i, c in enumerate(self.contrast_prompts[:n]) if c]
        kept, sets = kept + [c for _, c in twins], sets + [i for i, _ in twins]
        out = {}
        with torch.no_grad():
            attacked, held, anchor = soft.encode(prompts), soft.encode(kept, sets), tr.embed(anchors, base=True)
            if pooled:
                out[True] = (attacked.pooled.float(), anchor.pooled.float(), held.pooled.float())
            if tokens:
                aligned = _prefix_aligned(anchor.emb.float(), soft, tr.backbone.token_parts())
                out[False] = (attacked.emb.float().flatten(0, 1), aligned.flatten(0, 1),
                              held.emb.float().flatten(0, 1))
        return out

    def solve_joint(self, layers, refs) -> dict:
        """Joint attention (SD3, FLUX): add_k/add_v read the transformer's text stream, which depends on the
        block, the timestep and the image, so c_e, a_e and c_p are each layer's actual inputs, captured from
        the frozen base on the concept's reference latents noised at seeded random timesteps, a_e on the
        same x_t and t as c_e (methods.text_kv_moments). Only their sums enter the solution:

            ΔW = (1 + away) W0 (S_ac − S_cc) · (C_e + preserve_weight C_p + λ I)⁻¹

        An edit in one block also changes the text stream the next block reads; the capture sees the base's."""
        from . import text_kv_moments

        hp, tr = self.hp, self.tr
        erased = text_kv_moments(tr, self.target, refs, paired=self.anchor, seed=tr.cfg.seed)
        kept = text_kv_moments(tr, list(dict.fromkeys(self.preserve + [""])), refs, seed=tr.cfg.seed)
        out = {}
        with torch.no_grad():
            for name, module in layers:
                s_cc, s_ac, _ = erased[name]
                cov = hp.erase_weight * s_cc + hp.preserve_weight * kept[name][0]
                cov += hp.ridge * cov.diagonal().mean() * torch.eye(len(cov), device=cov.device)
                w0 = getattr(module, "base_layer", module).weight.float()
                rhs = hp.erase_weight * (1 + hp.away) * w0 @ (s_ac - s_cc)  # (out, d)
                out[name] = torch.linalg.solve(cov, rhs.T).T
        return out

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


def _prefix_aligned(anchor: torch.Tensor, soft, parts) -> torch.Tensor:
    """The anchor's tokens lined up with prompts that went through `soft`'s prefix, part by part of the token
    sequence (backbone.token_parts(): SD3 joins a CLIP part, where the prefix follows begin-of-text, and a T5
    part, where it comes first); a part whose encoder the prefix did not enter (SD3 without T5: zeros) as is."""
    offsets = {id(tok): off for (tok, _), off in zip(soft.backbone.prompt_encoders(), soft.offsets)}
    out, start = [], 0
    for tok, length in parts:
        part = anchor[:, start:None if length is None else start + length]
        out.append(_shifted(part, offsets[id(tok)], soft.k) if id(tok) in offsets else part)
        start += part.shape[1]
    return torch.cat(out, 1)


def _shifted(anchor: torch.Tensor, offset: int, k: int) -> torch.Tensor:
    """The anchor's tokens lined up with a prompt that has k prefix tokens at `offset`: the anchor's words
    move k places right (the last k positions, padding, drop off) and the prefix's positions get the token
    before them (CLIP's begin-of-text, whose output carries no prompt), so the prefix maps to nothing."""
    before = anchor[:, offset - 1:offset] if offset > 0 else anchor[:, :1]
    return torch.cat([anchor[:, :offset], before.expand(-1, k, -1), anchor[:, offset:anchor.shape[1] - k]], 1)
