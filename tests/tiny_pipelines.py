"""Tiny random-weight Stable Diffusion pipelines built from configs, offline and seeded.

Three shapes that matter for patches: SD 1.x (one CLIP text encoder, epsilon prediction), SD 2.x
(linear projections, v-prediction, a different cross-attention width) and SDXL (two text encoders,
text_time conditioning). Sizes follow diffusers' own tiny test configs; each builds in well under
a second on CPU. Call `tiny_sd1()`, `tiny_sd2_vpred()`, `tiny_sdxl()`; same seed -> same weights.
"""
from __future__ import annotations

import functools

import torch

# The test machine has 2 cores shared with other jobs: one thread is 10x faster than contending
torch.set_num_threads(1)

from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,  # noqa: E402
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

from patchforge.toyworld.tokenizer import build_tokenizer  # noqa: E402


@functools.lru_cache(maxsize=1)
def _tokenizer():
    return build_tokenizer()


def _text_config(hidden: int, **extra) -> CLIPTextConfig:
    tok = _tokenizer()
    return CLIPTextConfig(hidden_size=hidden, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                          vocab_size=len(tok), max_position_embeddings=tok.model_max_length,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, layer_norm_eps=1e-5, hidden_act="gelu", **extra)


def _vae() -> AutoencoderKL:
    return AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         sample_size=32)


def _scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)


def _finish(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu")


def tiny_sd1(seed: int = 0) -> StableDiffusionPipeline:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=32)
    vae, te = _vae(), CLIPTextModel(_text_config(32))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=_tokenizer(), unet=unet,
                                   scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return _finish(pipe)


def tiny_sd2_vpred(seed: int = 0) -> StableDiffusionPipeline:
    torch.manual_seed(seed)
    # SD 2.x: linear projections in the transformer blocks, per-block head dims, wider text encoder
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                                attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=32)
    vae, te = _vae(), CLIPTextModel(_text_config(64))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=_tokenizer(), unet=unet,
                                   scheduler=_scheduler("v_prediction"), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    return _finish(pipe)


def tiny_sdxl(seed: int = 0) -> StableDiffusionXLPipeline:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                                projection_class_embeddings_input_dim=80,  # 6 * 8 time ids + 32 pooled
                                cross_attention_dim=64, norm_num_groups=32)
    vae = _vae()
    te = CLIPTextModel(_text_config(32))
    te2 = CLIPTextModelWithProjection(_text_config(32, projection_dim=32))
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=_tokenizer(),
                                     tokenizer_2=_tokenizer(), unet=unet, scheduler=_scheduler(),
                                     force_zeros_for_empty_prompt=False)
    return _finish(pipe)


def _t5(d_model: int):
    from transformers import T5Config, T5EncoderModel

    tok = _tokenizer()
    return T5EncoderModel(T5Config(vocab_size=len(tok), d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                   decoder_start_token_id=tok.pad_token_id)).eval()  # T5 has dropout


def _dit_vae() -> AutoencoderKL:
    # SD3 / FLUX VAEs shift and scale their latents and have no quant convs
    return AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         sample_size=32, shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False,
                         use_post_quant_conv=False)


def tiny_sd3(seed: int = 0):
    """SD3 layout: a 1-layer SD3Transformer2DModel (4 heads of 8), two CLIPs with projections, a T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=1, in_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=64, pooled_projection_dim=64, out_channels=4)
    te = CLIPTextModelWithProjection(_text_config(32, projection_dim=32))
    te2 = CLIPTextModelWithProjection(_text_config(32, projection_dim=32))
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=_dit_vae(), text_encoder=te, tokenizer=_tokenizer(), text_encoder_2=te2,
                                    tokenizer_2=_tokenizer(), text_encoder_3=_t5(64), tokenizer_3=_tokenizer())
    return _finish(pipe)


def tiny_flux(seed: int = 0):
    """FLUX layout: a FluxTransformer2DModel with 1 double- and 1 single-stream block (2 heads of 16) and a
    guidance embedding, a CLIP for the pooled vector and a T5; 4 latent channels packed 2x2 into 16."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=True)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                                max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    pipe = FluxPipeline(scheduler=scheduler, vae=_dit_vae(), text_encoder=CLIPTextModel(_text_config(32)),
                        tokenizer=_tokenizer(), text_encoder_2=_t5(32), tokenizer_2=_tokenizer(),
                        transformer=transformer)
    return _finish(pipe)


BUILDERS = {"sd1": tiny_sd1, "sd2": tiny_sd2_vpred, "sdxl": tiny_sdxl, "sd3": tiny_sd3, "flux": tiny_flux}


def run(pipe, prompt: str = "a photo of a cat", seed: int = 0, steps: int = 2) -> torch.Tensor:
    """Two denoising steps to a 32x32 image as a float tensor: enough to compare outputs exactly."""
    gen = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, generator=gen, output_type="pt", guidance_scale=5.0,
                height=32, width=32).images


UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
# every attention projection of SD3 / FLUX blocks, image and text stream (FLUX single blocks: to_q/k/v)
DIT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def make_patch(pipe, path, concept: str, seed: int = 1, rank: int = 4, alpha: float = 2.0, text: bool = True,
               scale: float = 0.3, method: str = "test", targets=None):
    """Write a random forget patch for `pipe` (alpha != rank on purpose) and leave `pipe` as it was.
    `targets`: the denoiser's LoRA targets (default: every attention projection)."""
    import json

    from peft import LoraConfig

    from patchforge.backbones import for_pipe
    from patchforge.io.saving import save_patch_from_pipeline

    name = f"_tmp_{seed}"
    torch.manual_seed(seed)
    models = for_pipe(pipe).models()
    denoiser = next(iter(models.values()))
    parts = [denoiser] + ([m for m in list(models.values())[1:]] if text else [])
    for model in parts:
        default = UNET_TARGETS if model is getattr(pipe, "unet", None) else DIT_TARGETS
        own = (targets or default) if model is denoiser else TEXT_TARGETS
        model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=own, init_lora_weights=False),
                          adapter_name=name)
        with torch.no_grad():  # random A and B of a size that visibly changes the outputs
            for n, p in model.named_parameters():
                if f"lora_B.{name}" in n or f"lora_A.{name}" in n:
                    p.normal_(0, scale)
    out = save_patch_from_pipeline(pipe, path, adapter_name=name, metadata={
        "patchforge.concept": concept, "patchforge.method": method,
        "patchforge.hyperparameters": json.dumps({"rank": rank, "alpha": alpha}),
        "patchforge.training_seconds": "1.5", "patchforge.device": "cpu"})
    pipe.delete_adapters(name)
    pipe.unload_lora_weights()
    return out


@functools.lru_cache(maxsize=None)
def cached_patches(arch: str, n: int = 3) -> tuple:
    """n random patches for BUILDERS[arch], written once per test session into a temp folder (removed
    when the session's process exits)."""
    import atexit
    import shutil
    import tempfile
    from pathlib import Path
    folder = Path(tempfile.mkdtemp(prefix=f"patches_{arch}_"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    pipe = BUILDERS[arch]()
    return tuple(make_patch(pipe, folder / f"p{i}.safetensors", f"concept {i}", seed=10 + i, rank=2 + i,
                            alpha=1.0 + i) for i in range(n))
