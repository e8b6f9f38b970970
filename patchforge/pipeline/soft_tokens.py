"""Soft tokens: K continuous token embeddings spliced into a prompt, and textual inversion.

Shared by the attacks (soft-prompt attack, concept inversion, the per-prompt UnlearnDiffAtk prefix),
robust training and fmn's optional inversion step, so it imports nothing of either side.

    SoftPrompt   a suffix after the prompt's words, SD 1.x / 2.x pipelines (one CLIP text encoder)
    SoftPrefix   a prefix before the words, in every text encoder the prompt goes through (CLIP, CLIP-G,
                 T5), so it serves every family through the backbone's own prompt encoding
    soft_cond    a prompt's Cond through either kind
    learnable_tokens   either kind with an optimiser over it (inversion, robust training)
    invert_latents   textual inversion, as a suffix or as a prefix
    unlearndiff_attack   UnlearnDiffAtk's per-prompt prefix (the attack, and uce's hardening rounds)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backbones import for_pipe
from ..backbones import Cond
from ..errors import PatchforgeError


def suffix_unsupported(pipe) -> str | None:
    """Why a soft *suffix* (SoftPrompt) cannot run on this pipeline (one line), or None where it can. Where
    it cannot (several text encoders), SoftPrefix serves: inversion and robust training switch to it."""
    if getattr(pipe, "text_encoder_2", None) is None:
        return None
    family = "SDXL" if for_pipe(pipe).text_kv_reads_text else for_pipe(pipe).family_name()
    return ("a soft token suffix (the soft-prompt attack, fmn invert_steps) supports SD 1.x / 2.x "
            f"pipelines, not {family} yet")


def _init_vectors(table: torch.Tensor, token: int, shape: tuple, g: torch.Generator) -> tuple[torch.Tensor, float]:
    """Soft vectors started at a real token's embedding plus a little noise (10 % of the table's spread,
    so that vectors of one prompt differ), and that spread: the natural step size of the embedding space."""
    init = table[token].detach().float().cpu()
    scale = float(table.detach().float().std())
    return (init + scale * 0.1 * torch.randn(*shape, init.shape[0], generator=g)).to(table.device), scale


class SoftPrompt(torch.nn.Module):
    """K continuous token embeddings appended after a prompt's words (before end-of-text)."""

    def __init__(self, pipe, n_tokens: int, init_word: str = "a", seed: int = 0):
        super().__init__()
        why = suffix_unsupported(pipe)  # SDXL, SD3 and FLUX: more than one text encoder
        if why:
            raise PatchforgeError(why)
        table = pipe.text_encoder.get_input_embeddings().weight
        self.placeholder = pipe.tokenizer(init_word, add_special_tokens=False).input_ids[0]
        vectors, self.scale = _init_vectors(table, self.placeholder, (n_tokens,), torch.Generator().manual_seed(seed))
        self.vectors = torch.nn.Parameter(vectors)

    def token_ids(self, tokenizer, prompts: list[str]):
        """(ids (N, L) with the K placeholder ids before end-of-text, positions (N, K) of those ids)."""
        k, length = len(self.vectors), tokenizer.model_max_length
        rows, positions = [], []
        for p in prompts:
            ids = tokenizer(p, truncation=True, max_length=length - k).input_ids  # BOS ... EOS
            start = len(ids) - 1
            ids = ids[:-1] + [self.placeholder] * k + ids[-1:]
            rows.append(ids + [tokenizer.pad_token_id] * (length - len(ids)))
            positions.append(list(range(start, start + k)))
        return torch.tensor(rows), torch.tensor(positions)

    def encode(self, pipe, prompts: list[str]) -> torch.Tensor:
        """Prompt embeddings (N, L, D) with the soft tokens in; differentiable w.r.t. the vectors."""
        te = pipe.text_encoder
        ids, pos = self.token_ids(pipe.tokenizer, prompts)
        rows = torch.arange(len(prompts))[:, None].expand_as(pos)

        def hook(module, inputs, output):
            output = output.clone()
            output[rows, pos] = self.vectors.to(output.dtype)[None].expand(len(prompts), -1, -1)
            return output

        handle = te.get_input_embeddings().register_forward_hook(hook)
        try:
            emb = te(ids.to(te.device))[0]
        finally:
            handle.remove()
        return emb.to(for_pipe(pipe).dtype)


