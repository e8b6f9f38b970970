"""Stable Diffusion 3 / 3.5 (MMDiT): a transformer denoiser with joint attention over image and text
tokens, two CLIP text encoders plus an optional T5, flow matching.

What the seam's members mean here:

- Prompt encoding is the pipeline's own `encode_prompt`: the token sequence the transformer reads is
  [CLIP-L ‖ CLIP-G on the feature axis, padded to the T5 width] followed by the T5 tokens (zeros
  when the pipeline has no T5), and the pooled embedding is [CLIP-L pooled ‖ CLIP-G pooled].
- Noising is the flow's straight line x_t = (1 − σ) x0 + σ ε with σ from the scheduler's own
  training table (its `shift` applied, as the diffusers training scripts draw it); `t` is the
  timestep the transformer takes, σ · num_train_timesteps. The target is the velocity ε − x0.
- Text attention: in a joint-attention block image and text tokens attend together. The text
  stream's keys and values come from `add_k_proj` / `add_v_proj`, and the attention mass that
  image queries put on the concept's text columns plays the role a UNet's cross-attention map
  plays. Blocks of SD3.5's "dual attention" layers also have an image-only `attn2`: not text
  attention, never hooked.
- LoRA components follow `SD3LoraLoaderMixin`: transformer, text_encoder, text_encoder_2 (the CLIPs;
  T5 has no LoRA path in diffusers, so patches never touch it).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from . import Cond
from . import FamilyDefaults, PipelineParts, concept_token_mask, register

TEXT_STREAM = r".*attn\.(add_q_proj|add_k_proj|add_v_proj|to_add_out)$"  # the text stream of joint attention
TEXT_KV = r".*attn\.(add_k_proj|add_v_proj)$"  # what the image queries read from the text
POOLED_IN = r"time_text_embed\.text_embedder\.linear_1"  # the pooled prompt's way into every block's modulation
TOKENS_IN = r"context_embedder"  # the prompt's tokens' way into the transformer's text stream
T5_LENGTH = 256  # the pipeline's default max_sequence_length, used for training and generation alike


class FlowMatching(PipelineParts):
    """Flow-matching noising, target and latents for the transformer families (SD3 and FLUX)."""

    PREDICTION = "flow"  # what patch metadata records as the base's prediction type (the scheduler names none)

    def _training_schedule(self):
        """The scheduler's training-time timesteps (a fresh copy: generation resets the pipeline's own)."""
        if getattr(self, "_train_sched", None) is None:
            sched = self.pipe.scheduler
            self._train_sched = type(sched).from_config(sched.config)
        return self._train_sched

    def num_timesteps(self) -> int:
        return self.pipe.scheduler.config.num_train_timesteps

    def sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        sigma = (t.float() / self.num_timesteps()).to(like.device)
        return sigma.reshape(-1, *[1] * (like.dim() - 1))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = (1 − σ) x0 + σ ε: the flow's straight line from data to noise."""
        s = self.sigma(t, x0)
        return ((1 - s) * x0.float() + s * noise.float()).to(x0.dtype)

    def noised(self, x0: torch.Tensor, generator: torch.Generator):
        """x0 at random steps of the scheduler's training table -> (x_t, t, noise), t in timestep units.
        Indices, then noise, are drawn from the CPU `generator` (same draws on every device)."""
        table = self._training_schedule().timesteps
        idx = torch.randint(0, len(table), (len(x0),), generator=generator)
        t = table[idx].float().to(x0.device)
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
        return self.add_noise(x0, noise, t), t, noise

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The velocity the transformer predicts: ε − x0."""
        return noise - x0

    def sampler(self, steps: int, latents: torch.Tensor):
        """A fresh copy of the pipeline's flow-matching scheduler set to `steps` denoising steps, shifted
        for these latents' size where the scheduler shifts dynamically (FLUX), as the pipeline does."""
        import numpy as np

        sched = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        if not sched.config.get("use_dynamic_shifting"):
            sched.set_timesteps(steps)
            return sched
        cfg = sched.config
        tokens = latents.shape[1] if latents.dim() == 3 else latents.shape[-1] * latents.shape[-2]
        slope = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
        mu = cfg.base_shift + slope * (tokens - cfg.base_image_seq_len)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        return sched

    # ---- structure shared by the transformer families
    @classmethod
    def matches(cls, pipe) -> bool:
        return type(getattr(pipe, "transformer", None)).__name__ == cls.TRANSFORMER_CLASS

    def family_name(self) -> str:
        return self.family_from_config(dict(self.pipe.transformer.config))

    @classmethod
    def folder_family(cls, folder) -> tuple[str, dict] | None:
        config = cls._folder_config(folder)
        return (cls.family_from_config(config), config) if config else None

    def text_kv(self) -> list[tuple[str, torch.nn.Module]]:
        """The text stream's key and value projections of every joint-attention block."""
        return [(n, m) for n, m in self.pipe.transformer.named_modules() if n.endswith(("attn.add_k_proj",
                                                                                         "attn.add_v_proj"))]

    def pooled_text_in(self) -> list[tuple[str, torch.nn.Module]]:
        """The pooled embedding's projection into the timestep embedding, which modulates every block (adaLN):
        the prompt reaches the image this way too, beside joint attention."""
        return [(n, m) for n, m in self.pipe.transformer.named_modules() if re.fullmatch(POOLED_IN, n)]

    def token_text_in(self) -> list[tuple[str, torch.nn.Module]]:
        """The projection of the text encoders' tokens into the transformer's text stream: the one layer that
        reads them, so every joint block's K/V see the prompt through it."""
        return [(n, m) for n, m in self.pipe.transformer.named_modules() if re.fullmatch(TOKENS_IN, n)]

    guidance_distilled = False  # classifier-free guidance at sampling time (FLUX.1-dev: a guidance embedding)
    text_kv_reads_text = False  # their input is the text stream inside the transformer, not the encoder output

    def load_lora(self, state_dict: dict, adapter_name: str, metadata: dict, components) -> None:
        """Hand a patch to the pipeline's own loaders (SD3LoraLoaderMixin / FluxLoraLoaderMixin)."""
        try:
            from diffusers.loaders.lora_pipeline import _LOW_CPU_MEM_USAGE_DEFAULT_LORA as low_mem
        except ImportError:
            low_mem = False
        pipe = self.pipe
        if self.denoiser_name in components:
            extra = {"network_alphas": None} if self.LOADER_TAKES_ALPHAS else {}
            pipe.load_lora_into_transformer(state_dict, transformer=pipe.transformer, adapter_name=adapter_name,
                                            metadata=metadata, _pipeline=pipe, low_cpu_mem_usage=low_mem, **extra)
        for comp in self.components[1:]:
            if comp in components:
                pipe.load_lora_into_text_encoder(state_dict, network_alphas=None, text_encoder=getattr(pipe, comp),
                                                 prefix=comp, lora_scale=1.0, adapter_name=adapter_name,
                                                 metadata=metadata, _pipeline=pipe, low_cpu_mem_usage=low_mem)

    @classmethod
    def _folder_config(cls, folder: Path) -> dict | None:
        """The transformer config of a diffusers folder of this family, else None."""
        try:
            index = json.loads((Path(folder) / "model_index.json").read_text())
            config = json.loads((Path(folder) / "transformer" / "config.json").read_text())
        except (OSError, ValueError):
            return None
        return config if config.get("_class_name") == cls.TRANSFORMER_CLASS or \
            index.get("_class_name") in cls.PIPELINE_CLASSES else None


