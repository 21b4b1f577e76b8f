"""The shared runner: everything a captioning method does not own, written once.

It opens the artifacts a method ``needs`` (pipeline/methods/__init__.py), checks that every feature,
support set and vocabulary comes from one CLIP model and has the dimensions the model was built for,
seeds, builds the optimiser and schedule (pipeline/nn/schedules.py), runs the epoch loop over
aligned shards (shards in a seeded order per epoch, rows shuffled within a shard), saves and loads
checkpoints (safetensors: nothing is unpickled), and loops over eval sets when captioning. A method
with ``phases`` (pipeline/methods/__init__.py; CMSA's MLE, discriminator and RL phases) is trained phase
after phase, each with its own optimiser over the submodules it trains (``fit_phases``).

A trained model folder holds ``model.safetensors`` (weights; its header holds the method, the typed
training settings, the facts the model's shape depends on and the CLIP identity of its training
features; and the sha256 of its tensor bytes, checked on every load) and ``train_report.json``; its
fingerprint record (``paths.fingerprint_record``: ``artifacts/fingerprints/methods/NAME/model.json``, a
DVC output of ``train@NAME`` that no stage reads) records the fingerprint of everything training read
(settings, inputs' content, code) and the sha256 of each file, and travels with the model through the
DVC remote. ``train`` keeps a model whose fingerprint is unchanged and whose bytes
still match: DVC may rerun ``train@NAME`` when an artifact that this method does not read changes
(dvc.yaml lists the union of what methods read); the fingerprint covers exactly what this instance
reads, so such a rerun ends in seconds.

Frozen pretrained submodules (a model's ``frozen_pretrained``, pipeline/methods/__init__.py) are left
out of ``model.safetensors``: the header's ``frozen`` records their identities, ``create`` loads them
again, and ``load_checkpoint`` refuses reloaded weights whose sha256 differs from the recorded one.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from tqdm.auto import tqdm

from pipeline.environment import library_versions
from pipeline import config as cfg
from pipeline import methods, paths
from pipeline.data.aligned import (Column, RowGather, aligned_shards, check_dim, read_refined_pairs, read_single_table,
                                   shard_order)
from pipeline.data.provenance import code_version
from pipeline.data.shards import ModelMismatchError, ShardedArtifact, feature_numpy, fingerprint, require_same_model
from pipeline.data.vocabularies import TagVocabulary, read_concepts
from pipeline.methods import Data, Needs, Step
from pipeline.models import weights_sha256
from pipeline.nn import schedules
from pipeline.support import SupportSet
from pipeline.vectors import mean_direction

MODEL_FILE = "model.safetensors"
REPORT_FILE = "train_report.json"
CHECKPOINT_FORMAT = "synthcap.checkpoint.v2"
HEADER_KEY = "synthcap"
TENSORS_SHA256_KEY = "tensors_sha256"   # metadata: the sha256 of the file's tensor bytes, checked on every load
_UNSEALED = "0" * 64                    # its placeholder until the tensors are written (same length)
FEATURE_COLUMNS = ("global", "patches", "grid", "cls_attention", "attention", "text_feature")


# ---------------------------------------------------------------------------------------------
# Opening what a method needs
# ---------------------------------------------------------------------------------------------
def _source_dirs(evalset: str | None, pairs: str = "original") -> dict[str, Path]:
    dirs = {"corpus": paths.CORPUS, "text": paths.TEXT_FEATURES, "synthetic": paths.SYNTHETIC_FEATURES,
            "synthetic_tags": paths.SYNTHETIC_TAGS,
            "optimized": paths.OPTIMIZED if pairs == "original" else paths.OPTIMIZED_REFINED}
    if evalset is not None:
        dirs.update(image=paths.eval_features(evalset), image_tags=paths.eval_tags(evalset))
    return dirs


class Inputs:
    """The artifacts behind a method's ``Needs``, opened and checked; ``data`` is what the method is
    handed, ``shards(order)`` streams its per-row columns shard by shard."""

    def __init__(self, needs: Needs, device: str, evalset: str | None = None,
                 artifacts: dict[str, ShardedArtifact] | None = None):
        self.needs, self.evalset = needs, evalset
        if needs.pairs not in methods.PAIRS:
            raise ValueError(f"pairs must be one of {', '.join(methods.PAIRS)}, got {needs.pairs!r}")
        if needs.pairs == "refined" and evalset is not None:
            raise ValueError("refined pairs are training data: captioning reads the eval images")
        dirs = _source_dirs(evalset, needs.pairs)
        allowed = methods.CAPTION_SOURCES if evalset is not None else methods.TRAIN_SOURCES
        specs = {}
        for name, spec in needs.rows.items():
            source, _, column = spec.partition(".")
            if source not in allowed:
                side = "captioning" if evalset is not None else "training"
                raise ValueError(f"`{spec}`: {source!r} is not a {side} source ({', '.join(allowed)})")
            if column not in allowed[source]:
                raise ValueError(f"`{spec}`: {source!r} has no column {column!r} ({', '.join(allowed[source])})")
            specs[name] = (source, column)
        sources = {s for s, _ in specs.values()} | ({"corpus"} if needs.corpus else set())
        sources |= {m for m in needs.means if m in ("text", "synthetic")}
        if "eval" in needs.means:
            sources.add("image")
        given = artifacts or {}
        self.artifacts = {s: given[s] if s in given else ShardedArtifact(dirs[s]) for s in sorted(sources)}
        self.specs = specs
        self.refined = None
        if needs.pairs == "refined":
            self._open_refined(given["refined"] if "refined" in given else ShardedArtifact(paths.REFINED))

        features = {s: a for s, a in self.artifacts.items() if s in ("text", "synthetic", "optimized", "image")}
        if not features:
            raise ValueError("a method must read at least one CLIP feature column")
        clip = require_same_model(**{f"{s}_features": a for s, a in features.items()})
        for source, column in specs.values():
            if source in ("synthetic", "image") and column not in self.artifacts[source].columns:
                raise ValueError(missing_column(self.artifacts[source], column, source))
        if self.refined is not None:
            require_same_model(training_features=clip, refined_pairs=self.refined)
        dim = int(clip["embed_dim"])
        read_from = {c: self.artifacts[s] for s, c in reversed(list(specs.values()))}   # column -> its first source
        patched = read_from.get("patches") or read_from.get("grid")
        num_patches = patch_count(patched, dim) if patched is not None else None
        self.data = Data(clip=clip, feature_dim=dim, num_patches=num_patches, device=device)
        if "grid" in read_from:
            self.data.grid_dim = grid_width(read_from["grid"])
        if "attention" in read_from:
            self.data.num_tokens = token_count(read_from["attention"], num_patches)
        d = self.data
        if needs.corpus:
            corpus = self.artifacts["corpus"]
            d.corpus = {c: corpus.read_column(c).to_pylist() for c in needs.corpus}
        if needs.support:
            d.support = open_support(needs.support, clip).to_device(device)
        if needs.tag_vocabulary:
            d.tag_vocabulary = TagVocabulary(read_single_table(paths.TAG_VOCABULARY, clip, "tag_vocabulary"))
        if needs.concepts:
            d.concepts = read_concepts(paths.CONCEPTS, clip)
        for which in needs.means:
            source, column = {"text": ("text", "text_feature"), "synthetic": ("synthetic", "global"),
                              "eval": ("image", "global")}[which]
            art = self.artifacts[source]
            d.means[which] = mean_direction(feature_numpy(b.column(0)) for b in art.iter_batches([column]))
        if needs.text_encoder:
            from pipeline.models.clip import clip_from_identity  # here: open_clip loads only for a method that needs it
            d.text_encoder = clip_from_identity(clip, device).encode_texts

    @property
    def num_shards(self) -> int:
        return len(next(iter(self.artifacts.values())).paths)

    def _open_refined(self, refined: ShardedArtifact) -> None:
        """SynC's refined pairs (stage refine): training shard k holds the kept captions whose re-paired image lies
        in synthetic shard k, so that each epoch reads every synthetic shard (patches and all) once; their
        caption-side columns (text, text features, SynTIC's optimised features) are gathered by caption row."""
        id_column = "caption_id"
        image_side = [Column(self.artifacts[s], c, name) for name, (s, c) in self.specs.items()
                      if s in methods.PAIRED_SOURCES]
        if not image_side:
            raise ValueError("pairs: refined re-pairs captions with synthetic images, but this method reads none "
                             "(its training pairs do not depend on them)")
        caption_side = [Column(refined, id_column)] + [Column(self.artifacts[s], c, name)
                                                       for name, (s, c) in self.specs.items()
                                                       if s not in methods.PAIRED_SOURCES and c != id_column]
        self.refined, self.images, self.captions = refined, RowGather(image_side), RowGather(caption_side)
        if self.captions.num_rows != refined.num_rows:
            raise ValueError(f"{refined.folder} holds {refined.num_rows} captions, the corpus side "
                             f"{self.captions.num_rows}: rerun `dvc repro refine`")
        self.image_row, kept = read_refined_pairs(refined)
        kept = np.flatnonzero(kept)
        shard_of = np.searchsorted(self.images.starts, self.image_row[kept], side="right") - 1
        self.refined_rows = [kept[shard_of == k] for k in range(len(self.images.starts) - 1)]   # caption rows

    def shard_rows(self) -> list[int]:
        if self.refined is not None:
            return [len(rows) for rows in self.refined_rows]
        art = next(iter(self.artifacts.values()))
        return [int(s["rows"]) for s in art.manifest["shards"]]

    def shards(self, order: list[int] | None = None) -> Iterator[tuple[int, dict]]:
        """(shard index, {name: column}) in ``order``; features float32 [n, D], patches [n, N_p, D],
        cls_attention [n, N_p], attention [n, N_p + 1, N_p + 1]; a row id asked for by name (e.g.
        ``image.image_id``) as a list."""
        order = list(range(self.num_shards)) if order is None else order
        id_column = "image_id" if self.evalset is not None else "caption_id"
        ids_as = [name for name, (_, c) in self.specs.items() if c == id_column]     # the row id, by another name
        columns = [Column(self.artifacts[s], c, name) for name, (s, c) in self.specs.items() if c != id_column]
        d = self.data
        shards = self._refined_shards(order) if self.refined is not None else \
            zip(order, aligned_shards(id_column, columns, order))
        for k, shard in shards:
            for name in ids_as:
                shard[name] = list(shard[id_column])
            for name, (source, column) in self.specs.items():
                if column in ("global", "text_feature"):
                    check_dim(shard[name], d.feature_dim, f"{source} {column} of shard {k}")
                elif column == "patches":
                    check_dim(shard[name], d.num_patches * d.feature_dim, f"{source} patches of shard {k}")
                    shard[name] = shard[name].reshape(-1, d.num_patches, d.feature_dim)
                elif column == "grid":
                    check_dim(shard[name], d.num_patches * d.grid_dim, f"{source} grid of shard {k}")
                    shard[name] = shard[name].reshape(-1, d.num_patches, d.grid_dim)
                elif column == "attention":
                    check_dim(shard[name], d.num_tokens * d.num_tokens, f"{source} attention maps of shard {k}")
                    shard[name] = shard[name].reshape(-1, d.num_tokens, d.num_tokens)
            yield k, shard

    def _refined_shards(self, order: list[int]) -> Iterator[tuple[int, dict]]:
        """(k, the kept captions re-paired with images of synthetic shard k, each with its image's columns)."""
        for k in order:
            rows = self.refined_rows[k]
            if len(rows):                        # no kept caption chose an image of this shard
                yield k, {**self.captions.gather(rows), **self.images.gather(self.image_row[rows])}

    def fingerprint(self) -> str:
        """What these inputs are: the content of every artifact and file they come from."""
        parts = {s: a.fingerprint for s, a in self.artifacts.items()}
        if self.refined is not None:         # only an instance that reads the refined pairs depends on them
            parts["refined_pairs"] = self.refined.fingerprint
        parts["rows"] = sorted(self.specs.items())
        if self.needs.support:
            parts["support"] = file_id(paths.support(self.needs.support))
        if self.needs.tag_vocabulary:
            parts["tag_vocabulary"] = file_id(paths.TAG_VOCABULARY)
        if self.needs.concepts:
            parts["concepts"] = file_id(paths.CONCEPTS)
        # the corpus columns held whole: under their own key, "corpus" is the corpus artifact's content
        parts["means"], parts["corpus_columns"] = list(self.needs.means), list(self.needs.corpus)
        return fingerprint(parts)


def patch_count(artifact: ShardedArtifact, dim: int) -> int:
    """N_p from an image-feature artifact's metadata, checked against the CLIP dim."""
    meta = artifact.meta
    if not meta.get("num_patches"):
        raise ValueError(f"{artifact.folder} records no patch grid: this method needs a ViT CLIP whose patch "
                         f"tokens were cached (rerun the stage that writes it)")
    if int(meta.get("dim", dim)) != dim:
        raise ValueError(f"{artifact.folder} holds {meta['dim']}-dimensional patches but the CLIP dim is {dim}")
    return int(meta["num_patches"])


def missing_column(artifact: ShardedArtifact, column: str, source: str) -> str:
    """The error of a method reading image column ``column`` of ``source`` (synthetic | image) that the
    encode stage did not cache."""
    side = "synthetic_columns" if source == "synthetic" else "eval_columns"
    return (f"{artifact.folder} has no column {column!r} (it holds {', '.join(artifact.columns)}): the encode "
            f"stage caches only the columns the enabled method instances read (`encode.{side}` in params.yaml); "
            f"enable the instance in params.yaml and rerun `dvc repro`")


def grid_width(artifact: ShardedArtifact) -> int:
    """W, the raw grid's width, from an image-feature artifact's metadata."""
    if not artifact.meta.get("grid_dim"):
        raise ValueError(f"{artifact.folder} records no raw grid width (grid_dim): rerun the stage that writes it")
    return int(artifact.meta["grid_dim"])


def token_count(artifact: ShardedArtifact, num_patches: int | None = None) -> int:
    """N_p + 1 (the attention map's side) from an image-feature artifact's metadata, checked against N_p
    when the patches are read too."""
    meta = artifact.meta
    if not meta.get("num_tokens"):
        raise ValueError(f"{artifact.folder} records no attention map (num_tokens): this method needs a ViT CLIP's "
                         f"last-layer attention over all tokens, cached for eval images (rerun the stage that "
                         f"writes it)")
    n = int(meta["num_tokens"])
    if num_patches is not None and n != num_patches + 1:
        raise ValueError(f"{artifact.folder} records {n} attention tokens for {num_patches} patches (expected "
                         f"{num_patches + 1}: the patches and CLS)")
    return n


def open_support(name: str, clip: dict) -> SupportSet:
    folder = paths.support(name)
    support = SupportSet.load(folder)
    require_same_model(image_features=clip, **{f"support_set_{name}": support.model})
    return support


def file_id(path: Path) -> str:
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        digest.update(hashlib.sha256(f.read_bytes()).digest())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def fit(model: torch.nn.Module, batches: Callable[[int], Iterator[dict]], epochs: int, optimizer, scheduler,
        grad_clip: float | None = None, grad_clip_value: float | None = None, desc: str = "train",
        progress: bool = True, max_steps: int | None = None, parameters: list | None = None) -> dict:
    """Minimise ``model.loss(batch)`` over ``epochs`` passes of ``batches(epoch)``; the scheduler steps
    once per optimizer step. Returns {"epoch_loss": per-epoch mean loss weighted by batch size,
    "logs": per-epoch means of what the loss logged, "steps": optimizer steps}. Leaves the model in
    eval mode. ``parameters`` (default: all of the model's) are those whose gradients are clipped: a
    training phase's (see ``train_model``)."""
    clipped = list(model.parameters()) if parameters is None else list(parameters)
    history, logs, steps, step_loss = [], [], 0, []
    for epoch in range(epochs):
        model.train()
        total, count, extra = 0.0, 0, {}
        bar = tqdm(batches(epoch), desc=f"{desc} epoch {epoch + 1}/{epochs}", unit="batch", disable=not progress)
        for batch in bar:
            out = model.loss(batch)
            loss, logged = out if isinstance(out, tuple) else (out, {})
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip_value is not None:
                torch.nn.utils.clip_grad_value_(clipped, grad_clip_value)
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(clipped, grad_clip)
            optimizer.step()
            scheduler.step()
            n = len(next(v for v in batch.values() if isinstance(v, torch.Tensor)))
            total, count, steps = total + loss.item() * n, count + n, steps + 1
            step_loss.append(loss.item())
            for key, value in logged.items():
                s, c = extra.get(key, (0.0, 0))
                extra[key] = (s + float(value) * n, c + n)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if max_steps is not None and steps >= max_steps:
                break
        if count == 0:
            raise ValueError(f"epoch {epoch} yielded no batch")
        history.append(total / count)
        logs.append({k: s / c for k, (s, c) in extra.items()})
        if max_steps is not None and steps >= max_steps:
            break
    model.eval()
    return {"epoch_loss": history, "logs": logs, "steps": steps, "step_loss": step_loss}


def train_model(module, s, inputs: Inputs, progress: bool = True, max_steps: int | None = None):
    """Build the model of ``module`` with settings ``s`` and fit it on ``inputs`` -> (model, facts, result).
    A module with ``phases(s)`` (pipeline/methods/__init__.py) is fitted phase after phase, each with its
    own optimiser over the parameters it trains; the result then lists the phases."""
    data = inputs.data
    facts = module.facts(s, data)
    torch.manual_seed(s.seed)
    model = module.create(s, facts, data).to(data.device)
    steps_per_epoch = sum(math.ceil(rows / s.batch_size) for rows in inputs.shard_rows())
    prepare = getattr(module, "prepare", None)
    offsets = np.r_[0, np.cumsum(inputs.shard_rows())].astype(int).tolist()
    desc = module.__name__.rsplit(".", 1)[-1]

    def batches_of(first_epoch: int, phase: str | None) -> Callable[[int], Iterator[dict]]:
        def batches(epoch: int) -> Iterator[dict]:
            epoch += first_epoch                     # epochs are numbered across phases
            order = shard_order(inputs.num_shards, epoch, s.seed)
            for k, rows in inputs.shards(order):
                step = Step(epoch=epoch, shard=k, offset=offsets[k], seed=s.seed, phase=phase)
                rows = prepare(rows, s, data, step) if prepare else rows
                n = len(next(iter(rows.values())))
                perm = np.random.default_rng([s.seed, epoch, k]).permutation(n)
                for start in range(0, n, s.batch_size):
                    yield module.batch(model, rows, perm[start:start + s.batch_size], s, data, step)
        return batches

    phases = getattr(module, "phases", None)
    if phases is None:
        optimizer, scheduler = schedules.build(model, s.optim, total_steps=steps_per_epoch * s.epochs,
                                               width=getattr(model, "width", None))
        torch.manual_seed(s.seed)                   # dropout and any noise drawn inside the model
        result = fit(model, batches_of(0, None), s.epochs, optimizer, scheduler, s.optim.grad_clip,
                     s.optim.grad_clip_value, desc=desc, progress=progress, max_steps=max_steps)
        return model, facts, result
    return model, facts, fit_phases(model, phases(s), batches_of, steps_per_epoch, s.seed, desc, progress, max_steps)


def phase_parameters(model: torch.nn.Module, trains: tuple[str, ...]) -> torch.nn.Module:
    """The part of ``model`` a phase trains: the model itself (``trains`` empty) or a container of the
    named submodules (shared parameters once), for the optimiser of that phase."""
    if not trains:
        return model
    parts = {}
    for name in trains:
        try:
            parts[name.replace(".", "/")] = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"a training phase names {name!r}, which is not a submodule of "
                             f"{type(model).__name__}") from None
    return torch.nn.ModuleDict(parts)