class SoftPrefix(torch.nn.Module):
    """K continuous token embeddings put before a prompt's words, in each text encoder the pipeline's prompt
    goes through (backbone.prompt_encoders(): CLIP; CLIP-L + CLIP-G (+ T5) for SDXL / SD3; CLIP + T5 for
    FLUX). A prefix sits at the same token positions whatever the prompt, so the prompt is encoded by the
    backbone's own `encode` with K copies of `init_word` in front, and a hook on each encoder's token-embedding
    table writes the vectors over those copies. `n_sets` independent sets: row i of a batch uses set
    `sets[i]` (one set per prompt for the per-prompt attack)."""

    def __init__(self, pipe, n_tokens: int, n_sets: int = 1, init_word: str = "a", seed: int = 0):
        super().__init__()
        if n_tokens < 1 or n_sets < 1:
            raise PatchforgeError(f"a soft prefix needs at least one token and one set, not {n_tokens} and {n_sets}")
        self.backbone, self.k, self.n_sets = for_pipe(pipe), n_tokens, n_sets
        self.text = " ".join([init_word] * n_tokens)
        g = torch.Generator().manual_seed(seed)
        self.vectors, self.offsets, self.scales = torch.nn.ParameterList(), [], []
        for tok, te in self.backbone.prompt_encoders():
            word = tok(init_word, add_special_tokens=False).input_ids
            ids = tok(self.text).input_ids
            offset = ids.index(word[0]) if len(word) == 1 and word[0] in ids else -1
            if offset < 0 or ids[offset:offset + n_tokens] != word * n_tokens:
                raise PatchforgeError(f"soft prefix: {init_word!r} is not one token of {type(tok).__name__}; "
                                      "pick another init word")
            vectors, scale = _init_vectors(te.get_input_embeddings().weight, word[0], (n_sets, n_tokens), g)
            self.vectors.append(torch.nn.Parameter(vectors))
            self.offsets.append(offset)  # after a begin-of-text token (CLIP), at 0 without one (T5)
            self.scales.append(scale)

    def encode(self, prompts: list[str], sets: list[int] | None = None) -> Cond:
        """The backbone's Cond of "<prefix> prompt" for each prompt; differentiable w.r.t. the vectors.
        `sets`: the vector set of each prompt (default: set i for prompt i when there is one set per
        prompt, else set 0)."""
        if sets is None:
            sets = list(range(len(prompts))) if self.n_sets == len(prompts) else [0] * len(prompts)
        idx = torch.as_tensor(sets)
        handles = []

        def hook_for(vectors, offset):
            def hook(module, inputs, output):
                if output.shape[0] != len(idx):  # a call this prefix does not own (never expected)
                    return output
                output = output.clone()
                output[:, offset:offset + self.k] = vectors[idx.to(vectors.device)].to(output.dtype)
                return output
            return hook

        try:
            for (_, te), vectors, offset in zip(self.backbone.prompt_encoders(), self.vectors, self.offsets):
                handles += [m.register_forward_hook(hook_for(vectors, offset)) for m in _token_tables(te)]
            cond = self.backbone.encode([f"{self.text} {p}" for p in prompts], self.backbone.denoiser.device)
        finally:
            for h in handles:
                h.remove()
        dtype = self.backbone.dtype
        return Cond(cond.emb.to(dtype), None if cond.pooled is None else cond.pooled.to(dtype))


def _token_tables(te) -> list[torch.nn.Module]:
    """Every embedding module reading the encoder's token table: T5 calls its encoder's own module, which
    shares the weight of get_input_embeddings() but is not that module (transformers 5)."""
    table = te.get_input_embeddings().weight
    return [m for m in te.modules() if isinstance(m, torch.nn.Embedding) and m.weight is table]


class Plateau:
    """Stops a noisy optimisation once it has converged: the exponential moving average of the loss
    (weight `1 - beta` on the newest value) has not fallen by more than `tol` (relative) below its best
    for `patience` steps."""

    def __init__(self, patience: int, tol: float = 0.01, beta: float = 0.95):
        self.patience, self.tol, self.beta = patience, tol, beta
        self.ema = self.best = None
        self.since = 0

    def done(self, loss: float) -> bool:
        self.ema = loss if self.ema is None else self.beta * self.ema + (1 - self.beta) * loss
        if self.best is None or self.ema < self.best * (1 - self.tol):
            self.best, self.since = self.ema, 0
        else:
            self.since += 1
        return self.since >= self.patience


def soft_cond(pipe, soft: "SoftPrompt | SoftPrefix", prompts: list[str]) -> Cond:
    """The Cond of `prompts` through either kind of soft tokens: a SoftPrompt's suffix, or a SoftPrefix's
    first set before every prompt."""
    if isinstance(soft, SoftPrompt):
        return Cond(soft.encode(pipe, prompts))
    return soft.encode(prompts, [0] * len(prompts))


