"""Training the world's detector (``pipeline.world.detector``) on photo-style renderings of random scenes.

Scenes come from ``world_rng(seed, "detector")`` (``sample_scene``), are drawn in the photo style (or,
with probability ``synthetic_share``, drawn from the stream ``world_rng(seed, "detector-styles")``, in
the synthetic style), and each object's target is its ``object_box`` and shape. The synthetic share
stands in for what a COCO-trained DETR does on Stable Diffusion images, which SynTIC's AF and CMSA's
entities rely on: it still finds their objects, though it never trained on them. A small detector
trained on photos alone does not (label F1 0.45 on synthetic images against 0.97 on photos), so the
methods would learn from tags of synthetic images that are mostly wrong and then read good tags of
photos at inference. Training is CenterNet's: a focal loss on the
label heatmaps (a Gaussian around each box centre's cell), L1 on the centre offset and box size at the
centre cells; horizontal flips as augmentation (every shape is mirror-symmetric). Everything random is
drawn from ``seed`` and training runs on CPU threads it is given, so a seed gives the same weights.

Evaluation on ``heldout`` scenes of ``world_rng(seed, "detector-heldout")``, drawn in both styles:
- per image, the set of labels detected against the set of shapes in the scene: true positives, false
  positives and false negatives summed over images (micro-averaged precision / recall / F1);
- boxes: each detection, best first, is matched to the unmatched true box of its label it overlaps
  most; the mean IoU of the matched pairs.
With no synthetic training image (``synthetic_share`` 0), the synthetic numbers are the detector's
domain gap.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pipeline.models import weights_sha256
from pipeline.models.detector import Detection
from pipeline.world.detector import (WorldDetector, WorldDetectorConfig, box_iou, save_world_detector)
from pipeline.world.render import draw_styles, object_box, render_scenes
from pipeline.world.scenes import Scene, sample_scene, world_rng

THRESHOLDS = (0.2, 0.3, 0.4, 0.5)    # the held-out label F1 is also reported at these


# ---------------------------------------------------------------------------------------------- data

def draw_scenes(seed: int, purpose: str, n: int) -> list[Scene]:
    rng = world_rng(seed, purpose)
    return [sample_scene(rng) for _ in range(n)]


def render_pixels(scenes: list[Scene], style: str | list[str], size: int) -> torch.Tensor:
    """[N, 3, size, size] uint8 renderings of ``scenes`` in ``style`` (one for all, or one per scene)."""
    styles = [style] * len(scenes) if isinstance(style, str) else style
    images = render_scenes(scenes, size, styles=styles)
    return torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).contiguous()


def scene_targets(scene: Scene, config: WorldDetectorConfig, flip: bool = False) -> dict[str, torch.Tensor]:
    """One image's training targets on the output grid: heatmap [C, G, G] (a Gaussian peaking at 1 on each
    box centre's cell), offset and size [2, G, G] (cells) and mask [G, G] (1 on the centre cells)."""
    s, g, stride = config.input_size, config.grid, config.stride
    heat = torch.zeros(len(config.labels), g, g)
    offset, size, mask = torch.zeros(2, g, g), torch.zeros(2, g, g), torch.zeros(g, g)
    ys, xs = torch.meshgrid(torch.arange(g, dtype=torch.float32), torch.arange(g, dtype=torch.float32), indexing="ij")
    for o in scene.objects:
        x0, y0, x1, y1 = object_box(o, s)
        if flip:
            x0, x1 = s - x1, s - x0
        cx, cy, w, h = (x0 + x1) / 2 / stride, (y0 + y1) / 2 / stride, (x1 - x0) / stride, (y1 - y0) / stride
        gx, gy = min(int(cx), g - 1), min(int(cy), g - 1)
        sigma = max(0.5, max(w, h) / 6)
        c = config.labels.index(o.shape)
        heat[c] = torch.maximum(heat[c], torch.exp(-((xs - gx) ** 2 + (ys - gy) ** 2) / (2 * sigma ** 2)))
        offset[:, gy, gx] = torch.tensor([cx - gx, cy - gy])
        size[:, gy, gx] = torch.tensor([w, h])
        mask[gy, gx] = 1
    return {"heatmap": heat, "offset": offset, "size": size, "mask": mask}