def fit_phases(model: torch.nn.Module, phases: list, batches_of, steps_per_epoch: int, seed: int, desc: str,
               progress: bool = True, max_steps: int | None = None) -> dict:
    """Fit ``model`` phase after phase (``methods.Phase``): each phase its own optimiser and schedule over
    the parameters it trains (``phase_parameters``), built as it begins, after its ``setup``. Returns
    {"epoch_loss", "logs" (over all phases in order), "steps", "phases": [{name, epochs, steps,
    epoch_loss, logs}]}."""
    names = [p.name for p in phases]
    if len(set(names)) != len(names):
        raise ValueError(f"training phases must have distinct names, got {names}")
    torch.manual_seed(seed)                          # dropout and any noise drawn inside the model, once
    done, first_epoch, out = 0, 0, []
    for phase in phases:
        if phase.epochs == 0:
            continue
        part = phase_parameters(model, tuple(phase.trains))
        total = steps_per_epoch * phase.epochs
        optimizer, scheduler = schedules.build(part, phase.optim, total_steps=total,
                                               width=getattr(model, "width", None))
        if phase.setup is not None:
            phase.setup(model, total)
        left = None if max_steps is None else max_steps - done
        result = fit(model, batches_of(first_epoch, phase.name), phase.epochs, optimizer, scheduler,
                     phase.optim.grad_clip, phase.optim.grad_clip_value, desc=f"{desc} {phase.name}",
                     progress=progress, max_steps=left, parameters=list(part.parameters()))
        out.append({"name": phase.name, "epochs": len(result["epoch_loss"]), **result})
        done += result["steps"]
        first_epoch += phase.epochs
        if max_steps is not None and done >= max_steps:
            break
    if not out:
        raise ValueError(f"every training phase has 0 epochs ({', '.join(names)})")
    return {"epoch_loss": [x for p in out for x in p["epoch_loss"]], "logs": [x for p in out for x in p["logs"]],
            "steps": done, "step_loss": [x for p in out for x in p.pop("step_loss")], "phases": out}


