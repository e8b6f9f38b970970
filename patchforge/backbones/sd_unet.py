"""Stable Diffusion 1.x / 2.x / XL: a UNet denoiser with cross-attention (attn2) to CLIP text
embeddings, DDPM noising, epsilon or v prediction. Also the toy model and the tests' tiny pipelines,
which copy the SD 1.x layout."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from . import Cond
from . import FamilyDefaults, PipelineParts, concept_token_mask, register

XATTN = r".*attn2\.(to_q|to_k|to_v|to_out\.0)$"  # cross-attention: where text meets image
XATTN_KV = r".*attn2\.(to_k|to_v)$"


class CrossAttentionRecorder:
    """An attention processor for text-attention layers that computes attention the classic way (explicit
    softmax, like diffusers' AttnProcessor) and keeps, while recording, the probability mass that
    each pixel gives to the concept's token columns."""

    def __init__(self):
        self.mask = None  # (B, tokens) 1.0 on concept tokens; None = not recording
        self.mass: list[torch.Tensor] = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        residual = hidden_states
        ndim = hidden_states.ndim
        if ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attn.norm_cross and encoder_hidden_states is not None:
            context = attn.norm_encoder_hidden_states(context)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, None)  # (B*heads, pixels, tokens)
        if self.mask is not None and torch.is_grad_enabled() and len(self.mask) * attn.heads == len(probs):
            m = self.mask.repeat_interleave(attn.heads, dim=0)[:, None, :].to(probs.dtype)
            self.mass.append((probs * m).sum(-1))  # (B*heads, pixels)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@register
