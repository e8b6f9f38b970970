"""Backbones: the one place that knows how a model family's denoiser is built and called.

Everything else in patchforge -- methods, the training loop, the patch file, loading, evaluation and
attacks -- asks a Backbone, never the pipeline's denoiser directly. A family is one module here with a
class that implements the protocol below and registers itself with @register; `for_pipe(pipe)` picks
the first registered family whose `matches(pipe)` is true.

    denoiser_name      the pipeline attribute of the denoiser ("unet" or "transformer")
    components         the LoRA-carrying components a patch may hold, denoiser first
    TARGETS            LoRA target patterns by key: text-attention K/V, text attention, K/V plus the
                       pooled projection (below), the layers that read the text encoders' output
                       ("text-in": the K/V in a UNet, the two input projections in SD3 / FLUX), none
    encode()           prompts -> Cond (the pipeline's own prompt encoding)
    add_noise()        x0, noise, t -> x_t (the forward process the family was trained with)
    noised()           x0, a seeded generator -> (x_t, t, noise) at random timesteps
    training_target()  what the denoiser predicts: epsilon, v, or a flow-matching velocity
    sampler()          a fresh scheduler set to N steps, for sampling by hand (attacks)
    guidance_distilled True when sampling runs no classifier-free pair (FLUX.1-dev's guidance embedding)
    predict()          the denoiser call, with every extra input the family needs
    text_attention()   the attention blocks that read the text (what attention-hooking methods hook)
    text_kv()          their key/value projections (what closed-form and keep terms act on)
    text_kv_reads_text True when text_kv() reads the text encoder's output itself (UNet cross-attention);
                       False in joint attention, where they read the transformer's own text stream
    pooled_text_in()   the layers that read the prompt's pooled embedding itself (SD3 / FLUX: its projection
                       into the timestep embedding; none in SD 1.x / 2.x); on the DiT toy the object is drawn
                       from there, not from the tokens
    token_parts()      the encoders' parts of that token sequence, in order (where a prefix sits in each)
    token_text_in()    the layer that projects the prompt's tokens into a transformer's text stream (SD3 /
                       FLUX: context_embedder; none where text_kv() reads the tokens themselves)
    attention_recorder() an attention processor for text_attention() that records the mass image
                       queries put on the concept's text columns (FMN)
    concept_mask()     prompts, words -> (prompts, text tokens) mask of the concept's columns
    family_name()      the readable family written into patch metadata
    folder_family()    (family name, denoiser config) of a diffusers folder of this family, else None

Families: sd_unet.py (SD 1.x / 2.x / XL), sd3.py (SD3 / SD3.5), flux.py (FLUX.1); a new family is a new
module beside them, see docs/architecture.md.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ..errors import PatchforgeError

if TYPE_CHECKING:
    import torch

FAMILIES: list[type] = []
_discovered: list[bool] = []


@dataclass(frozen=True)
class FamilyDefaults:
    """A release family's training defaults (a family module's RELEASES maps family names to these)."""
    key: str  # the defaults' name: "sd1", "sdxl", "flux"...; "toy" for every model that is no release
    resolution: int | None  # training / reference pixels; None: the checkpoint's own size
    batch_gpu: int
    batch_cpu: int
    ref_images: int | None  # None: the method's own n_refs


TOY_FAMILY = "toy"  # every model that is no SD release: the embedded toy and the tests' tiny pipelines
# what every toy result was measured with: do not change it
TOY_DEFAULTS = FamilyDefaults(TOY_FAMILY, None, 8, 8, None)


def release_defaults(name: str) -> FamilyDefaults:
    """The defaults of the release family `name` ("sd1.x", "flux.1-dev"...); TOY_DEFAULTS for any other."""
    _discover()
    return next((cls.RELEASES[name] for cls in FAMILIES if name in getattr(cls, "RELEASES", {})), TOY_DEFAULTS)


@dataclass
class Cond:
    """What a denoiser is conditioned on, whatever the family: token embeddings (+ the pooled embedding of
    families that also condition on one, e.g. SDXL)."""
    emb: torch.Tensor
    pooled: torch.Tensor | None = None

    def __len__(self):
        return self.emb.shape[0]

    @staticmethod
    def cat(conds: list[Cond]) -> Cond:
        """One batch from several (methods run target and preserve rows in one denoiser call)."""
        import torch

        pooled = None if conds[0].pooled is None else torch.cat([c.pooled for c in conds])
        return Cond(torch.cat([c.emb for c in conds]), pooled)


class Backbone(Protocol):
    """What every family module implements (sd_unet.SDUNet is the reference)."""
    denoiser_name: str  # the pipeline attribute of the denoiser
    components: tuple[str, ...]  # LoRA-carrying pipeline attributes, denoiser first
    TARGETS: dict[str, str | None]  # "xattn", "xattn-kv", "xattn-kv+pooled", "text-in", "none" -> peft target regex

    def __init__(self, pipe) -> None: ...

    @classmethod
    def matches(cls, pipe) -> bool: ...

    @property
    def denoiser(self) -> torch.nn.Module: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def text_encoders(self) -> list: ...

    def prompt_encoders(self) -> list: ...

    def models(self) -> dict[str, torch.nn.Module]: ...

    def target_pattern(self, key: str | None) -> str | None: ...

    def text_attention(self) -> list[tuple[str, torch.nn.Module]]: ...

    def text_kv(self) -> list[tuple[str, torch.nn.Module]]: ...

    def native_size(self) -> int: ...

    text_kv_reads_text: bool

    def pooled_text_in(self) -> list[tuple[str, torch.nn.Module]]: ...

    def token_text_in(self) -> list[tuple[str, torch.nn.Module]]: ...

    def token_parts(self) -> list[tuple[object, int | None]]: ...

    def attention_recorder(self): ...

    def concept_mask(self, prompts: list[str], words: list[str]) -> torch.Tensor: ...

    def family_name(self) -> str: ...

    @classmethod
    def folder_family(cls, folder) -> tuple[str, dict] | None: ...

    @staticmethod
    def resolution_multiple(config: dict, vae_scale: int) -> int: ...

    @staticmethod
    def folder_native(folder, config: dict, vae_scale: int) -> int: ...

    def encode(self, prompts: list[str], device) -> Cond: ...

    def num_timesteps(self) -> int: ...

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def noised(self, x0: torch.Tensor, generator: torch.Generator): ...

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    guidance_distilled: bool

    def sampler(self, steps: int, latents: torch.Tensor): ...

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, size: int | None = None) -> torch.Tensor: ...

    def encode_images(self, images) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor): ...

    def load_lora(self, state_dict: dict, adapter_name: str, metadata: dict, components) -> None: ...


class PipelineParts:
    """The members every family spells the same way, from its `denoiser_name` and `components`."""
    denoiser_name: str
    components: tuple[str, ...]
    TARGETS: dict[str, str | None]

    def __init__(self, pipe):
        self.pipe = pipe

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_name)

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    def text_encoders(self) -> list:
        """The LoRA-carrying text encoders this pipeline has (components after the denoiser)."""
        return [getattr(self.pipe, c) for c in self.components[1:] if getattr(self.pipe, c, None) is not None]

    def prompt_encoders(self) -> list:
        """(tokenizer, text encoder) pairs every prompt goes through, LoRA-carrying or not (FLUX's and SD3's
        T5 too): where soft tokens (patchforge/core/soft_tokens.py) enter the prompt."""
        pairs = [(getattr(self.pipe, f"tokenizer{s}", None), getattr(self.pipe, f"text_encoder{s}", None))
                 for s in ("", "_2", "_3")]
        return [(tok, te) for tok, te in pairs if tok is not None and te is not None]

    def models(self) -> dict[str, torch.nn.Module]:
        """component name -> module, for the components this pipeline has."""
        return {c: getattr(self.pipe, c) for c in self.components if getattr(self.pipe, c, None) is not None}

    def target_pattern(self, key: str | None) -> str | None:
        """A TARGETS key, or a peft regex passed through."""
        return self.TARGETS.get(key, key) if key else None

    def pooled_text_in(self) -> list[tuple[str, torch.nn.Module]]:
        """No layer reads a pooled prompt embedding (families that have one override this)."""
        return []

    def token_parts(self) -> list[tuple[object, int | None]]:
        """The token sequence encode() returns, part by part along the token axis: (the tokenizer of the prompt
        encoder that wrote it, its length; None: to the end). SD 1.x / 2.x / XL: one CLIP sequence (SDXL's two
        CLIPs share the positions, joined on the feature axis)."""
        return [(self.pipe.tokenizer, None)]

    def token_text_in(self) -> list[tuple[str, torch.nn.Module]]:
        """No layer projects the prompt's tokens before text_kv() reads them (UNet cross-attention reads the
        text encoder's output itself; the transformer families override this)."""
        return []

    # ---- images <-> latents through the VAE (SD3's and FLUX's VAEs shift their latents, SD's do not)
    def encode_images(self, images) -> torch.Tensor:
        """uint8 images (N, H, W, 3) -> clean latents (VAE mean, shifted and scaled), 8 at a time."""
        import torch

        vae = self.pipe.vae
        x = torch.as_tensor(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)
        with torch.no_grad():
            lat = torch.cat([vae.encode(x[i:i + 8].to(vae.device, vae.dtype)).latent_dist.mean
                             for i in range(0, len(x), 8)])
        return (lat - self._vae_shift()) * vae.config.scaling_factor

    def decode(self, latents: torch.Tensor):
        """Clean latents -> uint8 images (N, H, W, 3) as a numpy array."""
        import torch

        vae = self.pipe.vae
        with torch.no_grad():
            out = vae.decode((latents / vae.config.scaling_factor + self._vae_shift()).to(vae.dtype)).sample
        return ((out.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()

    def _vae_shift(self) -> float:
        return getattr(self.pipe.vae.config, "shift_factor", None) or 0.0


def register(cls):
    FAMILIES.append(cls)
    return cls


def _discover() -> None:
    """Import every family module once (each registers itself): a new family is one new file."""
    if not _discovered:
        # the reference family first: all_components() keeps its order (unet, text_encoder, text_encoder_2),
        # which patch files and their base-architecture hashes were written in
        names = sorted((m.name for m in pkgutil.iter_modules(__path__)), key=lambda n: (n != "sd_unet", n))
        for name in names:
            importlib.import_module(f"{__name__}.{name}")
        _discovered.append(True)


def backbone_class(pipe):
    """The Backbone class serving this pipeline."""
    _discover()
    for cls in FAMILIES:
        if cls.matches(pipe):
            return cls
    raise PatchforgeError(f"patchforge does not support {type(pipe).__name__} pipelines yet "
                          f"(families: {', '.join(c.__name__ for c in FAMILIES)})")


def for_pipe(pipe):
    """A Backbone bound to this pipeline."""
    return backbone_class(pipe)(pipe)


def all_components() -> tuple[str, ...]:
    """Every component name any family's patches may carry (the patch file's allowed prefixes)."""
    _discover()
    return tuple(dict.fromkeys(c for cls in FAMILIES for c in cls.components))


def backbone_for_folder(folder):
    """(Backbone class, family name, denoiser config) of a diffusers folder, read from its configs
    without loading anything; None when no family recognises it."""
    _discover()
    for cls in FAMILIES:
        found = cls.folder_family(folder)
        if found:
            return cls, *found
    return None


def concept_token_mask(tokenizer, prompts: list[str], words: list[str], length: int | None = None) -> torch.Tensor:
    """(len(prompts), length) float mask of the token positions spelling any of `words`, as `tokenizer`
    pads prompts to `length` (default: its model_max_length)."""
    import torch

    length = length or tokenizer.model_max_length
    ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True).input_ids
    pieces = {tuple(tokenizer(w, add_special_tokens=False).input_ids) for w in words for w in (w, w.lower())}
    mask = torch.zeros(len(prompts), length)
    for row, seq in enumerate(ids):
        for piece in filter(None, pieces):
            for i in range(len(seq) - len(piece) + 1):
                if tuple(seq[i:i + len(piece)]) == piece:
                    mask[row, i:i + len(piece)] = 1.0
    return mask


def family_components() -> list[tuple[str, ...]]:
    """Each family's LoRA-carrying components: a patch's components must all belong to one of them."""
    _discover()
    return [cls.components for cls in FAMILIES]


def text_components() -> tuple[str, ...]:
    """The text-encoder components of every family (module names are stored with a text prefix)."""
    _discover()
    return tuple(dict.fromkeys(c for cls in FAMILIES for c in cls.components if c != cls.denoiser_name))
