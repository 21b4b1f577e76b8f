"""The world's detector: a small CenterNet (Zhou et al., "Objects as Points", 2019) for the world's shapes.

An image (RGB, resized to ``input_size`` x ``input_size``, normalised) goes through a few convolutions
down to a grid of stride 4. Per grid cell three heads predict:
- ``heatmap``: one logit per label; its sigmoid is the confidence that an object of that label has its
  box centre in the cell (trained towards a Gaussian around each true centre, focal loss);
- ``offset``: where in the cell the centre lies (x, y in cells, 0..1);
- ``size``: the box's width and height, in cells.
Decoding (:func:`decode`) keeps the cells that are the maximum of their 3 x 3 neighbourhood in their
label's heatmap (CenterNet's peak extraction), scores them by that heatmap, reads the box off the
offset and size heads, drops boxes that overlap a better one of any label (greedy NMS) and scales the
boxes to the input image's pixels.

Normalisation is GroupNorm (no statistics shared between images), and :meth:`WorldDetector.detect`
runs one image per forward pass, so an image's detections are bit-identical whatever batch it came in
(CPU convolution kernels are chosen by batch size, which changes the last bits of a batched forward).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from pipeline.models.detector import WORLD_DETECTOR_TYPE as MODEL_TYPE, Detection
from pipeline.world.scenes import SHAPES

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


@dataclass
class WorldDetectorConfig:
    labels: list[str] = field(default_factory=lambda: list(SHAPES))
    input_size: int = 64                        # pixels; every image is resized to it
    widths: tuple[int, ...] = (16, 32, 48, 48)  # stem (/2), conv (/2), conv (/4), dilated + plain convs (/4)
    groups: int = 8                             # GroupNorm groups
    head_width: int = 48
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)   # ImageNet normalisation, in [0, 1] units
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    peak_window: int = 3                        # peak extraction: maximum of its k x k neighbourhood
    max_detections: int = 10                    # candidates read off the heatmap per image
    nms_iou: float = 0.5                        # class-agnostic: a box overlapping a better one is dropped
    default_threshold: float = 0.3              # what training evaluated at (the tag stage sets its own)

    stride = 4                                  # not a field: two stride-2 convolutions (the backbone)

    @property
    def grid(self) -> int:
        return self.input_size // self.stride

    def to_json(self) -> dict:
        return {"model_type": MODEL_TYPE, **asdict(self), "stride": self.stride}

    @classmethod
    def from_json(cls, data: dict) -> "WorldDetectorConfig":
        if data.get("model_type") != MODEL_TYPE:
            raise ValueError(f"not a {MODEL_TYPE} config (model_type={data.get('model_type')!r})")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("widths", "mean", "std"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)


def conv(c_in: int, c_out: int, groups: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, padding=dilation, dilation=dilation, bias=False),
                         nn.GroupNorm(groups, c_out), nn.ReLU(inplace=True))


class WorldDetector(nn.Module):
    def __init__(self, config: WorldDetectorConfig):
        super().__init__()
        self.config = c = config
        w, g = c.widths, c.groups
        self.backbone = nn.Sequential(
            conv(3, w[0], g, stride=2),              # 64 -> 32
            conv(w[0], w[1], g),
            conv(w[1], w[2], g, stride=2),           # 32 -> 16: the output grid (stride 4)
            conv(w[2], w[3], g, dilation=2),         # receptive field ~35 px: a large shape and around it
            conv(w[3], w[3], g))

        def head(n_out: int) -> nn.Sequential:     # per cell (1 x 1): the backbone has seen around it
            return nn.Sequential(nn.Conv2d(w[3], c.head_width, 1), nn.ReLU(inplace=True),
                                 nn.Conv2d(c.head_width, n_out, 1))
        self.heatmap, self.offset, self.size = head(len(c.labels)), head(2), head(2)
        nn.init.constant_(self.heatmap[-1].bias, -2.19)     # sigmoid = 0.1: CenterNet's prior
        self.register_buffer("mean", torch.tensor(c.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(c.std).view(1, 3, 1, 1), persistent=False)

    @property
    def vocabulary(self) -> list[str]:
        return list(self.config.labels)

    @property
    def input_size(self) -> tuple[int, int]:
        return self.config.input_size, self.config.input_size

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """pixels [B, 3, S, S] in [0, 1] -> heatmap logits [B, C, G, G], offset [B, 2, G, G], size [B, 2, G, G]."""
        x = self.backbone((pixels - self.mean) / self.std)
        return {"heatmap": self.heatmap(x), "offset": self.offset(x), "size": self.size(x)}

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> [B, 3, S, S] in [0, 1], each resized (bilinear) to the input size."""
        s = self.config.input_size
        arrays = [np.asarray(im.convert("RGB").resize((s, s), Image.Resampling.BILINEAR)
                             if im.size != (s, s) else im.convert("RGB"), np.float32) for im in images]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0

    @torch.no_grad()
    def detect(self, images: Sequence[Image.Image], threshold: float) -> list[Detection]:
        """Per image: labels, scores and boxes (pixels of that image), highest score first."""
        device = next(self.parameters()).device
        detections = []
        for image, pixels in zip(images, self.pixels(images)):
            out = self(pixels[None].to(device))      # one image per pass: batch-independent to the bit
            detections.append(decode(torch.sigmoid(out["heatmap"][0]), out["offset"][0], out["size"][0],
                                     threshold, self.config, image.size))
        return detections


