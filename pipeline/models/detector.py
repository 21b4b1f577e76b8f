"""Object detector through transformers: DETR ResNet-50 in the paper profile, a small DETR offline.

Both go through ``DetrForObjectDetection`` + ``DetrImageProcessor.post_process_object_detection``.
A local folder whose ``config.json`` says ``model_type: synthcap-world-detector`` holds instead the
world's own shape detector (``pipeline.world.detector``), loaded behind the same interface.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch
from PIL import Image

from pipeline.models import CONFIG_DIR, local_model_type, missing_model_error, weights_sha256


def processor_input_size(processor) -> tuple[int, int] | None:
    """(s, s) for the shortest edge s an image processor resizes images to (its ``size`` is a dict or
    transformers' ``SizeDict``), or None when it has none."""
    size = getattr(processor, "size", None)
    edge = size.get("shortest_edge") if isinstance(size, dict) else getattr(size, "shortest_edge", None)
    return (int(edge), int(edge)) if edge else None


@dataclass
class Detection:
    labels: list[str]
    scores: list[float]
    boxes: list[list[float]]  # [x0, y0, x1, y1] in pixels of the input image, clipped to it


@dataclass
class Detector:
    model: torch.nn.Module
    processor: object
    identity: dict
    device: str = "cpu"

    @property
    def vocabulary(self) -> list[str]:
        """Every label the detector can emit (the tag vocabulary; 'N/A' placeholders left out)."""
        labels = self.model.config.id2label
        return sorted({name for name in labels.values() if name != "N/A"})

    @property
    def input_size(self) -> tuple[int, int] | None:
        """(s, s) for the processor's shortest input edge s: decoding a larger image below this scale
        (JPEG draft mode) loses nothing the detector sees."""
        return processor_input_size(self.processor)

    @torch.no_grad()
    def detect(self, images: Sequence[Image.Image], threshold: float) -> list[Detection]:
        """Per image: its labels, scores and boxes. One forward pass per image: in a batch, DETR's
        processor pads every image to the largest, and the padding reaches the others' features through
        the backbone's convolutions despite ``pixel_mask``; alone, a photo's tags depend on its bytes
        only, so ``tag.batch_size`` changes speed, never tags (the README's promise)."""
        return [self._detect_one(image.convert("RGB"), threshold) for image in images]

    def _detect_one(self, image: Image.Image, threshold: float) -> Detection:
        inputs = self.processor(images=[image], return_tensors="pt").to(self.device)
        outputs = self.model(**inputs)
        height, width = image.height, image.width
        r = self.processor.post_process_object_detection(outputs, threshold=threshold,
                                                         target_sizes=torch.tensor([[height, width]]))[0]
        id2label = self.model.config.id2label
        keep = [i for i, lab in enumerate(r["labels"].tolist()) if id2label[lab] != "N/A"]
        # DETR's boxes (centre +- half size) can overhang the image: clip them to it
        boxes = torch.minimum(r["boxes"].clamp(min=0), torch.tensor([width, height, width, height]))
        return Detection(labels=[id2label[r["labels"][i].item()] for i in keep],
                         scores=[float(r["scores"][i]) for i in keep],
                         boxes=[[float(v) for v in boxes[i]] for i in keep])


WORLD_DETECTOR_TYPE = "synthcap-world-detector"


@dataclass
class WorldShapeDetector:
    """The world's shape detector (``pipeline.world.detector.WorldDetector``) behind ``Detector``'s interface."""
    model: torch.nn.Module
    identity: dict
    device: str = "cpu"

    @property
    def vocabulary(self) -> list[str]:
        return list(self.model.vocabulary)

    @property
    def input_size(self) -> tuple[int, int]:
        return self.model.input_size

    def detect(self, images: Sequence[Image.Image], threshold: float) -> list[Detection]:
        return self.model.detect(images, threshold)


def _build_small(name: str, seed: int):
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor, ResNetConfig

    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no configuration for detector {name!r} at {path}")
    cfg = json.loads(path.read_text())
    id2label = {int(k): v for k, v in cfg["id2label"].items()}
    config = DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False,
                        backbone_config=ResNetConfig(**cfg["backbone"]), id2label=id2label,
                        label2id={v: k for k, v in id2label.items()}, **cfg["detr"])
    torch.manual_seed(seed)
    return DetrForObjectDetection(config), DetrImageProcessor(**cfg["image_processor"])


def load_detector(name: str, pretrained: str | None = None, seed: int = 0,
                  device: str = "cpu") -> Detector | WorldShapeDetector:
    """DETR from a model id / local folder, or the small one built from config with ``seed``; the world's
    shape detector from a local folder that holds one (safetensors weights, nothing unpickled)."""
    if local_model_type(pretrained) == WORLD_DETECTOR_TYPE:
        from pipeline.world.detector import load_world_detector     # only this path pays for the import
        model = load_world_detector(pretrained, device)
        identity = {"kind": "detector", "name": name, "pretrained": pretrained, "seed": None,
                    "weights_sha256": weights_sha256(model)}
        return WorldShapeDetector(model, identity, device)
    if pretrained is None:
        model, processor = _build_small(name, seed)
    else:
        from transformers import DetrForObjectDetection, DetrImageProcessor
        try:
            model = DetrForObjectDetection.from_pretrained(pretrained)
            processor = DetrImageProcessor.from_pretrained(pretrained)
        except Exception as err:
            raise missing_model_error("detector", name, pretrained, err) from err
    model = model.to(device).eval()
    identity = {"kind": "detector", "name": name, "pretrained": pretrained,
                "seed": seed if pretrained is None else None, "weights_sha256": weights_sha256(model)}
    return Detector(model, processor, identity, device)


@lru_cache(maxsize=2)
def detector_for(name: str, pretrained: str | None, seed: int, device: str) -> Detector | WorldShapeDetector:
    """``load_detector``, once per process and configuration (shard functions ask by configuration)."""
    return load_detector(name, pretrained, seed=seed, device=device)
