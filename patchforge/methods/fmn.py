"""Forget-Me-Not, improved (the default method).

FMN (Zhang et al. 2023) re-steers attention: on noised reference latents of the concept, hook every
text-attention (cross-attention) layer of the denoiser, read the softmax probabilities in the columns
of the concept's tokens, and minimise them, so the image stops attending to those words:

    L_attn = mean over layers, heads, pixels of ( sum_{k in concept tokens} softmax(QK^T/sqrt d)_k )^2

Plain FMN has no preservation term and erases only what flows through the name's own tokens (CLIP
copies the name into every later token, so much of the concept survives). Two terms fix that:

    L_pres = || eps_theta(x_t, c_preserve) - eps*(x_t, c_preserve) ||^2     frozen base = adapter off
    L_map  = || eps_theta(x_t, c_target)   - eps_map               ||^2     concept -> its alternative

c_anchor is the same prompt with the concept replaced by `--to` (or removed: "in stripes style" ->
nothing). Removing the word alone is not enough for objects and colours: "a photo of a" draws *some*
object, the star among them, so a patch mapped there keeps drawing stars at chance rate. The map
target therefore also steers away from the concept, as ESD's negative guidance does:

    eps_map = eps*(x_t, c_anchor) - away * ( eps*(x_t, c_target) - eps*(x_t, c_anchor) )

Two more terms keep the erasure to the concept (both measured on the toy model, docs/training.md):

    L_contrast = || eps_theta(x_t, c_neighbour) - eps*(x_t, c_neighbour) ||^2   on the target rows' x_t
    L_keep     = mean over text-attn to_k / to_v of || dW H ||^2 / || W H ||^2       H: preserve tokens

c_neighbour is the target prompt with a neighbour named instead ("a red star" -> "a orange star"):
held on the very latent being erased, it makes the patch learn what separates the concept from its
neighbour rather than what they share. L_keep is UCE/MACE's preservation written for a LoRA: the keys
and values cross-attention makes of every preserve prompt's tokens stay where they were, all of them at
every step, for the price of a few small matrix products. The LoRA sits on K/V only, where L_keep
holds every change it makes; a LoRA on to_q/to_out acts on image features and reaches every prompt.

    L = attn_weight L_attn + map_weight L_map + preserve_weight (L_pres + L_contrast) + keep_weight L_keep

map_weight = 0 gives attention re-steering alone; away = 0 the plain mapping; keep_weight = 0,
lr 2e-3 and denoiser_targets=xattn the previous default. Contrast rows are off by default: beside L_keep
they changed nothing measurable. Defaults were tuned on the toy model (docs/training.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import PatchforgeError
from ..backbones import Cond
from . import Method, MethodConfig, ProjectionKeeper, cycle, register


INVERT_TEMPLATE = "a photo of"  # the inverted tokens follow it, as in textual inversion


WARM_STARTS = ("uce", "uce-pooled")  # FMNConfig.warm_start's values besides "" (the cold start)


@dataclass
class FMNConfig(MethodConfig):
    # 20 steps from uce's closed-form edit (warm_start) on a pool of 10 teacher batches: on the toy model
    # this erases what 80 cold steps with fresh teachers did, in a sixth of the time (docs/methods.md)
    steps: int = 20
    lr: float = 4e-3
    # LoRA on cross-attention's K/V only: what the text reaches. to_q/to_out act on image features, so
    # a change there reaches every prompt, and the keep term below cannot hold it (docs/training.md)
    denoiser_targets: str = "xattn-kv"
    attn_weight: float = 1.0
    preserve_weight: float = 3.0  # tuned on the toy model, docs/training.md
    map_weight: float = 2.0
    # eta (tuned, docs/training.md): map onto eps*(anchor) - eta * (eps*(target) - eps*(anchor)), away from the concept
    away: float = 1.0
    # preserve rows noised from "concept" images (free) or from the base's "own" images of each preserve
    # prompt (one generation per prompt, cached): the teacher is then asked where those prompts live
    preserve_on: str = "concept"
    # contrast rows: this fraction of the target rows is repeated with the prompt naming a neighbour
    # instead ("a red star" -> "a orange star", concepts.ConceptSpec.contrast), the base's prediction
    # held there on the very same noised latent. The generic preserve rows share no latent with the
    # target, so they cannot tell the concept from what it has in common with its neighbours.
    contrast: float = 0.0  # off: beside keep_weight it changed nothing measurable (docs/training.md)
    # keep: weight of methods.ProjectionKeeper on the preserve (and contrast) prompts -- the K/V that
    # cross-attention makes of their tokens held in place, all of them at every step, no denoiser call
    keep_weight: float = 2.0
    # FMN's concept localisation: textual inversion on the concept's reference images (frozen base) finds
    # K token embeddings <v> for it; "a photo of <v>" then joins the target rows (b/4 extra per step), its
    # <v> columns re-steered and mapped like the name's. 0 = off. SD 1.x / 2.x.
    invert_steps: int = 0
    invert_tokens: int = 2
    # warm start: "uce" sets the LoRA to the rank-r truncation of uce's closed-form edit of the same
    # concepts (methods/uce.py) before the first step, so the steps refine an erasure instead of
    # starting from none; "" = the cold start (B = 0), which needs ~80 steps; "uce-pooled" (SD3 / FLUX, with
    # the pooled projection among the targets): that layer alone starts from uce's edit, the K/V cold
    warm_start: str = "uce"
    # hardening (methods/uce.py adv_*): the warm start's edit is re-solved adv_rounds times against the
    # UnlearnDiffAtk prefixes found on it (adv_steps Adam steps each), the neighbours held under the same
    # prefixes; warm_preserve_weight weighs uce's preserve tokens. On the toy star this took the published
    # attack from 81 % to 3 %, keeping 15 of 16 neighbour images (docs/robustness.md). --fast: adv_rounds=0
    adv_rounds: int = 2
    adv_steps: int = 20
    adv_tokens: int = 5  # prefix length of each round's attack (UnlearnDiffAtk's published 5)
    warm_preserve_weight: float = 8.0
    # SD3 / FLUX with the pooled projection among the targets (xattn-kv+pooled): False keeps that layer at the
    # warm start's closed-form (hardened) edit and trains the K/V alone. On the DiT toy's star the hardened
    # closed form held UnlearnDiffAtk to 0 %; 40 steps after it let 50 % back training the pooled layer too,
    # 12 % holding it (docs/robustness.md)
    train_pooled: bool = False
    # share of each step's target rows prompted through a hardening prefix ("<prefix> a star"), the prefix's
    # columns re-steered and mapped like the name's: without them the 20 steps give back what the hardening
    # won (star: 22 % post-attack instead of 3 %)
    adv_rows: float = 0.5
    # teacher pool: draw this many steps' rows (noised latents, timesteps, preserve rows) and the frozen
    # base's predictions for them once, before the first step, and train on random ones of them; the
    # teacher calls (3 of every step's 5 denoiser rows) then cost once, not every step. 0: fresh each step
    teacher_pool: int = 10
    # joint attention (SD3, FLUX): the text reaches the image through every block's text stream, not one
    # cross-attention read, and 80 steps left the DiT toy's star at 25 % and red at 33 %. 160 steps erase
    # them; keep_weight 3 holds stripes' compositional prompts there (2: 88 %) and still lets red's
    # paraphrases go (4: 29 % left). Measured on the DiT toy, cold and with fresh teachers: patches/README.md
    JOINT_ATTENTION: ClassVar[dict] = {"steps": 160, "keep_weight": 3.0, "warm_start": "", "teacher_pool": 0,
                                       "adv_rounds": 0}
    # --fast on joint attention: 40 steps warm-started from uce with pooled teachers, at a learning rate that
    # trades the star's compositional prompts kept against red's paraphrases left (4e-3: 95 % / 33 %,
    # 6e-3: 90 % / 21 %, 8e-3: 85 % / 17 %). A quarter of the time; red keeps 8 % and the star's replacement is the
    # neutral circle in 60 % instead of 94 %, so it is not the default (patches/README.md). No hardening
    # rounds: uce's prefix attack is not built for joint attention
    JOINT_FAST: ClassVar[dict] = {"steps": 40, "lr": 6e-3, "keep_weight": 3.0, "adv_rounds": 0,
                                  "warm_preserve_weight": 8.0, "adv_rows": 0.0}
    # --robust: the inner attack needs the outer loop's fresh teachers and many steps. On the toy star at the
    # published UnlearnDiffAtk budget, 80 cold steps with fresh teachers held it to 3 % ASR, where the fast
    # schedule (20 warm-started steps, pooled teachers) let 88 % through and 80 warm-started pooled steps
    # 59 % (docs/robustness.md)
    ROBUST: ClassVar[dict] = {"steps": 80, "warm_start": "", "teacher_pool": 0, "adv_rounds": 0}
    # --fast: the previous default, no hardening (6-8 s on the toy; the published attack: 81 % on the star)
    FAST: ClassVar[dict] = {"adv_rounds": 0, "warm_preserve_weight": 1.0, "adv_rows": 0.0}


@register("fmn")
class ForgetMeNot(Method):
    Config = FMNConfig

    def prepare(self):
        self.load_concept_rows()
        self.contrasts = cycle(self.contrast_prompts, len(self.refs))
        self.mask = self.tr.backbone.concept_mask(self.prompts, self.words).to(self.tr.device)
        if self.hp.preserve_on not in ("concept", "own"):
            raise PatchforgeError(f"fmn preserve_on must be 'concept' or 'own', not {self.hp.preserve_on!r}")
        self.pres_refs = self.preserve_refs() if self.hp.preserve_on == "own" and self.hp.preserve_weight > 0 else None
        self.inverted = self.invert_concept() if self.hp.invert_steps > 0 else None

    def invert_concept(self) -> tuple[Cond, torch.Tensor]:
        """(embedding of "a photo of <v>", mask of the <v> positions), <v> learnt on the references."""
        from ..pipeline.soft_tokens import invert_latents

        pipe = self.tr.pipe
        soft = invert_latents(pipe, self.refs, steps=self.hp.invert_steps, n_tokens=self.hp.invert_tokens,
                              seed=self.tr.cfg.seed, template=INVERT_TEMPLATE)
        with torch.no_grad():
            emb = soft.encode(pipe, [INVERT_TEMPLATE]).detach()
        _, positions = soft.token_ids(pipe.tokenizer, [INVERT_TEMPLATE])
        mask = torch.zeros(1, pipe.tokenizer.model_max_length, device=self.tr.device)
        mask[0, positions[0]] = 1.0
        return Cond(emb), mask

    def start(self):
        self.prefixes = []
        if self.hp.warm_start:
            self.warm_start()
        # the base's predictions, made once; never more batches than steps (a 2-step smoke run on a real-sized
        # model would otherwise pay for 10 batches of teachers it never uses)
        steps = self.tr.cfg.steps if self.tr.cfg.steps is not None else self.hp.steps
        self.pool = [self.draw() for _ in range(min(self.hp.teacher_pool, steps))]
        kept = self.preserve + [c for c in dict.fromkeys(self.contrast_prompts) if c]
        self.keeper = ProjectionKeeper.build(self.tr, kept, self.refs) if self.hp.keep_weight > 0 else None
        # record only in the text attention (cross-attention); self-attention keeps its fast processor
        self.recorder, self.saved = self.tr.backbone.attention_recorder(), {}
        for name, module in self.tr.backbone.text_attention():
            self.saved[name] = (module, module.processor)
            module.set_processor(self.recorder)

    def warm_start(self):
        from ..core.lora import ADAPTER, adapters_off, has_adapter
        from .uce import UCE

        if self.hp.warm_start not in WARM_STARTS:
            raise PatchforgeError(f"fmn warm_start must be 'uce', 'uce-pooled' or empty, not {self.hp.warm_start!r}")
        prompts = {"target": self.target, "anchor": self.anchor, "preserve": self.preserve, "words": self.words,
                   "contrast": self.contrast_prompts}
        # n_refs: fmn's own (the plan's reference count), so the hardening reads the references fmn already
        # made from the cache instead of generating uce's default 16 (minutes at SD 1.5 size on a CPU)
        # preserve_anchors, balance and the styles' half push off: fmn's warm start as measured
        # (docs/robustness.md), before uce's defaults changed
        warm = UCE.Config(adv_rounds=self.hp.adv_rounds, adv_steps=self.hp.adv_steps, adv_tokens=self.hp.adv_tokens,
                          n_refs=self.hp.n_refs, preserve_weight=self.hp.warm_preserve_weight,
                          preserve_anchors=False, away_by_kind="", balance=False,
                          denoiser_targets=self.hp.denoiser_targets)  # the run's (resolve_run puts them here)
        uce = UCE(warm, self.tr, self.specs, prompts)
        with adapters_off([self.tr.denoiser]):
            uce.prepare()
        pooled = uce.targeted(self.tr.backbone.pooled_text_in())
        if self.hp.warm_start == "uce-pooled":  # only the pooled projection starts from the edit; the K/V cold
            uce.factors = {n: f for n, f in uce.factors.items() if n in dict(pooled)}
        layers = [m for _, m in self.tr.backbone.text_kv()]
        if not layers or not all(has_adapter(m) for m in layers):
            raise PatchforgeError("fmn warm_start=uce (the default) needs the LoRA on the text K/V projections "
                                  "(--targets xattn-kv or xattn); with other targets add --set warm_start=")
        lora = layers[0]
        uce.rank = lora.lora_A[ADAPTER].weight.shape[0]  # as many of its directions as this LoRA holds
        uce.solve(lora.scaling[ADAPTER])
        self.prefixes = uce.prefixes
        if not self.hp.train_pooled:
            # a zero gradient, so AdamW's step there is exactly zero (requires_grad cannot hold it: PEFT turns it
            # back on whenever the adapters are re-enabled after a frozen-base call)
            for _, module in pooled:
                for weight in (module.lora_A[ADAPTER].weight, module.lora_B[ADAPTER].weight):
                    weight.register_hook(torch.zeros_like)

    def finish(self):
        for module, proc in self.saved.values():
            module.set_processor(proc)

    @classmethod
    def denoiser_rows(cls, hp, batch):
        target = batch + (max(1, batch // 4) if hp.invert_steps > 0 else 0)
        grad = target + (batch + round(hp.contrast * batch) if hp.preserve_weight > 0 else 0)
        base = (target if hp.map_weight > 0 else 0) + (grad - target if hp.preserve_weight > 0 else 0)
        base += target if hp.map_weight > 0 and hp.away > 0 else 0
        return grad, 0 if hp.teacher_pool else base  # a pool's teacher rows are computed once, before step 1

    @classmethod
    def hardening(cls, hp, batch: int) -> tuple[int, int]:
        from .uce import UCEConfig

        on = hp.warm_start in WARM_STARTS and hp.adv_rounds > 0
        return (hp.adv_rounds * hp.adv_steps, min(UCEConfig.adv_prompts, batch)) if on else (0, 0)

    def draw(self) -> Rows:
        """One step's rows (seeded) and the frozen base's predictions for them: what loss() trains on.
        With a teacher pool these are drawn once in start() and reused; the random draws come in the same
        order either way, so teacher_pool=0 trains exactly as before the pool existed."""
        tr, hp, b = self.tr, self.hp, self.batch
        idx = tr.pick(self.prompts, b)
        x_t, t, _ = tr.noised(self.refs[idx])
        prompts, anchors, mask = [self.prompts[i] for i in idx], [self.anchors[i] for i in idx], self.mask[idx]
        toward = tr.embed(prompts, role="target", base=True) if hp.map_weight > 0 and hp.away > 0 else None
        extra = None
        if self.inverted is not None:  # the inverted concept rides along as extra target rows
            inv_cond, inv_mask = self.inverted
            k = max(1, b // 4)
            xi, ti, _ = tr.noised(self.refs[tr.pick(self.prompts, k)])
            x_t, t, anchors = torch.cat([x_t, xi]), torch.cat([t, ti]), anchors + [INVERT_TEMPLATE] * k
            extra, mask = Cond.cat([inv_cond] * k), torch.cat([mask, inv_mask.expand(k, -1)])
            toward = Cond.cat([toward, extra]) if toward is not None else None
        b = len(x_t)  # target rows
        adv = self.prefixed_rows(idx, mask) if self.prefixes and hp.adv_rows > 0 else None
        if adv is not None:
            adv, mask = adv[:2], adv[2]
        xs, ts, kept = [x_t], [t], []
        if hp.preserve_weight > 0:  # preserve rows ride in the same denoiser call (one forward, one backward)
            own = self.pres_refs is not None
            px, pt, _, kept, _ = self.preserve_rows(self.pres_refs if own else self.refs, paired=own)
            pairs = [j for j, i in enumerate(idx) if self.contrasts[i]][: round(hp.contrast * len(idx))]
            if pairs:  # contrast rows: the target rows' own latents, a neighbour named instead
                px, pt = torch.cat([px, x_t[pairs]]), torch.cat([pt, t[pairs]])
                kept = kept + [self.contrasts[idx[j]] for j in pairs]
            xs, ts = xs + [px], ts + [pt]
        x_all, t_all = torch.cat(xs), torch.cat(ts)
        # teachers: base on the anchor prompts (target rows) and on the preserve prompts (preserve rows)
        teach = [tr.embed(anchors, role="anchor", base=True)] if hp.map_weight > 0 else []
        teach += [tr.embed(kept, role="preserve", base=True)] if kept else []
        teacher = None
        if teach:
            rows = slice(0 if hp.map_weight > 0 else b, None)
            with torch.no_grad():
                teacher = tr.predict(x_all[rows], t_all[rows], Cond.cat(teach), base=True)
                if toward is not None:  # the base's own prediction for the concept, to steer away from
                    teacher[:b] = teacher[:b] - hp.away * (tr.predict(x_t, t, toward, base=True) - teacher[:b])
        return Rows(prompts, extra, x_all, t_all, mask, b, kept, teacher, adv)

    def prefixed_rows(self, idx: list[int], mask: torch.Tensor):
        """(rows, their embeddings, the target rows' masks): the first adv_rows share of this step's target
        rows prompted "<prefix> prompt" through a hardening round's prefix (seeded pick), the prompt's concept
        columns moved right by the prefix length and the prefix's own columns added."""
        tr = self.tr
        rows = list(range(round(self.hp.adv_rows * len(idx))))
        if not rows:
            return None
        soft = self.prefixes[tr.rng.randrange(len(self.prefixes))]
        sets = [tr.rng.randrange(soft.n_sets) for _ in rows]
        with torch.no_grad():
            cond = soft.encode([self.prompts[idx[j]] for j in rows], sets)
        mask = mask.clone()
        k, at = soft.k, soft.offsets[0]
        mask[rows] = torch.roll(mask[rows], k, dims=1)
        mask[rows, at:at + k] = 1.0
        return rows, cond, mask

    def loss(self, step):
        tr, hp = self.tr, self.hp
        self.recorder.mask = None  # no recording in whatever the robust hook runs while embedding
        r = self.pool[tr.rng.randrange(len(self.pool))] if self.pool else self.draw()
        b = r.targets
        cond = tr.embed(r.prompts, role="target")  # every step: a text-encoder LoRA or --robust changes it
        if r.adv is not None:  # the prefixed rows
            rows, adv = r.adv[0], r.adv[1]
            emb = cond.emb.clone()
            emb[rows] = adv.emb.to(emb.dtype)
            pooled = None if cond.pooled is None else cond.pooled.clone()
            if pooled is not None:
                pooled[rows] = adv.pooled.to(pooled.dtype)
            cond = Cond(emb, pooled)
        cond = Cond.cat([cond, r.extra]) if r.extra is not None else cond
        # embedded every step, as the target rows are: a pooled step's rows are reused, and a text-encoder
        # LoRA must see its own current output (cached when the text encoder is frozen)
        c_all = Cond.cat([cond, tr.embed(r.kept, role="preserve")]) if r.kept else cond
        masks = torch.zeros(len(c_all), self.mask.shape[1], device=self.mask.device)
        masks[:b] = r.mask  # preserve rows record nothing
        self.recorder.mask, self.recorder.mass = masks, []
        pred = tr.predict(r.x, r.t, c_all)
        # the mask stays set until the next step: gradient checkpointing re-runs these forwards during
        # backward and must see the same operations (the recorder skips forwards without gradients)
        heads_rows = [m[: b * (m.shape[0] // len(c_all))] for m in self.recorder.mass]  # target rows only
        l_attn = torch.stack([m.pow(2).mean() for m in heads_rows]).mean()
        loss, logs = hp.attn_weight * l_attn, {"attn": l_attn}
        if self.keeper is not None:
            l_keep = self.keeper.penalty()
            loss, logs["keep"] = loss + hp.keep_weight * l_keep, l_keep
        if hp.map_weight > 0:
            l_map = F.mse_loss(pred[:b], r.teacher[:b])
            loss, logs["map"] = loss + hp.map_weight * l_map, l_map
        if hp.preserve_weight > 0:
            err = (pred[b:] - r.teacher[-(len(pred) - b):]).pow(2).flatten(1).mean(1)  # per row
            n = self.batch  # preserve rows, then contrast rows
            l_pres = err[:n].mean()
            loss, logs["pres"] = loss + hp.preserve_weight * l_pres, l_pres
            if len(err) > n:  # contrast rows: a term of their own, not a dilution of the preserve rows
                l_con = err[n:].mean()
                loss, logs["contrast"] = loss + hp.preserve_weight * l_con, l_con
        return loss, logs


@dataclass
class Rows:
    """One step's batch: target rows (their prompts, embedded at each step; extra: inverted-token rows),
    then preserve (and contrast) rows, and the frozen base's prediction for every row that has a teacher."""
    prompts: list[str]
    extra: Cond | None
    x: torch.Tensor
    t: torch.Tensor
    mask: torch.Tensor  # the target rows' concept columns
    targets: int  # number of target rows (name rows + inverted rows)
    kept: list[str]  # the preserve (and contrast) rows' prompts
    teacher: torch.Tensor | None
    adv: tuple | None = None  # (target rows prompted through a hardening prefix, their Cond)
