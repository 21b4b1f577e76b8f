"""The world's CLIP: an open_clip model trained contrastively on the world's "web" pairs.

No pretrained CLIP can be downloaded here, so the world trains its own stand-in, saved as one
``model.safetensors`` that the ordinary loader reads back as pretrained weights::

    load_clip("synthcap-world-rn", pretrained=str(out_dir / "model.safetensors"))

- Data: ``pairs`` scenes from ``world_rng(seed, "clip")`` (``sample_scene``), each rendered once in the
  photo style, or with probability ``synthetic_share`` (stream ``world_rng(seed, "clip-styles")``) in the
  synthetic style: real CLIP's web data holds renders and clip art beside photos, so it reads a Stable
  Diffusion image's content although the image sits apart from photos in its feature space; a CLIP
  that never saw the synthetic style would not (the photo-only world CLIP reads a synthetic image's
  colour at little above chance). Each image is passed through the model's own open_clip
  ``preprocess`` (the function the encode stages apply to PIL images), cached as tensors. With
  ``shape_twins``, half of them are the other half's shape twins (``scenes.shape_twin``: the same
  picture with other shapes), and each pair of twins shares a batch: hard negatives (as NegCLIP's) that
  colour alone cannot tell apart, without which a small CLIP learns colours and barely shapes. Every
  epoch gives each scene a fresh caption (``describe``) from the stream ``world_rng(seed,
  "clip-captions")``: the grammar's phrasings, synonyms and group orders vary, so the text tower sees
  one scene phrased many ways.
- Training: the symmetric InfoNCE loss with the model's learnable ``logit_scale`` (clamped to ln 100 as
  open_clip does), AdamW (weight decay on matrices only, open_clip's rule), linear warm-up then cosine
  decay to zero. Deterministic for a given seed and thread count (batches from
  ``world_rng(seed, "clip-order")``, weights from ``torch.manual_seed(seed)``).
- Evaluation: zero-shot retrieval on ``heldout`` pairs from ``world_rng(seed, "clip-heldout")`` (each
  scene followed by its one caption in that stream): image->text and text->image R@1/5/10 by
  :func:`retrieval_recall`, after every epoch (the report's ``history``) and at the end (photo style);
  :func:`attribute_probe`: zero-shot shape and colour of single objects, in both styles;
  :func:`binding_probe`: whether an image is closer to its caption than to the caption with its colours swapped.
- Check: the saved file is loaded by ``pipeline.models.clip.load_clip`` and must give the in-memory
  model's image (``encode_pixels(..., ["global"])``) and text (``encode_texts``) features to ``atol``.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from tqdm.auto import tqdm

from pipeline.models.clip import encode_tokens, load_clip   # (also registers pipeline/models/configs with open_clip)
from pipeline.world.grammar import describe
from pipeline.world.render import draw_styles, render, render_scenes
from pipeline.world.scenes import COLOURS, SHAPES, Scene, binding_twin, sample_scene, shape_twin, world_rng

KS = (1, 5, 10)
LOG_SCALE_MAX = math.log(100.0)


def retrieval_recall(similarity: np.ndarray | torch.Tensor, ks: Sequence[int] = KS) -> dict[str, float]:
    """Recall@k both ways for a square similarity matrix ``similarity[i, j]`` = image i vs text j, where
    text i is image i's one caption. Image->text: the rank of text i in row i; text->image: the rank of
    image i in column i. Ties count against the match (pessimistic): the rank is the number of OTHER
    candidates scoring >= the true one, and R@k is the share of queries with rank < k. So an exact tie
    (e.g. two held-out scenes given the same caption text) never counts as a hit it might not be.
    Returns ``{"i2t_r1": ..., "t2i_r1": ..., ...}`` for every k in ``ks``."""
    s = torch.as_tensor(similarity, dtype=torch.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"retrieval needs a square similarity matrix, got shape {tuple(s.shape)}")
    diagonal = s.diagonal()
    i2t_rank = (s >= diagonal[:, None]).sum(dim=1) - 1      # minus the true caption itself
    t2i_rank = (s >= diagonal[None, :]).sum(dim=0) - 1
    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_r{k}"] = float((i2t_rank < k).double().mean())
        out[f"t2i_r{k}"] = float((t2i_rank < k).double().mean())
    return out


def preprocess_all(images: Sequence[Image.Image], preprocess) -> torch.Tensor:
    """open_clip's ``preprocess`` on every image (exactly what the encode stages do), stacked [N,3,H,W]."""
    return torch.stack([preprocess(im) for im in images])