def stack_targets(scenes: list[Scene], config: WorldDetectorConfig, flip: bool) -> dict[str, torch.Tensor]:
    per_image = [scene_targets(s, config, flip) for s in scenes]
    return {k: torch.stack([t[k] for t in per_image]) for k in per_image[0]}


# ---------------------------------------------------------------------------------------------- loss

def focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss (alpha 2, beta 4), summed, over the number of objects."""
    p = torch.sigmoid(logits)
    pos = target.eq(1).float()
    pos_loss = F.logsigmoid(logits) * (1 - p) ** 2 * pos
    neg_loss = F.logsigmoid(-logits) * p ** 2 * (1 - target) ** 4 * (1 - pos)
    return -(pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp(min=1)


def detector_loss(out: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
                  size_weight: float = 0.1) -> tuple[torch.Tensor, dict[str, float]]:
    mask = targets["mask"][:, None]
    n = mask.sum().clamp(min=1)
    heat = focal_loss(out["heatmap"], targets["heatmap"])
    offset = ((out["offset"] - targets["offset"]).abs() * mask).sum() / n
    size = ((out["size"] - targets["size"]).abs() * mask).sum() / n
    total = heat + offset + size_weight * size
    return total, {"heat": heat.item(), "offset": offset.item(), "size": size.item()}


# ---------------------------------------------------------------------------------------------- metrics

def label_prf(predicted: list[set[str]], truth: list[set[str]]) -> dict:
    """Per image the label set found against the true one; counts summed over images (micro-average)."""
    tp = sum(len(p & t) for p, t in zip(predicted, truth))
    fp = sum(len(p - t) for p, t in zip(predicted, truth))
    fn = sum(len(t - p) for p, t in zip(predicted, truth))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


def matched_ious(detection: Detection, labels: list[str], boxes: list[list[float]]) -> list[float]:
    """Each detection (best first) takes the unmatched true box of its label it overlaps most (IoU > 0)."""
    free = set(range(len(boxes)))
    ious = []
    for label, box in zip(detection.labels, detection.boxes):
        candidates = [j for j in free if labels[j] == label]
        if not candidates:
            continue
        overlap = box_iou(torch.tensor([box]), torch.tensor([boxes[j] for j in candidates]))[0]
        best = int(overlap.argmax())
        if overlap[best] > 0:
            free.remove(candidates[best])
            ious.append(float(overlap[best]))
    return ious


def evaluate(model: WorldDetector, scenes: list[Scene], pixels: torch.Tensor, threshold: float,
             thresholds: tuple[float, ...] = THRESHOLDS) -> dict:
    """Label P/R/F1 and matched-box mean IoU at ``threshold``; label F1 at each of ``thresholds``."""
    from PIL import Image
    images = [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]
    lowest = min(threshold, *thresholds)
    detections = model.detect(images, lowest)      # a higher threshold keeps a subset of these (same NMS)
    truth = [s.shapes() for s in scenes]

    def above(t: float) -> list[Detection]:
        keep = [[i for i, s in enumerate(d.scores) if s >= t] for d in detections]
        return [Detection([d.labels[i] for i in k], [d.scores[i] for i in k], [d.boxes[i] for i in k])
                for d, k in zip(detections, keep)]

    found = above(threshold)
    size = model.config.input_size
    ious = [iou for d, s in zip(found, scenes)
            for iou in matched_ious(d, [o.shape for o in s.objects], [object_box(o, size) for o in s.objects])]
    return {"threshold": threshold, **label_prf([set(d.labels) for d in found], truth),
            "box_mean_iou": float(np.mean(ious)) if ious else None, "boxes_matched": len(ious),
            "objects": sum(len(s.objects) for s in scenes),
            "f1_by_threshold": {str(t): round(label_prf([set(d.labels) for d in above(t)], truth)["f1"], 4)
                                for t in thresholds}}


# ---------------------------------------------------------------------------------------------- training

def fit_world_detector(*, seed: int, images: int, epochs: int, batch_size: int, lr: float, heldout: int,
                       image_size: int = 64, threads: int = 1, threshold: float | None = None,
                       weight_decay: float = 1e-4, synthetic_share: float = 0.0,
                       progress: bool = True) -> tuple[WorldDetector, dict]:
    """Train a detector on ``images`` scenes, photo-style but for ``synthetic_share`` of them (module
    docstring); evaluate it on ``heldout`` scenes in both styles. -> (the model in eval mode, a report).

    ``threads``: torch's intra-op threads while training (restored after). One is the default: on a
    shared 2-core machine two threads of a model this small wait on each other (4-5x slower under load).
    The weights depend on it (reduction order): a seed gives the same weights at the same ``threads``.
    ``threshold``: the score threshold of the report and the config's ``default_threshold`` (None: 0.3)."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        config = WorldDetectorConfig(input_size=image_size)
        if threshold is not None:
            config.default_threshold = threshold
        started = time.perf_counter()
        scenes = draw_scenes(seed, "detector", images)
        styles = draw_styles(world_rng(seed, "detector-styles"), images, synthetic_share)
        pixels = render_pixels(scenes, styles, image_size)
        targets = [stack_targets(scenes, config, flip) for flip in (False, True)]
        rendered = time.perf_counter()

        torch.manual_seed(seed)
        model = WorldDetector(config)
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        steps = epochs * ((images + batch_size - 1) // batch_size)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
        model.train()
        bar = tqdm(total=steps, desc="  world detector", unit="step", disable=not progress, leave=False)
        history = []                                   # mean loss of each epoch
        for epoch in range(epochs):
            losses = []
            order = torch.randperm(images, generator=generator)
            flips = torch.rand(images, generator=generator) < 0.5
            for start in range(0, images, batch_size):
                idx = order[start:start + batch_size]
                flip = flips[idx]
                x = pixels[idx].float() / 255
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
                batch = {k: torch.where(flip.view(-1, *[1] * (v.dim() - 1)), targets[1][k][idx], v[idx])
                         for k, v in targets[0].items()}
                loss, _ = detector_loss(model(x), batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update()
                losses.append(loss.item())
                bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.3f}")
            history.append(round(float(np.mean(losses)), 4))
        bar.close()
        model.eval()
        trained = time.perf_counter()

        held = draw_scenes(seed, "detector-heldout", heldout)
        report_threshold = config.default_threshold
        photo = evaluate(model, held, render_pixels(held, "photo", image_size), report_threshold)
        synthetic = evaluate(model, held, render_pixels(held, "synthetic", image_size), report_threshold)
        done = time.perf_counter()
    finally:
        torch.set_num_threads(previous_threads)
    report = {
        "model_type": config.to_json()["model_type"], "labels": list(config.labels), "seed": seed,
        "images": images, "synthetic_images": styles.count("synthetic"), "synthetic_share": synthetic_share,
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
        "heldout": heldout, "image_size": image_size, "threads": threads, "threshold": report_threshold,
        "parameters": sum(p.numel() for p in model.parameters()), "weights_sha256": weights_sha256(model),
        "epoch_loss": history, "heldout_photo": photo, "heldout_synthetic": synthetic,
        "seconds": {"render": round(rendered - started, 2), "train": round(trained - rendered, 2),
                    "evaluate": round(done - trained, 2), "total": round(done - started, 2)},
    }
    return model, report


def train_world_detector(out_dir: str | Path, *, seed: int, images: int, epochs: int, batch_size: int, lr: float,
                         heldout: int, image_size: int = 64, threads: int = 1, threshold: float | None = None,
                         synthetic_share: float = 0.0, progress: bool = True) -> dict:
    """Train (``fit_world_detector``), save ``out_dir/model.safetensors`` + ``out_dir/config.json``
    (``load_detector(name, pretrained=out_dir)`` loads it) and return the report."""
    model, report = fit_world_detector(seed=seed, images=images, epochs=epochs, batch_size=batch_size, lr=lr,
                                       heldout=heldout, image_size=image_size, threads=threads,
                                       threshold=threshold, synthetic_share=synthetic_share, progress=progress)
    save_world_detector(model, out_dir)
    return report


if __name__ == "__main__":     # a quick look: python -m pipeline.world.detector_training OUT_DIR
    import sys
    print(json.dumps(train_world_detector(sys.argv[1] if len(sys.argv) > 1 else "/tmp/world-detector", seed=0,
                                          images=1500, epochs=8, batch_size=32, lr=3e-3, heldout=300), indent=2))