class JointAttentionRecorder:
    """Attention processor for SD3 joint attention that, while recording, computes the softmax
    explicitly and keeps the mass every image query puts on the concept's text columns (one row per
    sample and head, like the UNet recorder). Otherwise it hands the call to the original processor."""

    def __init__(self, fallback=None):
        self.mask = None  # (B, text tokens) 1.0 on concept tokens; None = not recording
        self.mass: list[torch.Tensor] = []
        self.fallback = fallback

    def recording(self, batch: int) -> bool:
        return self.mask is not None and torch.is_grad_enabled() and len(self.mask) == batch

    def keep(self, probs: torch.Tensor, image: slice, text: slice) -> None:
        """probs (B, heads, queries, keys): the image queries' mass on the concept's text keys."""
        m = self.mask[:, None, None, :].to(probs.dtype)
        mass = (probs[:, :, image, text] * m).sum(-1)  # (B, heads, image tokens)
        self.mass.append(mass.flatten(0, 1))

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if encoder_hidden_states is None or not self.recording(len(hidden_states)):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        b, n_img = hidden_states.shape[:2]

        def heads(x, norm=None):
            x = x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)
            return norm(x) if norm is not None else x

        q = torch.cat([heads(attn.to_q(hidden_states), attn.norm_q),
                       heads(attn.add_q_proj(encoder_hidden_states), attn.norm_added_q)], dim=2)
        k = torch.cat([heads(attn.to_k(hidden_states), attn.norm_k),
                       heads(attn.add_k_proj(encoder_hidden_states), attn.norm_added_k)], dim=2)
        v = torch.cat([heads(attn.to_v(hidden_states)), heads(attn.add_v_proj(encoder_hidden_states))], dim=2)
        probs = F.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        self.keep(probs, slice(0, n_img), slice(n_img, None))
        out = (probs @ v).transpose(1, 2).reshape(b, -1, attn.heads * q.shape[-1]).to(q.dtype)
        hidden, context = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return attn.to_out[1](attn.to_out[0](hidden)), context


TOKEN_VALUES = 6  # values per token and width unit one transformer block keeps for backward, beyond ACT_K
# the transformers train at 512 px by default (they generate well there, at a quarter of 1024's tokens)
JOINT_DEFAULTS = {"sd3": FamilyDefaults("sd3", 512, 2, 1, 8), "flux": FamilyDefaults("flux", 512, 1, 1, 8)}