def decode(heat: torch.Tensor, offset: torch.Tensor, size: torch.Tensor, threshold: float,
           config: WorldDetectorConfig, image_size: tuple[int, int]) -> Detection:
    """One image's heads (heat [C, G, G] probabilities, offset and size [2, G, G] in cells) -> its
    detections in pixels of an image of ``image_size`` = (width, height), highest score first."""
    k = config.peak_window
    peaks = heat * (F.max_pool2d(heat[None], k, stride=1, padding=k // 2)[0] == heat)
    scores, index = peaks.flatten().topk(min(config.max_detections, peaks.numel()))
    keep = scores >= threshold
    scores, index = scores[keep], index[keep]
    grid_h, grid_w = heat.shape[1:]
    label, cell = index // (grid_h * grid_w), index % (grid_h * grid_w)
    gy, gx = cell // grid_w, cell % grid_w
    cx = (gx + offset[0, gy, gx]) * config.stride
    cy = (gy + offset[1, gy, gx]) * config.stride
    w, h = size[0, gy, gx].clamp(min=0) * config.stride, size[1, gy, gx].clamp(min=0) * config.stride
    width, height = image_size
    sx, sy = width / config.input_size, height / config.input_size
    boxes = torch.stack([((cx - w / 2) * sx).clamp(0, width), ((cy - h / 2) * sy).clamp(0, height),
                         ((cx + w / 2) * sx).clamp(0, width), ((cy + h / 2) * sy).clamp(0, height)], 1)
    chosen = nms(boxes, config.nms_iou)             # scores are sorted (topk): greedy in that order
    return Detection(labels=[config.labels[int(label[i])] for i in chosen],
                     scores=[float(scores[i]) for i in chosen],
                     boxes=[[float(v) for v in boxes[i]] for i in chosen])


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of boxes a [N, 4] with boxes b [M, 4] ([x0, y0, x1, y1]) -> [N, M]."""
    lt, rb = torch.maximum(a[:, None, :2], b[None, :, :2]), torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = lambda x: (x[:, 2:] - x[:, :2]).clamp(min=0).prod(-1)
    return inter / (area(a)[:, None] + area(b)[None, :] - inter).clamp(min=1e-9)


def nms(boxes: torch.Tensor, iou: float) -> list[int]:
    """Greedy NMS over boxes already sorted best first: the indices kept."""
    overlaps = box_iou(boxes, boxes)
    kept: list[int] = []
    for i in range(len(boxes)):
        if all(overlaps[i, j] <= iou for j in kept):
            kept.append(i)
    return kept


def save_world_detector(model: WorldDetector, out_dir: str | Path) -> Path:
    """``out_dir/model.safetensors`` (weights) and ``out_dir/config.json`` (model_type, labels, input size, arch)."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in sorted(model.state_dict().items())}
    save_file(state, out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(json.dumps(model.config.to_json(), indent=2) + "\n")
    return out


def load_world_detector(folder: str | Path, device: str = "cpu") -> WorldDetector:
    """The detector saved in ``folder`` (safetensors weights: nothing is unpickled), in eval mode."""
    from safetensors.torch import load_file
    folder = Path(folder)
    model = WorldDetector(WorldDetectorConfig.from_json(json.loads((folder / CONFIG_FILE).read_text())))
    model.load_state_dict(load_file(folder / WEIGHTS_FILE))
    return model.to(device).eval()