def train(name: str, instance: cfg.MethodInstance, device: str, out_dir: Path | None = None,
          progress: bool = True) -> dict:
    """Train method instance ``name`` on the cached artifacts; write its model folder. Keeps a model
    whose fingerprint (settings, inputs, code) is unchanged and whose bytes are intact."""
    module = methods.get(instance.method)
    s = instance.train
    out_dir = Path(out_dir) if out_dir is not None else paths.model(name)
    inputs = Inputs(module.needs(s), device)
    fp = fingerprint(instance.method, cfg.as_dict(s), inputs.fingerprint(),
                     code_version("stages.train", module.__name__), device)
    kept = kept_report(out_dir, fp)
    if kept is not None:
        return {**kept, "kept_from_previous_run": True}
    model, facts, result = train_model(module, s, inputs, progress)
    result["curve"] = loss_curve(result.pop("step_loss"), [(p["name"], p["steps"]) for p in result.get("phases", [])])
    variant = module.variant(s, None)
    frozen = frozen_parts(model)
    report = {"method": instance.method, "variant": variant, **result, "clip_model": inputs.data.clip,
              **({"frozen": frozen} if frozen else {}),
              "training_rows": sum(inputs.shard_rows()), "facts": facts, "environment": library_versions(),
              "summary": _summary(variant, result)}
    header = {"method": instance.method, "train": cfg.as_dict(s), "facts": facts, "clip_model": inputs.data.clip}
    write_model_folder(out_dir, model, header, report, fp)
    return report