def joint_attention_values(cfg: dict, image_tokens: int, text_tokens: int) -> int:
    """The memory plan's F for a joint-attention transformer: (image + text tokens) x width x blocks x
    TOKEN_VALUES (a rough count, not fitted like the UNet's)."""
    width = cfg.get("num_attention_heads", 1) * cfg.get("attention_head_dim", 1)
    blocks = cfg.get("num_layers", 1) + cfg.get("num_single_layers", 0)
    return (image_tokens + text_tokens) * width * blocks * TOKEN_VALUES


@register
class SD3(FlowMatching):
    """The backbone of StableDiffusion3Pipeline (SD3, SD3.5 medium / large)."""

    RELEASES = {name: JOINT_DEFAULTS["sd3"] for name in ("sd3", "sd3.5-medium", "sd3.5-large")}

    @staticmethod
    def feature_values(cfg: dict, latent_side: int) -> int:
        """Image tokens (patch_size 2) plus 77 CLIP + 256 T5 text tokens."""
        return joint_attention_values(cfg, (latent_side // cfg.get("patch_size", 2)) ** 2, 77 + 256)

    denoiser_name = "transformer"
    components = ("transformer", "text_encoder", "text_encoder_2")  # SD3LoraLoaderMixin's
    TARGETS = {"xattn": TEXT_STREAM, "xattn-kv": TEXT_KV, "xattn-kv+pooled": f"({TEXT_KV})|({POOLED_IN})",
               "text-in": f"({TOKENS_IN})|({POOLED_IN})", "none": None}
    TRANSFORMER_CLASS = "SD3Transformer2DModel"
    PIPELINE_CLASSES = ("StableDiffusion3Pipeline",)
    LOADER_TAKES_ALPHAS = False

    def text_attention(self) -> list[tuple[str, torch.nn.Module]]:
        """The joint-attention modules (those with a text stream; SD3.5's image-only attn2 is not one)."""
        return [(n, m) for n, m in self.pipe.transformer.named_modules()
                if n.endswith(".attn") and getattr(m, "add_k_proj", None) is not None]

    def attention_recorder(self):
        """A recording processor for text_attention() (FMN hooks it)."""
        from diffusers.models.attention_processor import JointAttnProcessor2_0

        return JointAttentionRecorder(JointAttnProcessor2_0())

    def native_size(self) -> int:
        return self.pipe.transformer.config.sample_size * self.pipe.vae_scale_factor

    @staticmethod
    def family_from_config(config: dict) -> str:
        """sd3 (SD3 medium), sd3.5-medium, sd3.5-large; a toy-sized copy names its shape."""
        layers, width = config.get("num_layers"), config.get("caption_projection_dim")
        if config.get("joint_attention_dim") == 4096 and width in (1536, 2432):
            if width == 2432:
                return "sd3.5-large"
            return "sd3.5-medium" if config.get("dual_attention_layers") else "sd3"
        return (f"sd3-like (transformer {layers} layers, {config.get('num_attention_heads')} heads of "
                f"{config.get('attention_head_dim')})")

    @staticmethod
    def folder_native(folder, config: dict, vae_scale: int) -> int:
        return config.get("sample_size", 128) * vae_scale

    @staticmethod
    def resolution_multiple(config: dict, vae_scale: int) -> int:
        return vae_scale * config.get("patch_size", 2)

    # ---- text
    def encode(self, prompts: list[str], device) -> Cond:
        emb, _, pooled, _ = self.pipe.encode_prompt(prompt=list(prompts), prompt_2=None, prompt_3=None, device=device,
                                                    num_images_per_prompt=1, do_classifier_free_guidance=False,
                                                    max_sequence_length=T5_LENGTH)
        return Cond(emb, pooled)

    def token_parts(self) -> list[tuple[object, int | None]]:
        """77 CLIP positions (CLIP-L and CLIP-G on the feature axis), then the T5 part (zeros without a T5)."""
        return [(self.pipe.tokenizer, 77), (getattr(self.pipe, "tokenizer_3", None), None)]

    def concept_mask(self, prompts: list[str], words: list[str]) -> torch.Tensor:
        """(prompts, text tokens) 1.0 where the transformer's text sequence spells one of `words`:
        in the CLIP part and in the T5 part (zeros there when the pipeline has no T5)."""
        pipe = self.pipe
        clip = concept_token_mask(pipe.tokenizer, prompts, words)
        # a T5 slot with no layers (the DiT toy's, which outputs SD3's no-T5 zeros) carries no words either
        t5_model = getattr(pipe, "text_encoder_3", None)
        has_t5 = t5_model is not None and getattr(t5_model.config, "num_layers", 1) > 0
        t5 = (concept_token_mask(pipe.tokenizer_3, prompts, words, T5_LENGTH)
              if has_t5 else torch.zeros(len(prompts), T5_LENGTH))
        return torch.cat([clip, t5], dim=1)

    # ---- diffusion
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, size: int | None = None) -> torch.Tensor:
        t = t.expand(len(x_t)) if t.dim() == 0 else t
        # float32 timesteps, as the pipeline passes its scheduler's (bf16 would round 985 to 984)
        return self.pipe.transformer(hidden_states=x_t, timestep=t.float(), encoder_hidden_states=cond.emb,
                                     pooled_projections=cond.pooled, return_dict=False)[0]