class SDUNet(PipelineParts):
    """The backbone of StableDiffusion(XL)Pipeline and of every pipeline with a `unet` denoiser."""

    RELEASES = {  # training defaults per release (docs/real-models.md)
        "sd1.x": FamilyDefaults("sd1", 512, 4, 1, 8),
        "sd2.x": FamilyDefaults("sd2", None, 4, 1, 8),  # 512 or 768 (v-prediction): the checkpoint's own
        "sdxl": FamilyDefaults("sdxl", 1024, 2, 1, 8),
    }

    @staticmethod
    def feature_values(cfg: dict, latent_side: int) -> int:
        """The memory plan's F (pipeline/plan.py): feature-map values of one UNet row, weighted by block depth."""
        channels = list(cfg["block_out_channels"])
        lpb = cfg.get("layers_per_block", 2)
        lpb = lpb if isinstance(lpb, int) else max(lpb)
        depth = cfg.get("transformer_layers_per_block", 1)
        depth = [depth] * len(channels) if isinstance(depth, int) else list(depth)
        downs = cfg.get("down_block_types") or ()
        total = 0
        for level, c in enumerate(channels):
            attn = level < len(downs) and "CrossAttn" in downs[level]
            side = max(1, latent_side // 2 ** level)
            total += c * side * side * (2 * lpb + 1) * (1 + 3 * (depth[level] if attn else 0))
        return total


    denoiser_name = "unet"
    components = ("unet", "text_encoder", "text_encoder_2")
    # SDXL's pooled embedding enters add_embedding beside the size ids: not edited (pooled_text_in() is empty)
    TARGETS = {"xattn": XATTN, "xattn-kv": XATTN_KV, "xattn-kv+pooled": XATTN_KV, "text-in": XATTN_KV,
               "none": None}

    def __init__(self, pipe):
        super().__init__(pipe)
        self.sdxl = getattr(pipe, "text_encoder_2", None) is not None

    @classmethod
    def matches(cls, pipe) -> bool:
        return getattr(pipe, cls.denoiser_name, None) is not None

    # ---- structure (denoiser, dtype, models, text_encoders, target_pattern: PipelineParts)
    def text_attention(self) -> list[tuple[str, torch.nn.Module]]:
        """The cross-attention blocks (attn2): where the image attends to the prompt's tokens."""
        return [(n, m) for n, m in self.pipe.unet.named_modules()
                if n.endswith("attn2") and hasattr(m, "set_processor")]

    def text_kv(self) -> list[tuple[str, torch.nn.Module]]:
        """The key and value projections of the text attention: the only layers that see text tokens."""
        return [(n, m) for n, m in self.pipe.unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))]

    text_kv_reads_text = True  # cross-attention K/V read the text encoder's output itself

    def attention_recorder(self) -> CrossAttentionRecorder:
        return CrossAttentionRecorder()

    def concept_mask(self, prompts: list[str], words: list[str]) -> torch.Tensor:
        return concept_token_mask(self.pipe.tokenizer, prompts, words)

    def native_size(self) -> int:
        """Pixels of the checkpoint's own image side."""
        return self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor

    def family_name(self) -> str:
        """The readable family written into patch metadata (sd1.x, sd2.x, sdxl, or the layout copied)."""
        return self.family_from_config(dict(self.pipe.unet.config), self.sdxl)

    @staticmethod
    def family_from_config(config: dict, sdxl: bool) -> str:
        """The family of a UNet config (also before loading, from the folder's unet/config.json)."""
        xdim = config.get("cross_attention_dim")
        if sdxl:
            return "sdxl" if xdim == 2048 else f"sdxl-like (cross-attention {xdim})"
        if xdim == 768:
            return "sd1.x"
        if xdim == 1024:
            return "sd2.x"
        # other sizes (toy and test models): name the layout they copy; SD 2.x introduced linear projections
        kind = "sd2-like" if config.get("use_linear_projection") else "sd1-like"
        return f"{kind} (unet {list(config.get('block_out_channels', []))}, cross-attention {xdim})"

    @classmethod
    def folder_family(cls, folder) -> tuple[str, dict] | None:
        """From a folder's model_index.json and unet/config.json, without loading."""
        try:
            index = json.loads((Path(folder) / "model_index.json").read_text())
            config = json.loads((Path(folder) / "unet" / "config.json").read_text())
        except (OSError, ValueError):
            return None
        te2 = isinstance(index.get("text_encoder_2"), list) and index["text_encoder_2"][0] is not None
        return cls.family_from_config(config, te2), config

    @staticmethod
    def folder_native(folder, config: dict, vae_scale: int) -> int:
        """native_size() of a folder, before loading."""
        return config.get("sample_size", 64) * vae_scale

    @staticmethod
    def resolution_multiple(config: dict, vae_scale: int) -> int:
        """The UNet halves the latent side once per level: pixels must divide evenly."""
        return vae_scale * 2 ** (len(config["block_out_channels"]) - 1)

    # ---- text
    def encode(self, prompts: list[str], device) -> Cond:
        """Prompts -> Cond through the pipeline's own encode_prompt (no classifier-free pair)."""
        if self.sdxl:
            emb, _, pooled, _ = self.pipe.encode_prompt(prompt=list(prompts), device=device,
                                                        num_images_per_prompt=1, do_classifier_free_guidance=False)
            return Cond(emb, pooled)
        emb, _ = self.pipe.encode_prompt(list(prompts), device, 1, False)
        return Cond(emb)

    # ---- diffusion
    def num_timesteps(self) -> int:
        return self.pipe.scheduler.config.num_train_timesteps

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.pipe.scheduler.add_noise(x0, noise, t)

    def noised(self, x0: torch.Tensor, generator: torch.Generator):
        """x0 noised at random timesteps -> (x_t, t, noise). Timesteps, then noise, are drawn from the CPU
        `generator`, so a seed gives the same draws on every device."""
        t = torch.randint(0, self.num_timesteps(), (len(x0),), generator=generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
        return self.add_noise(x0, noise, t), t, noise

    guidance_distilled = False  # sampled with classifier-free guidance

    def sampler(self, steps: int, latents: torch.Tensor):
        """A DDIM scheduler from the pipeline's config set to `steps` denoising steps (hand-written sampling:
        the partial-denoising attack)."""
        from diffusers import DDIMScheduler

        sched = DDIMScheduler.from_config(self.pipe.scheduler.config)
        sched.set_timesteps(steps)
        return sched

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the denoiser learnt to predict: epsilon, or v for v-prediction bases (SD 2.x 768)."""
        if self.pipe.scheduler.config.prediction_type == "v_prediction":
            return self.pipe.scheduler.get_velocity(x0, noise, t)
        return noise

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond | torch.Tensor, size: int | None = None):
        """One denoiser call. SDXL also takes the pooled embedding and size ids (`size` pixels)."""
        if isinstance(cond, torch.Tensor):
            cond = Cond(cond)
        kwargs = {}
        if self.sdxl:
            h = w = size or self.native_size()
            time_ids = torch.tensor([[h, w, 0, 0, h, w]], device=x_t.device, dtype=cond.emb.dtype)
            kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled, "time_ids": time_ids.repeat(len(cond), 1)}
        return self.pipe.unet(x_t, t, encoder_hidden_states=cond.emb, **kwargs).sample

    # ---- patches
    def load_lora(self, state_dict: dict, adapter_name: str, metadata: dict, components) -> None:
        """Hand a patch's flat state dict to diffusers' own per-component loaders; `metadata`: the LoRA
        config per component ("unet.r", ...), as patchforge rebuilt it."""
        try:  # what load_lora_weights passes: PEFT then builds the LoRA layers empty instead of initialising
            # them (the file overwrites them anyway), which is most of the cost of a load
            from diffusers.loaders.lora_pipeline import _LOW_CPU_MEM_USAGE_DEFAULT_LORA as low_mem
        except ImportError:
            low_mem = False
        pipe = self.pipe
        if self.denoiser_name in components:
            pipe.load_lora_into_unet(state_dict, network_alphas=None, unet=pipe.unet, adapter_name=adapter_name,
                                     metadata=metadata, _pipeline=pipe, low_cpu_mem_usage=low_mem)
        for comp in self.components[1:]:
            if comp in components:
                pipe.load_lora_into_text_encoder(state_dict, network_alphas=None, text_encoder=getattr(pipe, comp),
                                                 prefix=comp, lora_scale=1.0, adapter_name=adapter_name,
                                                 metadata=metadata, _pipeline=pipe, low_cpu_mem_usage=low_mem)