CURVE_POINTS = 1000
"""At most this many rows in a training curve (paper-scale runs take ~10^5 steps)."""


def loss_curve(step_loss: list[float], phases: list[tuple[str, int]] | None = None,
               max_points: int = CURVE_POINTS) -> list[dict]:
    """The per-step loss as DVC plots rows {step, loss} (and ``phase`` when there are ``phases``: (name,
    steps) in order): consecutive steps averaged in bins of ceil(steps / max_points), never across two
    phases, each row at its bin's last step (1-based), so at most max_points (+ one per phase) rows."""
    n = len(step_loss)
    size = max(1, math.ceil(n / max_points))
    spans = phases or [(None, n)]
    if sum(steps for _, steps in spans) != n:
        raise ValueError(f"the phases count {sum(steps for _, steps in spans)} steps, the losses {n}")
    rows, first = [], 0
    for name, steps in spans:
        for start in range(first, first + steps, size):
            end = min(start + size, first + steps)
            row = {"step": end, "loss": float(np.mean(step_loss[start:end]))}
            rows.append({**row, "phase": name} if name is not None else row)
        first += steps
    return rows


def _summary(variant: str, result: dict) -> str:
    def losses(r: dict) -> str:
        history = r["epoch_loss"]
        return f"loss {history[0]:.3f} -> {history[-1]:.3f} over {len(history)} epochs"
    if "phases" not in result:
        return f"{variant}: {losses(result)} ({result['steps']} steps)"
    return f"{variant}: " + "; ".join(f"{p['name']} {losses(p)}" for p in result["phases"]) + \
        f" ({result['steps']} steps)"


