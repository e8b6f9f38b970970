"""FLUX.1 (dev, schnell): a transformer with joint-attention ("double-stream") blocks followed by
single-stream blocks, a CLIP text encoder for the pooled vector and a T5 for the token sequence,
flow matching, and (dev) a guidance embedding instead of classifier-free guidance.

What the seam's members mean here:

- Latents are *packed*: the pipeline turns each 2x2 patch of VAE latents into one token, so x0, x_t
  and the velocity are (batch, tokens, 4 x channels), as the pipeline's own `output_type="latent"`
  returns them. RoPE position ids: `img_ids` from the token grid, `txt_ids` zeros.
- Prompt encoding is the pipeline's `encode_prompt`: the transformer reads the T5 tokens; CLIP gives
  only the pooled vector. The guidance embedding is fed GUIDANCE (FLUX.1-dev's default, also what
  diffusers' FLUX LoRA training uses); schnell has none.
- Noising, target: the flow's straight line and velocity, as SD3 (sd3.FlowMatching); the transformer
  takes the timestep divided by 1000.
- Text attention. In the double-stream blocks image and text tokens attend jointly and the text's
  keys / values come from `add_k_proj` / `add_v_proj`, as in SD3. In the single-stream blocks text and
  image tokens are one sequence [text, image] projected by the *same* `to_q/to_k/to_v`: there the
  text attention is the block of the attention matrix from image queries to the text positions.
  FMN's recorder reads that mass in both kinds of block. But the single blocks have no text-only
  projection, so LoRA targets and the text K/V that keep terms and UCE act on are the double-stream
  blocks' `add_*` projections only (a LoRA on a single block's to_k would move image keys too).
- LoRA components follow `FluxLoraLoaderMixin`: transformer and text_encoder (CLIP; T5 has none).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from . import Cond
from . import concept_token_mask, register
from .sd3 import JOINT_DEFAULTS, POOLED_IN, TOKENS_IN, FlowMatching, JointAttentionRecorder, joint_attention_values

# the double-stream blocks' text stream (single_transformer_blocks have no add_* projections)
TEXT_STREAM = r".*transformer_blocks\.\d+\.attn\.(add_q_proj|add_k_proj|add_v_proj|to_add_out)$"
TEXT_KV = r".*transformer_blocks\.\d+\.attn\.(add_k_proj|add_v_proj)$"
T5_LENGTH = 512  # FluxPipeline's default max_sequence_length
GUIDANCE = 3.5  # FLUX.1-dev's default guidance embedding value


class FluxAttentionRecorder(JointAttentionRecorder):
    """FMN's recorder for FLUX attention (double- and single-stream, RoPE on [text, image])."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 **kwargs):
        if not self.recording(len(hidden_states)):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        from diffusers.models.embeddings import apply_rotary_emb

        def heads(x, norm):
            return norm(x.unflatten(-1, (-1, attn.head_dim)))

        q, k = heads(attn.to_q(hidden_states), attn.norm_q), heads(attn.to_k(hidden_states), attn.norm_k)
        v = attn.to_v(hidden_states).unflatten(-1, (-1, attn.head_dim))
        if encoder_hidden_states is not None:  # double-stream: the text stream's own projections, text first
            q = torch.cat([heads(attn.add_q_proj(encoder_hidden_states), attn.norm_added_q), q], dim=1)
            k = torch.cat([heads(attn.add_k_proj(encoder_hidden_states), attn.norm_added_k), k], dim=1)
            v = torch.cat([attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)), v], dim=1)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, heads, tokens, dim)
        n_text = self.mask.shape[1]
        probs = F.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        self.keep(probs, slice(n_text, None), slice(0, n_text))
        out = (probs @ v).transpose(1, 2).flatten(2, 3).to(q.dtype)
        if encoder_hidden_states is None:
            return out
        context, hidden = out[:, :n_text], out[:, n_text:]
        return attn.to_out[1](attn.to_out[0](hidden.contiguous())), attn.to_add_out(context.contiguous())


