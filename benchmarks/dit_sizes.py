"""SD3.5-medium- and FLUX.1-sized pipelines with random weights, for benchmarks/bench_real_sizes.py.

The transformer, VAE and text-encoder configs are the released ones (stabilityai/stable-diffusion-3.5-medium,
black-forest-labs/FLUX.1-dev: transformer/config.json, vae/config.json; CLIP ViT-L/14, OpenCLIP bigG/14 and
T5 v1.1 XXL text towers). The tokenizers are patchforge's offline toy tokenizer (CLIP's 77-token length):
only which ids come out differs from the real BPE, and neither time nor memory depends on that.

`meta_facts()` counts parameters on PyTorch's meta device (no memory, no disk), so the memory plan of a
run can be printed on a machine that could never hold the model.
"""
from __future__ import annotations

from pathlib import Path

import torch

SD35_MEDIUM = dict(
    transformer=dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                     attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                     caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                     dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
    vae=dict(latent_channels=16, shift_factor=0.0609, scaling_factor=1.5305),
    clip=[dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
               projection_dim=768),
          dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
               projection_dim=1280)],
    shift=3.0)
FLUX1_DEV = dict(
    transformer=dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                     num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                     guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
    vae=dict(latent_channels=16, shift_factor=0.1159, scaling_factor=0.3611),
    clip=[dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12)],
    shift=3.0)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)
CONFIGS = {"sd35m": SD35_MEDIUM, "flux1": FLUX1_DEV}


def shrink_dit(cfg: dict) -> dict:
    """The same layout at toy widths (bench_real_sizes --tiny): checks the script, not the hardware."""
    t = dict(cfg["transformer"], num_layers=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32)
    if "num_single_layers" in t:
        t.update(num_single_layers=1, pooled_projection_dim=32, axes_dims_rope=(2, 2, 4))
    else:
        t.update(caption_projection_dim=16, pooled_projection_dim=64, dual_attention_layers=(0,), sample_size=32,
                 pos_embed_max_size=64)
    clip = [dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                 **({"projection_dim": 32} if "projection_dim" in c else {})) for c in cfg["clip"]]
    return dict(cfg, transformer=t, clip=clip, t5=dict(T5_XXL, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4),
                vae=dict(cfg["vae"], block_out_channels=(32, 32, 32, 32), norm_num_groups=32))


def _parts(arch: str, cfg: dict) -> dict:
    """The modules of the pipeline, built on the current default device and dtype."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    def clip(c):
        config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_act="gelu", **c)
        return (CLIPTextModelWithProjection if "projection_dim" in c else CLIPTextModel)(config)

    transformer = (SD3Transformer2DModel if arch == "sd35m" else FluxTransformer2DModel)(**cfg["transformer"])
    vae = AutoencoderKL(**{"in_channels": 3, "out_channels": 3, "block_out_channels": (128, 256, 512, 512),
                           "layers_per_block": 2, "down_block_types": ("DownEncoderBlock2D",) * 4,
                           "up_block_types": ("UpDecoderBlock2D",) * 4, "sample_size": 1024, "use_quant_conv": False,
                           "use_post_quant_conv": False, **cfg["vae"]})
    parts = {"transformer": transformer, "vae": vae, "text_encoder": clip(cfg["clip"][0])}
    if arch == "sd35m":
        parts["text_encoder_2"] = clip(cfg["clip"][1])
        parts["text_encoder_3"] = T5EncoderModel(T5Config(**cfg.get("t5", T5_XXL)))
    else:
        parts["text_encoder_2"] = T5EncoderModel(T5Config(**cfg.get("t5", T5_XXL)))
    return parts


def build_dit(arch: str, cfg: dict, out: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A random-weight pipeline folder (bf16 on disk, as both ship). Built on the GPU when there is one."""
    if (out / "model_index.json").exists():
        return out
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    from patchforge.toyworld.tokenizer import build_tokenizer

    tok = build_tokenizer()
    tok.model_max_length = 77
    torch.manual_seed(0)
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            parts = _parts(arch, cfg)
    finally:
        torch.set_default_dtype(before)
    if arch == "sd35m":
        pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=cfg["shift"]), tokenizer=tok,
                                        tokenizer_2=tok, tokenizer_3=tok, **parts)
    else:
        sched = FlowMatchEulerDiscreteScheduler(shift=cfg["shift"], use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
        pipe = FluxPipeline(scheduler=sched, tokenizer=tok, tokenizer_2=tok, **parts)
    pipe.save_pretrained(out)
    return out


def meta_facts(arch: str, cfg: dict):
    """plan.ModelFacts of the real-size pipeline, with parameters counted on the meta device and file
    sizes as bf16 weights (what the released checkpoints ship)."""
    from patchforge.backbones.flux import Flux
    from patchforge.backbones.sd3 import SD3
    from patchforge.backbones import release_defaults
    from patchforge.pipeline.plan import ModelFacts

    with torch.device("meta"):
        parts = _parts(arch, cfg)
    params = {c: sum(p.numel() for p in m.parameters()) for c, m in parts.items()}
    family = SD3 if arch == "sd35m" else Flux
    tcfg = dict(cfg["transformer"])
    name = family.family_from_config(tcfg)
    return ModelFacts(release_defaults(name).key, name, tcfg, params, {c: 2 * n for c, n in params.items()}, 1024,
                      8, family.resolution_multiple(tcfg, 8), joint_attention=True, backbone=family)