# ---------------------------------------------------------------------------------------------
# Checkpoints and the model folder
# ---------------------------------------------------------------------------------------------
def save_checkpoint(model: torch.nn.Module, path: Path, header: dict) -> None:
    """Weights as safetensors (tied tensors stored once), ``header`` as JSON in its metadata. The same
    weights and header give the same bytes. A model's frozen pretrained submodules
    (``frozen_pretrained``) are left out; the header records their identities under ``frozen``."""
    frozen = frozen_parts(model)
    metadata = {"format": CHECKPOINT_FORMAT, TENSORS_SHA256_KEY: _UNSEALED}
    if not frozen:
        save_model(model, str(path), metadata={**metadata, HEADER_KEY: json.dumps(header, sort_keys=True)})
    else:
        for prefix, identity in frozen.items():
            now = weights_sha256(model.get_submodule(prefix))
            if now != identity.get("weights_sha256"):
                raise ValueError(f"the frozen submodule {prefix!r} ({_model_name(identity)}) has weights {now[:12]}, "
                                 f"not the {str(identity.get('weights_sha256'))[:12]} it was loaded with: training "
                                 f"changed it, so it cannot be left out of the checkpoint")
        state = _without_frozen(model.state_dict(), frozen)
        header = {**header, "frozen": frozen}
        save_file(state, str(path), metadata={**metadata, HEADER_KEY: json.dumps(header, sort_keys=True)})
    _sort_metadata(Path(path))
    _seal(Path(path))