@register
class Flux(FlowMatching):
    """The backbone of FluxPipeline (FLUX.1-dev, FLUX.1-schnell)."""

    RELEASES = {name: JOINT_DEFAULTS["flux"] for name in ("flux.1-dev", "flux.1-schnell")}

    @staticmethod
    def feature_values(cfg: dict, latent_side: int) -> int:
        """Image tokens (2x2 latents packed into one) plus 512 T5 text tokens."""
        return joint_attention_values(cfg, (latent_side // 2) ** 2, 512)

    denoiser_name = "transformer"
    components = ("transformer", "text_encoder")  # FluxLoraLoaderMixin's
    TARGETS = {"xattn": TEXT_STREAM, "xattn-kv": TEXT_KV, "xattn-kv+pooled": f"({TEXT_KV})|({POOLED_IN})",
               "text-in": f"({TOKENS_IN})|({POOLED_IN})", "none": None}
    TRANSFORMER_CLASS = "FluxTransformer2DModel"
    PIPELINE_CLASSES = ("FluxPipeline",)
    LOADER_TAKES_ALPHAS = True

    def __init__(self, pipe):
        super().__init__(pipe)
        # FLUX.1-dev learnt the guided prediction itself (guidance embedding): sampling runs no
        # classifier-free pair, and neither do attacks that denoise by hand
        self.guidance_distilled = bool(pipe.transformer.config.guidance_embeds)

    def text_attention(self) -> list[tuple[str, torch.nn.Module]]:
        """Every attention of the transformer: double-stream blocks (joint) and single-stream blocks
        (one sequence [text, image]); in both, image queries read the text positions."""
        return [(n, m) for n, m in self.pipe.transformer.named_modules()
                if n.endswith(".attn") and hasattr(m, "set_processor")]

    def attention_recorder(self):
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        return FluxAttentionRecorder(FluxAttnProcessor())

    def native_size(self) -> int:
        """The VAE's image side (1024 for FLUX.1): the transformer config records no sample size."""
        return self.pipe.vae.config.sample_size

    @staticmethod
    def family_from_config(config: dict) -> str:
        if (config.get("joint_attention_dim"), config.get("num_layers"), config.get("num_single_layers")) == \
                (4096, 19, 38):
            return "flux.1-dev" if config.get("guidance_embeds") else "flux.1-schnell"
        return (f"flux-like (transformer {config.get('num_layers')}+{config.get('num_single_layers')} layers, "
                f"{config.get('num_attention_heads')} heads of {config.get('attention_head_dim')})")

    @staticmethod
    def folder_native(folder, config: dict, vae_scale: int) -> int:
        """The VAE config's sample size, as native_size()."""
        try:
            return json.loads((Path(folder) / "vae" / "config.json").read_text()).get("sample_size", 1024)
        except (OSError, ValueError):
            return 1024

    @staticmethod
    def resolution_multiple(config: dict, vae_scale: int) -> int:
        return vae_scale * 2  # 2x2 latent patches are packed into one token

    # ---- text
    def encode(self, prompts: list[str], device) -> Cond:
        emb, pooled, _ = self.pipe.encode_prompt(prompt=list(prompts), prompt_2=None, device=device,
                                                 num_images_per_prompt=1, max_sequence_length=T5_LENGTH)
        return Cond(emb, pooled)

    def token_parts(self) -> list[tuple[object, int | None]]:
        """The transformer reads T5's tokens only (CLIP gives the pooled vector)."""
        return [(self.pipe.tokenizer_2, None)]

    def concept_mask(self, prompts: list[str], words: list[str]) -> torch.Tensor:
        """The concept's columns in the T5 sequence (the only tokens the transformer reads)."""
        return concept_token_mask(self.pipe.tokenizer_2, prompts, words, T5_LENGTH)

    # ---- diffusion (packed latents)
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, size: int | None = None) -> torch.Tensor:
        tr = self.pipe.transformer
        t = t.expand(len(x_t)) if t.dim() == 0 else t
        side = math.isqrt(x_t.shape[1])
        grid = torch.arange(side, device=x_t.device)
        img_ids = torch.stack([torch.zeros_like(grid).repeat(side), grid.repeat_interleave(side), grid.repeat(side)],
                              dim=-1).to(x_t.dtype)  # (row, column) of each packed token, as the pipeline's
        txt_ids = torch.zeros(cond.emb.shape[1], 3, device=x_t.device, dtype=x_t.dtype)
        guidance = (torch.full((len(x_t),), GUIDANCE, device=x_t.device, dtype=torch.float32)
                    if tr.config.guidance_embeds else None)
        return tr(hidden_states=x_t, timestep=t.to(x_t.dtype) / 1000, guidance=guidance,  # as the pipeline does
                  pooled_projections=cond.pooled, encoder_hidden_states=cond.emb, txt_ids=txt_ids, img_ids=img_ids,
                  return_dict=False)[0]

    def encode_images(self, images) -> torch.Tensor:
        """uint8 images -> packed latents (tokens of 2x2 latent patches), as the pipeline denoises them."""
        lat = super().encode_images(images)
        b, c, h, w = lat.shape
        return lat.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)

    def decode(self, latents: torch.Tensor):
        b, n, c4 = latents.shape
        side = math.isqrt(n)
        lat = latents.view(b, side, side, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        lat = lat.reshape(b, c4 // 4, side * 2, side * 2)
        return super().decode(lat)
