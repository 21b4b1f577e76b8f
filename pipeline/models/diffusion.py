"""Text-to-image through diffusers: Stable Diffusion v1-5 in the paper profile, a small one offline.

The pipeline is diffusers' own ``StableDiffusionPipeline`` in both cases; the small one is assembled
from configuration (``configs/synthcap-tiny-sd.json``) with seeded weights and a CLIP tokenizer whose
vocabulary is built offline from open_clip's bundled BPE (the same BPE as CLIP's).
"""
from __future__ import annotations

import gzip
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from pipeline.models import CONFIG_DIR, missing_model_error, weights_sha256

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


def clip_tokenizer_from_open_clip(folder: Path):
    """A transformers CLIPTokenizer whose vocab.json/merges.txt are rebuilt from open_clip's BPE file."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    byte_symbols = list(bytes_to_unicode().values())
    vocab = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77,
                         pad_token="<|endoftext|>")


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
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = clip_tokenizer_from_open_clip(Path(tmp))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return pipe, cfg["resolution"]


def load_text_to_image(name: str, pretrained: str | None = None, seed: int = 0, device: str = "cpu",
                       precision: str = "fp32", resolution: int | None = None) -> TextToImage:
    """diffusers pipeline from a model id / local folder, or the small one built from config with ``seed``."""
    if pretrained is None:
        pipe, default_resolution = _build_small(name, seed)
    else:
        from diffusers import StableDiffusionPipeline
        try:
            pipe = StableDiffusionPipeline.from_pretrained(
                pretrained, torch_dtype=DTYPES[precision], safety_checker=None, requires_safety_checker=False)
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