def heldout_pairs(seed: int, n: int) -> tuple[list[Scene], list[str]]:
    """The held-out evaluation pairs: each scene of ``world_rng(seed, "clip-heldout")`` and then its
    caption from the same stream (so the first k pairs do not depend on ``n``)."""
    rng = world_rng(seed, "clip-heldout")
    scenes, captions = [], []
    for _ in range(n):
        scene = sample_scene(rng)
        scenes.append(scene)
        captions.append(describe(scene, rng))
    return scenes, captions


@torch.no_grad()
def encode(model, pixels: torch.Tensor, tokens: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised image and text features of the in-memory model (eval mode), ``batch_size`` at a time."""
    was_training = model.training
    model.eval()
    try:
        images = torch.cat([model.encode_image(pixels[i:i + batch_size], normalize=True)
                            for i in range(0, len(pixels), batch_size)])
        texts = torch.cat([model.encode_text(tokens[i:i + batch_size], normalize=True)
                           for i in range(0, len(tokens), batch_size)])
    finally:
        model.train(was_training)
    return images, texts


def evaluate(model, pixels: torch.Tensor, tokens: torch.Tensor) -> dict[str, float]:
    """Zero-shot retrieval of the held-out pairs (:func:`retrieval_recall`)."""
    images, texts = encode(model, pixels, tokens)
    return retrieval_recall(images @ texts.T)


@torch.no_grad()
def attribute_probe(model, preprocess, tokenizer, seed: int, n: int = 200, size: int = 64,
                    style: str = "photo") -> dict[str, float]:
    """Zero-shot shape and colour of ``n`` single-object images in ``style`` (scenes of
    ``world_rng(seed, "clip-probe")``): the image against "a picture of a {colour} {shape}" for the 7
    shapes at its true colour, and for the 7 colours at its true shape (the 49 prompts encoded once).
    Retrieval recall can be high on colours alone; this says whether the model sees shapes at all
    (chance: 1/7)."""
    rng = world_rng(seed, "clip-probe")
    scenes: list[Scene] = []
    while len(scenes) < n:
        scene = sample_scene(rng)
        if len(scene.objects) == 1:
            scenes.append(scene)
    model.eval()
    images = model.encode_image(preprocess_all([render(s, style, size) for s in scenes], preprocess), normalize=True)
    shape_names = list(SHAPES)
    prompts = [f"a picture of a {c} {w}" for c in COLOURS for w in shape_names]
    table = F.normalize(encode_text_trimmed(model, tokenizer(prompts)), dim=-1)
    table = table.view(len(COLOURS), len(shape_names), -1)          # [colour, shape, D]
    shapes = colours = 0
    for scene, image in zip(scenes, images):
        o = scene.objects[0]
        c, w = COLOURS.index(o.colour), shape_names.index(o.shape)
        shapes += int((table[c] @ image).argmax()) == w          # the 7 shapes at its colour
        colours += int((table[:, w] @ image).argmax()) == c      # the 7 colours at its shape
    return {"shape_accuracy": shapes / n, "colour_accuracy": colours / n, "chance": 1 / len(shape_names)}


@torch.no_grad()
def binding_probe(model, preprocess, tokenizer, seed: int, n: int = 200, size: int = 64,
                  style: str = "photo") -> dict[str, float]:
    """Zero-shot colour-shape binding on ``n`` images of scenes with two or more colours (scenes of
    ``world_rng(seed, "clip-binding-probe")``): the share in which the image is closer to its caption than
    to its binding twin's (``scenes.binding_twin``: the same shapes with the colours swapped), both phrased
    alike (the same grammar draws). Chance: 0.5; a model that sees colours and shapes but not which goes
    with which stays there."""
    rng, twin_rng = world_rng(seed, "clip-binding-probe"), world_rng(seed, "clip-binding-probe-twins")
    scenes, twins = [], []
    while len(scenes) < n:
        scene = sample_scene(rng)
        twin = binding_twin(scene, twin_rng)
        if twin is not None:
            scenes.append(scene)
            twins.append(twin)
    model.eval()
    images = model.encode_image(preprocess_all([render(s, style, size) for s in scenes], preprocess), normalize=True)
    captions = [describe(s, np.random.default_rng(i)) for i, s in enumerate(scenes)]
    twin_captions = [describe(t, np.random.default_rng(i)) for i, t in enumerate(twins)]
    texts = encode_text_trimmed(model, tokenizer(captions + twin_captions))      # one pass for both
    own, swapped = (images * texts[:n]).sum(-1), (images * texts[n:]).sum(-1)
    return {"binding_accuracy": float((own > swapped).double().mean()), "chance": 0.5}


def encode_text_trimmed(model, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(tokens, normalize=True)``, run only up to the batch's last end token
    (``pipeline.models.clip.encode_tokens``: the same function at ~3/4 of the cost for context 32)."""
    return F.normalize(encode_tokens(model, tokens), dim=-1)


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                     logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matching pairs (features L2-normalised, ``logit_scale`` = exp
    of the learnable log-temperature): the mean of image->text and text->image cross-entropies."""
    logits = logit_scale * image_features @ text_features.T
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def lr_at(step: int, total: int, warmup: int, lr: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to zero at ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * lr * (1 + math.cos(math.pi * progress))


def optimizer_for(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with open_clip's parameter groups: no weight decay on gains, biases, norms, logit_scale."""
    def exclude(name: str, p: torch.nn.Parameter) -> bool:
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
              {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay}]
    try:        # the fused CPU kernel: the same update, ~5x faster (it matters: the 49408-token embedding)
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """The state dict as safetensors; every tensor cloned, so tied or shared tensors (safetensors refuses
    shared storage) are saved under each of their names, as ``load_state_dict(strict=True)`` wants."""
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(path))