def _tensor_bytes_sha256(f, header_length: int) -> str:
    """sha256 of everything after a safetensors header (the tensors' bytes)."""
    f.seek(8 + header_length)
    digest = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def _seal(path: Path) -> None:
    """Write the sha256 of the tensor bytes over its placeholder in the metadata (same length, in place):
    the checkpoint carries its own checksum wherever it travels (dvc push/pull), checked on every load."""
    placeholder = f'"{TENSORS_SHA256_KEY}":"{_UNSEALED}"'.encode()
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        head = f.read(n)
        at = head.find(placeholder)
        if at < 0:
            raise RuntimeError(f"{path}: no checksum placeholder in the safetensors header")
        digest = _tensor_bytes_sha256(f, n)
        f.seek(8 + at + len(placeholder) - len(_UNSEALED) - 1)
        f.write(digest.encode())


def verify_checkpoint(path: Path) -> None:
    """Refuse a checkpoint whose tensor bytes are not those it was written with (a flipped bit, a torn
    copy): they would load without complaint and caption nonsense. Names the file and the rebuild."""
    path = Path(path)
    rebuild = (f"`dvc repro train@{path.parent.parent.name}`" if path.parent.name == "model"
               else "the `dvc repro` of the stage that wrote it")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        recorded = (json.loads(f.read(n)).get("__metadata__") or {}).get(TENSORS_SHA256_KEY)
        if recorded is None:
            raise ValueError(f"{path} records no checksum of its tensors (written by an older version): "
                             f"retrain it with {rebuild}")
        actual = _tensor_bytes_sha256(f, n)
    if actual != recorded:
        raise ValueError(f"{path} is damaged: its tensor bytes have sha256 {actual[:12]}, not the {recorded[:12]} "
                         f"they were written with. Rebuild it with {rebuild}, or restore it from the DVC cache "
                         f"or remote (`dvc checkout` / `dvc pull`)")


def frozen_parts(model: torch.nn.Module) -> dict[str, dict]:
    """{submodule name: identity} of the model's frozen pretrained submodules (empty: none)."""
    frozen = dict(getattr(model, "frozen_pretrained", None) or {})
    for prefix, identity in frozen.items():
        try:
            model.get_submodule(prefix)
        except AttributeError:
            raise ValueError(f"{type(model).__name__}.frozen_pretrained names {prefix!r}, which is not a "
                             f"submodule") from None
        if not isinstance(identity, dict) or not identity.get("weights_sha256"):
            raise ValueError(f"{type(model).__name__}.frozen_pretrained[{prefix!r}] must be an identity with a "
                             f"weights_sha256 (as pipeline/models loaders record it), got {identity!r}")
    return frozen


def _in_frozen(key: str, frozen) -> bool:
    return any(key == p or key.startswith(p + ".") for p in frozen)


def _storage_key(t: torch.Tensor) -> tuple:
    """Tensors with the same key are the same tensor (tied weights)."""
    return (t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
            t.dtype)


def _without_frozen(state: dict[str, torch.Tensor], frozen) -> dict[str, torch.Tensor]:
    """The state dict without the frozen submodules' tensors, each remaining tensor once (a tied tensor
    under its first name in sorted order, as safetensors' save_model keeps it), contiguous."""
    kept, seen = {}, set()
    for key in sorted(state):
        if _in_frozen(key, frozen):
            continue
        tensor = state[key]
        ident = _storage_key(tensor)
        if ident in seen:
            continue
        seen.add(ident)
        kept[key] = tensor.detach().contiguous()
    return kept


def _model_name(identity: dict) -> str:
    pretrained = identity.get("pretrained")
    source = f"pretrained={pretrained}" if pretrained else f"seed={identity.get('seed')}"
    return f"{identity.get('name')} ({source})"


