"""Erasure methods: each a small module supplying its loss and the data it needs, registered by name.

Like peft's tuners: a method is a Config dataclass (its hyperparameters and defaults) plus a class
with four hooks the shared loop (patchforge/train/loop.py) calls:

    prepare()   on the frozen base, before the LoRA exists: reference latents, embeddings, Fisher
    start()     after LoRA injection (e.g. install attention hooks)
    loss(step)  -> (scalar loss, {name: value} to show in the progress bar)
    finish()    undo what start() did

A closed-form method (closed_form = True, e.g. uce) has no loss: after prepare() it names the LoRA
rank it needs (lora_rank()), and the loop calls solve(scale) once, which writes the LoRA weights and
returns what to report, instead of running steps.

Methods never own a loop, never save files and never look at a judge.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.lora import ADAPTER, has_adapter
from ..core.registry import import_modules, registrar
from ..errors import PatchforgeError

METHODS: dict[str, type] = {}


register = registrar(__name__, "METHODS")


def _discover() -> None:
    import_modules(__name__)


def get_method(name: str) -> type:
    if name not in METHODS:
        _discover()
    if name not in METHODS:
        import difflib
        close = difflib.get_close_matches(name, list(METHODS), n=2)
        raise PatchforgeError(f"unknown method '{name}' (methods: {', '.join(available())})"
                              + (f"; did you mean {', '.join(close)}?" if close else ""))
    return METHODS[name]


def available() -> list[str]:
    _discover()
    return sorted(METHODS)


def cycle(items: list, n: int) -> list:
    """items repeated to length n: the prompt behind reference i is cycle(prompts, n)[i]."""
    return [items[i % len(items)] for i in range(n)]


@dataclass
class MethodConfig:
    steps: int = 100
    lr: float = 1e-3
    denoiser_targets: str = "xattn"  # a backbone TARGETS key or a peft regex; "none" for text-encoder-only
    text_encoder: bool = False
    n_refs: int = 16  # reference latents for the concept (one per target prompt, cycled)
    preserve_weight: float = 1.0
    # defaults that differ where the denoiser's text meets the image in joint attention (SD3, FLUX), for
    # the fields the user left unset (train.loop.family_config); a method tuned there says why
    JOINT_ATTENTION: ClassVar[dict] = {}
    # the same under --fast (empty: JOINT_ATTENTION applies there too)
    JOINT_FAST: ClassVar[dict] = {}
    # defaults that differ under adversarial training (`--robust`), for the fields the user left unset
    ROBUST: ClassVar[dict] = {}
    # defaults that differ under `--fast` (the cheapest setting the method has)
    FAST: ClassVar[dict] = {}


class Method:
    Config = MethodConfig
    name = "?"
    closed_form = False  # True: lora_rank() and solve() replace the training steps

    def __init__(self, hp, trainer, specs, prompts: dict):
        self.hp, self.tr, self.specs = hp, trainer, specs
        self.target, self.anchor = prompts["target"], prompts["anchor"]
        self.preserve, self.words = prompts["preserve"], prompts["words"]
        self.contrast_prompts = prompts.get("contrast") or [None] * len(self.target)  # aligned with target
        self.batch = trainer.cfg.batch

    def prepare(self) -> None:
        pass

    def start(self) -> None:
        pass

    def finish(self) -> None:
        pass

    def loss(self, step: int):
        raise NotImplementedError

    @classmethod
    def denoiser_rows(cls, hp, batch: int) -> tuple[int, int]:
        """Denoiser rows one step runs (with gradients, without): what the plan's memory estimate and
        cost line count. A method whose loss() calls the denoiser differently says so here."""
        return 2 * batch, 2 * batch

    @classmethod
    def hardening(cls, hp, batch: int) -> tuple[int, int]:
        """(attack steps, denoiser rows with gradients in each) the method runs before training to harden
        its edit (uce's adv_rounds): the plan line counts them."""
        return 0, 0

    def lora_rank(self) -> int | None:
        """A closed-form method's LoRA rank, known after prepare(); None: the loop's --rank."""
        return None

    def solve(self, scale: float) -> dict:
        """Closed form: write the LoRA weights (B·A·scale is the edit) and return what to report."""
        raise NotImplementedError

    # ---- shared pieces
    def concept_refs(self) -> torch.Tensor:
        """Reference images of the concept as clean latents: the user's (`--images`), else the base
        model's own generations of the target prompts."""
        if self.tr.cfg.images:
            return self.tr.encode_images(self.tr.cfg.images)
        prompts = cycle(self.target, self.hp.n_refs)
        return self.tr.reference_latents(prompts, "+".join(s.key for s in self.specs))

    def load_concept_rows(self) -> None:
        """self.refs (concept_refs()) and, aligned with them, the target prompt (self.prompts) and the
        anchor (self.anchors) behind each reference."""
        self.refs = self.concept_refs()
        self.prompts = cycle(self.target, len(self.refs))
        self.anchors = cycle(self.anchor, len(self.refs))

    def preserve_refs(self) -> torch.Tensor:
        """Base-model latents of the preserve prompts (generative replay), one per prompt."""
        return self.tr.reference_latents(self.preserve, "preserve-" + "+".join(s.key for s in self.specs))

    def preserve_batch(self, refs: torch.Tensor, n: int | None = None, paired: bool = False):
        """n preserve rows: (x_t, t, noise, cond, x0). x_t may come from any clean latents -- the
        frozen base is the teacher at whatever point it is asked -- so by default methods reuse the
        concept's references and save generating images of every preserve prompt. paired=True:
        refs[i] is the base's own image of preserve prompt i (preserve_refs()), used with its prompt."""
        x_t, t, noise, prompts, x0 = self.preserve_rows(refs, n, paired)
        return x_t, t, noise, self.tr.embed(prompts, role="preserve"), x0

    def preserve_rows(self, refs: torch.Tensor, n: int | None = None, paired: bool = False):
        """preserve_batch's rows with their prompts instead of their embeddings: (x_t, t, noise, prompts, x0)."""
        n = n or self.batch
        idx = self.tr.pick(self.preserve, n)
        x0 = refs[idx] if paired else refs[[self.tr.rng.randrange(len(refs)) for _ in idx]]
        x_t, t, noise = self.tr.noised(x0)
        return x_t, t, noise, [self.preserve[i] for i in idx], x0


class ProjectionKeeper:
    """UCE/MACE's preservation, for a LoRA: the keys and values that cross-attention makes of the
    preserve prompts' tokens should not move. With H the (frozen) token embeddings of those prompts,
    every position the denoiser attends to, and C = H^T H / N, each text-attention K/V LoRA pays

        || dW h ||^2 averaged over h in H  =  tr(dW C dW^T),   dW = B A scale,

    relative to the same quantity for the frozen W (so one weight suits any model width). It needs
    no denoiser call, so it covers every preserve prompt at every step -- the sampled preserve rows only
    see a few. What it cannot see: to_q / to_out, which act on image features.

    In joint attention (SD3, FLUX) the text K/V read the transformer's own text stream, not the
    encoder's output: H is then each layer's actual input, captured from the frozen base on noised
    `latents` (text_kv_moments), and every layer has its own C."""

    def __init__(self, layers: list, cov: torch.Tensor | None = None, covs: list | None = None):
        # layers: (peft LoRA layer, tr(W C W^T)); C shared by all (cov) or one per layer (covs)
        self.layers, self.covs = layers, covs if covs is not None else [cov] * len(layers)

    @classmethod
    def build(cls, trainer, prompts: list[str], latents: torch.Tensor | None = None) -> "ProjectionKeeper | None":
        """Call after the LoRA exists (a method's start()); None when no K/V projection carries one.
        `latents`: clean latents to noise when the K/V inputs must be captured (joint attention)."""
        if not trainer.backbone.text_kv_reads_text:
            moments = text_kv_moments(trainer, prompts, latents)
            layers, covs = [], []
            for name, m in trainer.backbone.text_kv():
                if has_adapter(m):
                    s_cc, _, count = moments[name]
                    cov, w = s_cc / count, m.base_layer.weight.float()
                    layers.append((m, ((w @ cov) * w).sum()))
                    covs.append(cov)
            return cls(layers, covs=covs) if layers else None
        with torch.no_grad():
            h = trainer.embed(prompts, base=True).emb.float().flatten(0, 1)  # (prompts * tokens, dim)
            cov = h.T @ h / len(h)
            layers = []
            for _, m in trainer.backbone.text_kv():
                if has_adapter(m):
                    w = m.base_layer.weight.float()
                    layers.append((m, ((w @ cov) * w).sum()))
        return cls(layers, cov) if layers else None

    def penalty(self) -> torch.Tensor:
        total = 0.0
        for (m, ref), cov in zip(self.layers, self.covs):
            a, b = m.lora_A[ADAPTER].weight, m.lora_B[ADAPTER].weight
            gram = a @ cov @ a.T  # (r, r)
            total = total + ((b @ gram) * b).sum() * m.scaling[ADAPTER] ** 2 / ref
        return total / len(self.layers)


def text_kv_moments(trainer, prompts: list[str], latents: torch.Tensor, paired: list[str] | None = None,
                    seed: int = 0, chunk: int = 8) -> dict[str, tuple]:
    """What each text K/V projection of a joint-attention transformer reads, from the frozen base:
    `prompts` on `latents` (cycled) noised at seeded random timesteps. Per layer name:
    (S_cc = sum of c c^T over every text token c, S_ac = sum of a c^T with a the same token's input
    under the paired prompt on the same x_t and t (None without `paired`), token count).
    Sums, not the tokens: a real SD3 has 48 such layers of width 1536."""
    if latents is None:
        raise PatchforgeError("this model's text attention is joint attention: its key/value inputs are captured "
                              "on noised latents, and none were given")
    layers = trainer.backbone.text_kv()
    seen: dict[str, torch.Tensor] = {}

    def hook(name):
        def grab(module, args, output):
            seen[name] = args[0].detach().float().flatten(0, 1)
        return grab

    handles = [m.register_forward_hook(hook(n)) for n, m in layers]
    gen = torch.Generator("cpu").manual_seed(seed)
    sums: dict[str, list] = {n: [0.0, None, 0] for n, _ in layers}
    try:
        for i in range(0, len(prompts), chunk):
            rows = list(range(i, min(i + chunk, len(prompts))))
            x_t, t, _ = trainer.backbone.noised(latents[[j % len(latents) for j in rows]], gen)
            trainer.predict(x_t, t, trainer.embed([prompts[j] for j in rows], base=True), base=True)
            c = dict(seen)
            if paired is not None:
                trainer.predict(x_t, t, trainer.embed([paired[j] for j in rows], base=True), base=True)
            for name, _ in layers:
                s = sums[name]
                s[0] = s[0] + c[name].T @ c[name]
                s[2] += len(c[name])
                if paired is not None:
                    s[1] = (0.0 if s[1] is None else s[1]) + seen[name].T @ c[name]
    finally:
        for h in handles:
            h.remove()
    return {n: tuple(s) for n, s in sums.items()}
