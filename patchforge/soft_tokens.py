"""Soft tokens: K continuous token embeddings spliced into a prompt, and textual inversion.

Shared by the attacks (soft-prompt attack, concept inversion), robust training and fmn's optional
inversion step, so it imports nothing of either side. SD 1.x / 2.x pipelines (one CLIP text encoder).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .backbones import for_pipe
from .core.cond import Cond
from .errors import PatchforgeError


def unsupported(pipe) -> str | None:
    """Why soft tokens cannot run on this pipeline (one line), or None where they can."""
    if getattr(pipe, "text_encoder_2", None) is None:
        return None
    family = "SDXL" if for_pipe(pipe).text_kv_reads_text else for_pipe(pipe).family_name()
    return ("soft tokens (soft-prompt and inversion attacks, robust training, fmn invert_steps) support SD 1.x / 2.x "
            f"pipelines, not {family} yet")


class SoftPrompt(torch.nn.Module):
    """K continuous token embeddings appended after a prompt's words (before end-of-text)."""

    def __init__(self, pipe, n_tokens: int, init_word: str = "a", seed: int = 0):
        super().__init__()
        why = unsupported(pipe)  # SDXL, SD3 and FLUX: more than one text encoder
        if why:
            raise PatchforgeError(why)
        table = pipe.text_encoder.get_input_embeddings().weight
        self.placeholder = pipe.tokenizer(init_word, add_special_tokens=False).input_ids[0]
        g = torch.Generator().manual_seed(seed)
        init = table[self.placeholder].detach().float().cpu()
        self.scale = float(table.detach().float().std())
        self.vectors = torch.nn.Parameter((init + self.scale * 0.1 * torch.randn(n_tokens, init.shape[0], generator=g))
                                          .to(table.device))

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


def invert_latents(pipe, latents: torch.Tensor, steps: int = 40, n_tokens: int = 2, lr: float | None = None,
                   seed: int = 0, template: str = "a photo of") -> SoftPrompt:
    """Textual inversion: K token embeddings <v> that make the pipeline's current UNet denoise the clean
    `latents` when prompted "<template> <v>" -- the plain diffusion loss ||pred(x_t, c) - target||^2
    (target: what the backbone predicts, epsilon or v). Only the K vectors train."""
    backbone = for_pipe(pipe)
    soft = SoftPrompt(pipe, n_tokens, seed=seed)
    opt = torch.optim.Adam([soft.vectors], lr=lr or 0.5 * soft.scale)
    g = torch.Generator("cpu").manual_seed(seed + 1)
    prompts = [template] * len(latents)
    for _ in range(steps):
        x_t, t, noise = backbone.noised(latents, g)
        target = backbone.training_target(latents, noise, t)
        pred = backbone.predict(x_t, t, Cond(soft.encode(pipe, prompts)))
        (grad,) = torch.autograd.grad(F.mse_loss(pred.float(), target.float()), [soft.vectors])
        soft.vectors.grad = grad
        opt.step()
        soft.vectors.grad = None
    return soft