def _sort_metadata(path: Path) -> None:
    """safetensors writes its metadata map in a random order (a Rust HashMap, seeded per map): rewrite
    that object with its keys sorted, in place (same pairs, same length), so that a retrained identical
    model has identical bytes (and DVC sees an unchanged output)."""
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        text = f.read(n).decode("utf-8")
        start = text.find('"__metadata__":')
        if start < 0:
            return
        start += len('"__metadata__":')
        meta, end = json.JSONDecoder().raw_decode(text, start)
        ordered = json.dumps(dict(sorted(meta.items())), separators=(",", ":"), ensure_ascii=False)
        if len(ordered.encode("utf-8")) != len(text[start:end].encode("utf-8")):   # another escaping: leave it
            return
        f.seek(8 + len(text[:start].encode("utf-8")))
        f.write(ordered.encode("utf-8"))


def checkpoint_header(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no trained model at {path}: run its `dvc repro train@NAME` first")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except SafetensorError as err:     # a pickle, a truncated file: name it like any other foreign file
        raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint (not a safetensors file: {err})") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint (format={meta.get('format')!r})")
    return json.loads(meta[HEADER_KEY])


def load_checkpoint(path: Path, device: str = "cpu"):
    """-> (model in eval mode, header with ``train`` parsed back into the method's Train settings).
    Loads tensors only (safetensors): nothing is unpickled; their bytes must match the checksum sealed in
    the header (``verify_checkpoint``). Frozen pretrained submodules left out of
    the file are the ones ``create`` loaded again, checked to have the weights recorded at training."""
    header = trained_header(path)
    verify_checkpoint(path)
    module, s = methods.get(header["method"]), header["train"]
    model = module.create(s, header["facts"])
    recorded = header.get("frozen") or {}
    if not recorded:
        if frozen_parts(model):
            raise ValueError(f"{path} holds a whole {header['method']} model, but this code builds it with frozen "
                             f"submodules ({', '.join(frozen_parts(model))}): retrain it (`dvc repro train@NAME`)")
        try:
            load_model(model, str(path), strict=True, device=str(device))
        except RuntimeError as err:      # other tensors than this code's model has: an older version made it
            raise ValueError(f"{path} does not fit the {header['method']} model this code builds from its settings "
                             f"(written by another version of the method?): retrain it (`dvc repro train@NAME`). "
                             f"{str(err).splitlines()[-1].strip()}") from None
    else:
        _load_without_frozen(model, path, recorded, device)
    return model.to(device).eval(), header


def trained_header(path: Path) -> dict:
    """A checkpoint's header with ``train`` parsed back into its method's Train settings (no tensor read)."""
    header = checkpoint_header(path)
    train = cfg.parse(methods.get(header["method"]).Train, header["train"], f"{path}: train")
    return {**header, "train": train}


def _load_without_frozen(model: torch.nn.Module, path: Path, recorded: dict, device: str) -> None:
    """Load a checkpoint saved without its frozen submodules into ``model``, whose frozen submodules
    ``create`` loaded again: refuses other weights than those recorded at training, naming both."""
    present = frozen_parts(model)
    if set(present) != set(recorded):
        raise ValueError(f"{path} was trained with the frozen submodules {sorted(recorded)}, but the model built "
                         f"now has {sorted(present)}: retrain it (`dvc repro train@NAME`)")
    for prefix, identity in recorded.items():
        loaded = weights_sha256(model.get_submodule(prefix))
        if loaded != identity.get("weights_sha256"):
            raise ValueError(
                f"{path}: its frozen {prefix!r} was {_model_name(identity)} with weights sha256 "
                f"{identity['weights_sha256'][:12]} at training, but {_model_name(present[prefix])} loads now with "
                f"weights {loaded[:12]}: provide the same weights (or retrain with `dvc repro train@NAME`)")
    state = load_file(str(path), device=str(device))
    model_state = model.state_dict()
    stray = sorted(k for k in state if _in_frozen(k, recorded) or k not in model_state)
    if stray:
        raise RuntimeError(f"{path}: unexpected tensors {', '.join(stray[:5])} for a {type(model).__name__}")
    _, unexpected = model.load_state_dict(state, strict=False)
    loaded_storage = {_storage_key(model_state[k]) for k in state}
    missing = sorted(k for k, t in model_state.items()
                     if k not in state and not _in_frozen(k, recorded) and _storage_key(t) not in loaded_storage)
    if missing or unexpected:
        raise RuntimeError(f"{path} does not match a {type(model).__name__}: missing {', '.join(missing[:5])}; "
                           f"unexpected {', '.join(unexpected[:5])}")