def learnable_tokens(pipe, n_tokens: int, seed: int, prefix: bool, lr: float | None):
    """(soft tokens, their vectors, an Adam over them): a SoftPrompt suffix, or with prefix=True a SoftPrefix
    of one set. One step size per text encoder: `lr`, or half the spread of that encoder's token table
    (CLIP-L, CLIP-G and T5 differ)."""
    if prefix:
        soft = SoftPrefix(pipe, n_tokens, seed=seed)
        vectors, scales = list(soft.vectors), soft.scales
    else:
        soft = SoftPrompt(pipe, n_tokens, seed=seed)
        vectors, scales = [soft.vectors], [soft.scale]
    return soft, vectors, torch.optim.Adam([{"params": [v], "lr": lr or 0.5 * s} for v, s in zip(vectors, scales)])


def invert_latents(pipe, latents: torch.Tensor, steps: int = 40, n_tokens: int = 2, lr: float | None = None,
                   seed: int = 0, template: str = "a photo of", patience: int = 0, tol: float = 0.01,
                   prefix: bool = False) -> "SoftPrompt | SoftPrefix":
    """Textual inversion: K token embeddings <v> that make the pipeline's current denoiser denoise the clean
    `latents` when prompted "<template> <v>" -- the plain diffusion loss ||pred(x_t, c) - target||^2
    (target: what the backbone predicts, epsilon or v). Only the K vectors train.
    prefix=True: the vectors go before the template instead ("<v> <template>", a SoftPrefix in every text
    encoder), which every family takes; the suffix needs a single CLIP text encoder (SD 1.x / 2.x).
    patience > 0: run until the loss plateaus (Plateau(patience, tol)), `steps` at most. The returned
    soft tokens carry `losses`, one per step run; soft_cond() encodes prompts through them."""
    backbone = for_pipe(pipe)
    soft, vectors, opt = learnable_tokens(pipe, n_tokens, seed, prefix, lr)
    g = torch.Generator("cpu").manual_seed(seed + 1)
    prompts = [template] * len(latents)
    stop, soft.losses = Plateau(patience, tol) if patience > 0 else None, []
    for _ in range(steps):
        x_t, t, noise = backbone.noised(latents, g)
        target = backbone.training_target(latents, noise, t)
        pred = backbone.predict(x_t, t, soft_cond(pipe, soft, prompts))
        loss = F.mse_loss(pred.float(), target.float())
        for v, grad in zip(vectors, torch.autograd.grad(loss, vectors)):
            v.grad = grad
        opt.step()
        opt.zero_grad(set_to_none=True)
        soft.losses.append(float(loss.detach()))
        if stop is not None and stop.done(soft.losses[-1]):
            break
    return soft


def prefix_objective(pipe, soft: SoftPrefix, prompts: list[str], latents: torch.Tensor, seed: int = 0,
                     grad: bool = False) -> torch.Tensor:
    """UnlearnDiffAtk's objective, per prompt: the patched model's denoising loss on its target images (a
    diffusion classifier's score for "this image is what '<prefix> prompt' shows"), at one random timestep
    and noise per image drawn from `seed`. latents: len(prompts) * m clean latents, prompt i's m in a row."""
    backbone = for_pipe(pipe)
    m = len(latents) // len(prompts)
    sets = [i for i in range(len(prompts)) for _ in range(m)]
    x_t, t, noise = backbone.noised(latents, torch.Generator("cpu").manual_seed(seed))
    target = backbone.training_target(latents, noise, t)
    with torch.set_grad_enabled(grad):
        pred = backbone.predict(x_t, t, soft.encode([prompts[i] for i in sets], sets))
        err = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    return err.view(len(prompts), m).mean(1)


def unlearndiff_attack(pipe, prompts: list[str], latents: torch.Tensor, steps: int = 40, n_tokens: int = 5,
                       lr: float = 0.01, seed: int = 0) -> SoftPrefix:
    """One K-token prefix per prompt (independent sets of one SoftPrefix), each optimised with Adam on its
    own prompt's prefix_objective: the prompts share a batch, not a prefix (the summed loss gives each
    set exactly its own prompt's gradient)."""
    soft = SoftPrefix(pipe, n_tokens, n_sets=len(prompts), seed=seed)
    params = list(soft.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    for step in range(steps):
        loss = prefix_objective(pipe, soft, prompts, latents, seed=seed * 100_003 + step, grad=True).sum()
        for p, g in zip(params, torch.autograd.grad(loss, params)):
            p.grad = g
        opt.step()
        opt.zero_grad(set_to_none=True)
    return soft