def check_loaded(name: str, path: Path, model, pixels: torch.Tensor, captions: Sequence[str],
                 atol: float = 1e-5) -> dict[str, float]:
    """Load ``path`` through the pipeline's ``load_clip`` and compare its features with ``model``'s:
    ``encode_pixels(pixels, ["global"])`` and ``encode_texts(captions)``. Raises when they differ by
    more than ``atol``; returns the largest absolute differences."""
    clip = load_clip(name, pretrained=str(path))
    tokenizer = open_clip.get_tokenizer(name)
    images, texts = encode(model, pixels, tokenizer(list(captions)))
    loaded_images = clip.encode_pixels(pixels, ["global"])["global"]
    loaded_texts = clip.encode_texts(list(captions))
    diff = {"image_max_abs_diff": float(np.abs(loaded_images - images.numpy()).max()),
            "text_max_abs_diff": float(np.abs(loaded_texts - texts.numpy()).max())}
    if max(diff.values()) > atol:
        raise RuntimeError(f"{path} loaded by load_clip({name!r}) gives other features than the trained model: {diff}")
    return diff


def train_world_clip(name: str, out_dir: str | Path, *, seed: int = 0, pairs: int = 10000, epochs: int = 14,
                     batch_size: int = 64, lr: float = 3e-3, weight_decay: float = 0.1,
                     warmup: float = 0.05, heldout: int = 1000, image_size: int = 64, threads: int = 2,
                     shape_twins: bool = False, synthetic_share: float = 0.0, eval_each_epoch: bool = True,
                     check_pairs: int = 256, progress: bool = True) -> dict:
    """Train the open_clip model ``name`` (built from its config, weights from ``seed``) on the world's
    web pairs and save it to ``out_dir/model.safetensors`` (module docstring).

    - ``pairs``: training scenes, each rendered once; ``epochs``: passes over them, each with fresh
      captions; ``batch_size``: pairs per contrastive batch (the last partial batch of an epoch is
      dropped); ``lr``: peak AdamW learning rate; ``weight_decay``: AdamW's, on matrices only;
      ``warmup``: the share of all steps spent warming the learning rate up linearly.
    - ``heldout``: evaluation pairs (retrieval ranks each among all of them); ``image_size``: the render
      size, which must be the model's image size; ``threads``: torch threads and render processes
      (the result is deterministic for a given seed and thread count); ``shape_twins``: half the
      pairs are the other half's shape twins, each twin in its original's batch; ``synthetic_share``: the
      share of pairs rendered in the synthetic style instead (both: module docstring); ``eval_each_epoch``: retrieval
      after each epoch into ``history`` (cheap next to an epoch); ``check_pairs``: held-out pairs used
      to check the saved file against the in-memory model.

    Returns the report: final retrieval (``i2t_r1`` ... ``t2i_r10``), ``loss_first``/``loss_last``
    (first step, mean of the last epoch), per-epoch ``history``, the settings, timings, the file."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        quiet = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)     # open_clip warns that no weights were loaded
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
        finally:
            logging.getLogger().setLevel(quiet)
        model_size = model.visual.image_size
        model_size = model_size[0] if isinstance(model_size, (tuple, list)) else model_size
        if model_size != image_size:
            raise ValueError(f"{name} takes {model_size}px images but the world renders {image_size}px: "
                             f"set image_size in the model config to the render size")
        tokenizer = open_clip.get_tokenizer(name)

        if shape_twins and batch_size % 2:
            raise ValueError(f"shape_twins pairs each scene with its twin in one batch: batch_size must be even, "
                             f"got {batch_size}")
        rng = world_rng(seed, "clip")
        if shape_twins:          # [a, twin of a, b, twin of b, ...]
            twin_rng = world_rng(seed, "clip-twins")
            scenes = [s for a in (sample_scene(rng) for _ in range(pairs // 2)) for s in (a, shape_twin(a, twin_rng))]
            pairs = len(scenes)
        else:
            scenes = [sample_scene(rng) for _ in range(pairs)]
        # twins share a style: they differ in their shapes alone
        styles = draw_styles(world_rng(seed, "clip-styles"), pairs, synthetic_share, group=2 if shape_twins else 1)
        test_scenes, test_captions = heldout_pairs(seed, heldout)
        images = render_scenes(scenes + test_scenes, image_size, workers=threads,
                               styles=styles + ["photo"] * len(test_scenes))
        pixels = preprocess_all(images[:pairs], preprocess).contiguous(memory_format=torch.channels_last)
        test_pixels = preprocess_all(images[pairs:], preprocess)
        del images
        test_tokens = tokenizer(test_captions)
        data_seconds = time.perf_counter() - start

        steps_per_epoch = pairs // batch_size
        if steps_per_epoch < 1:
            raise ValueError(f"{pairs} pairs make no batch of {batch_size}")
        total = steps_per_epoch * epochs
        warmup_steps = max(1, int(round(warmup * total)))
        model = model.to(memory_format=torch.channels_last)   # as the pixels: ~30% faster convolutions on CPU
        optimizer = optimizer_for(model, lr, weight_decay)
        caption_rng, order_rng = world_rng(seed, "clip-captions"), world_rng(seed, "clip-order")
        losses: list[float] = []
        history: list[dict] = []
        model.train()
        bar = tqdm(total=total, desc=f"train {name}", unit="step", disable=not progress)
        step = 0
        for epoch in range(epochs):
            tokens = tokenizer([describe(s, caption_rng) for s in scenes])
            if shape_twins:      # twins stay side by side, so each shares its original's batch
                first = 2 * order_rng.permutation(pairs // 2)
                order = torch.from_numpy(np.stack([first, first + 1], 1).reshape(-1))
            else:
                order = torch.from_numpy(order_rng.permutation(pairs))
            epoch_losses = []
            for b in range(steps_per_epoch):
                rows = order[b * batch_size:(b + 1) * batch_size]
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, total, warmup_steps, lr)
                image_features = model.encode_image(pixels[rows], normalize=True)
                text_features = encode_text_trimmed(model, tokens[rows])
                loss = contrastive_loss(image_features, text_features, model.logit_scale.exp())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    model.logit_scale.clamp_(0, LOG_SCALE_MAX)
                epoch_losses.append(loss.item())
                step += 1
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{epoch_losses[-1]:.3f}")
            losses.extend(epoch_losses)
            if eval_each_epoch or epoch == epochs - 1:
                metrics = evaluate(model, test_pixels, test_tokens)
                history.append({"epoch": epoch + 1, "seconds": round(time.perf_counter() - start, 1),
                                "loss": float(np.mean(epoch_losses)), **metrics})
                bar.set_postfix(epoch=epoch + 1, loss=f"{epoch_losses[-1]:.3f}", i2t_r5=f"{metrics['i2t_r5']:.3f}")
        bar.close()
        model.eval()
        train_seconds = time.perf_counter() - start - data_seconds

        path = out_dir / "model.safetensors"
        save_weights(model, path)
        check = check_loaded(name, path, model, test_pixels[:check_pairs], test_captions[:check_pairs])
        probe = attribute_probe(model, preprocess, tokenizer, seed, size=image_size)
        probe_synthetic = attribute_probe(model, preprocess, tokenizer, seed, size=image_size, style="synthetic")
        binding = binding_probe(model, preprocess, tokenizer, seed, size=image_size)
        final = history[-1]
        return {
            "model": name, "file": path.name, "seed": seed, "pairs": pairs, "epochs": epochs,
            "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "warmup_steps": warmup_steps,
            "steps": total, "heldout": heldout, "image_size": image_size, "threads": threads,
            "shape_twins": shape_twins, "synthetic_share": synthetic_share,
            "synthetic_pairs": styles.count("synthetic"),
            **{k: final[k] for k in final if k[:3] in ("i2t", "t2i")},
            "loss_first": losses[0], "loss_last": float(np.mean(losses[-steps_per_epoch:])),
            "logit_scale": float(model.logit_scale.detach().exp()),
            "heldout_duplicate_captions": heldout - len(set(test_captions)),
            "history": history, "check": check, "zero_shot_single_object": probe,
            "zero_shot_single_object_synthetic": probe_synthetic, "zero_shot_binding": binding,
            "data_seconds": round(data_seconds, 1), "train_seconds": round(train_seconds, 1),
            "seconds": round(time.perf_counter() - start, 1),
        }
    finally:
        torch.set_num_threads(previous_threads)
