"""Text-to-image through diffusers: Stable Diffusion v1-5 in the paper profile, a small one offline.

The pipeline is diffusers' own ``StableDiffusionPipeline`` in both cases; the small one is assembled
from configuration (``configs/synthcap-tiny-sd.json``) with seeded weights and a CLIP tokenizer whose
vocabulary is built offline from open_clip's bundled BPE (pipeline/models/bpe.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch
from PIL import Image

from pipeline.models import CONFIG_DIR, local_model_type, missing_model_error, weights_sha256
from pipeline.models.bpe import clip_bpe_tokenizer

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TextToImage:
    pipe: object  # diffusers.StableDiffusionPipeline
    identity: dict
    resolution: int

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], steps: int,
                 guidance_scale: float) -> list[Image.Image]:
        """One image per prompt; image i depends only on (prompt i, seed i), not on the batch."""
        device = self.pipe.device
        generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        out = self.pipe(list(prompts), num_inference_steps=steps, guidance_scale=guidance_scale,
                        height=self.resolution, width=self.resolution, generator=generators,
                        output_type="pil")
        return list(out.images)


def _build_small(name: str, seed: int):
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no configuration for text-to-image model {name!r} at {path}")
    cfg = json.loads(path.read_text())
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfg["unet"])
    vae = AutoencoderKL(**cfg["vae"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    scheduler = PNDMScheduler.from_config({k: v for k, v in cfg["scheduler"].items() if k != "_class_name"})
    tokenizer = clip_bpe_tokenizer()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return pipe, cfg["resolution"]


def load_text_to_image(name: str, pretrained: str | None = None, seed: int = 0, device: str = "cpu",
                       precision: str = "fp32", resolution: int | None = None) -> TextToImage:
    """diffusers pipeline from a model id / local folder, or the small one built from config with ``seed``;
    a world text-to-image folder (pipeline/world/text_to_image.py) loads as the world's model."""
    from pipeline.world.text_to_image import MODEL_TYPE as WORLD_TEXT_TO_IMAGE, load_world_text_to_image
    if local_model_type(pretrained) == WORLD_TEXT_TO_IMAGE:
        return load_world_text_to_image(name, pretrained)
    if pretrained is None:
        pipe, default_resolution = _build_small(name, seed)
    else:
        from diffusers import StableDiffusionPipeline
        try:
            pipe = StableDiffusionPipeline.from_pretrained(
                pretrained, dtype=DTYPES[precision], safety_checker=None, requires_safety_checker=False)
        except Exception as err:
            raise missing_model_error("diffusion", name, pretrained, err) from err
        default_resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    if pretrained is None and precision != "fp32":  # from_pretrained already loaded the requested dtype
        pipe = pipe.to(dtype=DTYPES[precision])
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    resolution = resolution or default_resolution
    components = torch.nn.ModuleDict({"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder})
    identity = {"kind": "text_to_image", "name": name, "pretrained": pretrained,
                "seed": seed if pretrained is None else None, "weights_sha256": weights_sha256(components),
                "scheduler": pipe.scheduler.__class__.__name__, "image_size": [resolution, resolution],
                "dtype": precision}
    return TextToImage(pipe, identity, resolution)


@lru_cache(maxsize=2)
def text_to_image_for(name: str, pretrained: str | None, seed: int, precision: str, device: str,
                      resolution: int | None) -> TextToImage:
    """``load_text_to_image``, once per process and configuration (shard functions ask by configuration)."""
    return load_text_to_image(name, pretrained, seed=seed, device=device, precision=precision, resolution=resolution)