def write_model_folder(out_dir: Path, model, header: dict, report: dict, fp: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    record = paths.fingerprint_record(out_dir)
    record.unlink(missing_ok=True)
    tmp = out_dir / f".{MODEL_FILE}.tmp-{os.getpid()}"
    save_checkpoint(model, tmp, header)
    os.replace(tmp, out_dir / MODEL_FILE)
    _write_json(out_dir / REPORT_FILE, report)
    write_record(record, out_dir, (MODEL_FILE, REPORT_FILE), fp)


def kept_report(out_dir: Path, fp: str) -> dict | None:
    """The previous run's report if its fingerprint is ``fp`` and every file still matches its hash."""
    if not record_holds(paths.fingerprint_record(out_dir), out_dir, fp):
        return None
    try:
        return json.loads((out_dir / REPORT_FILE).read_text())
    except (OSError, ValueError):
        return None


def write_record(record: Path, folder: Path, files, fp: str) -> None:
    """Record that ``files`` (names in ``folder``) were made under fingerprint ``fp``, with each one's sha256."""
    record.parent.mkdir(parents=True, exist_ok=True)
    _write_json(record, {"fingerprint": fp, "files": {f: _sha256(folder / f) for f in files}})


def record_holds(record: Path, folder: Path, fp: str) -> bool:
    """Does ``record`` say its files were made under ``fp``, and does every one still match its sha256?"""
    try:
        manifest = json.loads(record.read_text())
        return manifest["fingerprint"] == fp and bool(manifest["files"]) and all(
            _sha256(folder / f) == h for f, h in manifest["files"].items())
    except (OSError, ValueError, KeyError, AttributeError):
        return False


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Captioning
# ---------------------------------------------------------------------------------------------
def caption_shards(model, header: dict, c, inputs: Inputs, progress: bool = True) -> dict[str, str]:
    """Caption every image of ``inputs`` (image_id -> caption)."""
    module = methods.get(header["method"])
    s, data = header["train"], inputs.data
    facts = header["facts"]
    if "feature_dim" in facts and facts["feature_dim"] != data.feature_dim:
        raise ValueError(f"the model takes {facts['feature_dim']}-dimensional features, the inputs are "
                         f"{data.feature_dim}-dimensional")
    if facts.get("num_patches") and data.num_patches and facts["num_patches"] != data.num_patches:
        raise ValueError(f"the model was trained on {facts['num_patches']} patches per image, the inputs have "
                         f"{data.num_patches}")
    prepare = getattr(module, "prepare", None)
    out: dict[str, str] = {}
    shards = tqdm(inputs.shards(), total=inputs.num_shards, desc="caption", unit="shard", disable=not progress)
    for _, rows in shards:
        ids = rows["image_id"] if "image_id" in inputs.specs else rows.pop("image_id")
        rows = prepare(rows, s, data, None) if prepare else rows
        idx = np.arange(len(ids))
        for start in range(0, len(ids), c.batch_size):
            out.update(zip(ids[start:start + c.batch_size],
                           module.caption(model, rows, idx[start:start + c.batch_size], s, c, data)))
    return out


def caption(name: str, instance: cfg.MethodInstance, evalset: str, device: str, progress: bool = True
            ) -> dict[str, str]:
    """Caption eval set ``evalset`` with the trained instance ``name``."""
    header, inputs = _captioning_inputs(name, instance, evalset, device)
    model, _ = load_checkpoint(paths.model(name) / MODEL_FILE, device)
    return caption_shards(model, header, instance.caption, inputs, progress)


def caption_into(out: Path, name: str, instance: cfg.MethodInstance, evalset: str, device: str,
                 progress: bool = True) -> tuple[dict[str, str], bool]:
    """Caption eval set ``evalset`` with instance ``name`` into the JSON file ``out`` (image_id -> caption),
    or keep ``out``'s captions when their fingerprint (the model's bytes, the inputs' content, the caption
    settings, the captioning code) is unchanged and the file still matches the sha256 recorded beside it
    (``paths.fingerprint_record``): evaluate@ reruns when only the scoring changes, and then neither loads
    the model nor captions. -> (captions, kept)."""
    out = Path(out)
    header, inputs = _captioning_inputs(name, instance, evalset, device)
    fp = fingerprint(_sha256(paths.model(name) / MODEL_FILE), cfg.as_dict(instance.caption), inputs.fingerprint(),
                     code_version("pipeline.runner", methods.get(instance.method).__name__), device)
    record = paths.fingerprint_record(out)
    if record_holds(record, out.parent, fp):
        try:
            return json.loads(out.read_text(encoding="utf-8")), True
        except (OSError, ValueError):
            pass
    model, _ = load_checkpoint(paths.model(name) / MODEL_FILE, device)
    captions = caption_shards(model, header, instance.caption, inputs, progress)
    record.unlink(missing_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_json(out, captions)
    write_record(record, out.parent, (out.name,), fp)
    return captions, False


def _captioning_inputs(name: str, instance: cfg.MethodInstance, evalset: str, device: str):
    """(the checkpoint's header, the eval set's inputs) for captioning ``evalset`` with ``name``, checked to
    be of the method params.yaml names and from the CLIP the model was trained on."""
    header = trained_header(paths.model(name) / MODEL_FILE)
    if header["method"] != instance.method:
        raise ValueError(f"{paths.model(name)} holds a {header['method']} model but params.yaml says "
                         f"methods.{name}.method is {instance.method}: run `dvc repro train@{name}`")
    module = methods.get(instance.method)
    inputs = Inputs(module.needs(header["train"], instance.caption), device, evalset=evalset)
    try:
        require_same_model(trained_on=header["clip_model"], **{f"eval_features_{evalset}": inputs.data.clip})
    except ModelMismatchError as err:
        raise ModelMismatchError(f"{err}: the model {name} cannot caption these features") from None
    return header, inputs
