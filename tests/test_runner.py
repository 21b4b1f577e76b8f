"""The shared runner (pipeline/runner.py): the epoch loop, the optimiser and schedule it builds, the
shard/offset/row order a method's ``batch`` sees, the model folder (kept only when its fingerprint and
bytes are unchanged), safetensors checkpoints, and the checks on what is read (one CLIP model, known
sources). The artifacts here are small and synthetic (random features of a made-up CLIP identity): the
runner never looks inside a CLIP model.

``build_real_artifacts`` (below) writes small artifacts from real data as the stages write them; the
method tests (test_syntic, test_pcmnet, test_clipcap, test_modality_gap) train and caption on them."""
import hashlib
import json
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline import config as cfg
from pipeline import methods, paths, runner
from pipeline.data.aligned import shard_order
from pipeline.data.shards import ModelMismatchError, feature_array, write_sharded
from pipeline.methods import Data, Needs, syntic
from pipeline.nn import schedules
from pipeline.nn.schedules import Optim
from pipeline.support import SupportSet

pytestmark = pytest.mark.usefixtures("one_thread")

DIM = 16
CLIP = {"kind": "clip", "name": "fake-clip", "pretrained": None, "seed": 0, "weights_sha256": "a" * 64,
        "embed_dim": DIM, "dtype": "fp32"}
OTHER_CLIP = {**CLIP, "name": "other-clip", "weights_sha256": "b" * 64}
SUBJECTS = ["a dog", "a cat", "two children", "a man", "a woman", "a red car", "a bird", "a horse"]
PLACES = ["on the grass", "in the snow", "on a beach"]
TEXTS = [f"{s} {p}" for s in SUBJECTS for p in PLACES]           # 24 captions, 3 per subject (a group)
ROWS_PER_SHARD = 8
EVAL_IDS = [f"img{i}.jpg" for i in range(5)]

# SynTIC's Baseline (no FO / FP / AF): it reads the corpus captions and the synthetic image features only
BASE_TRAIN = {"fo": False, "fp": False, "af": False, "vocabulary": "corpus",
              "decoder": {"width": 16, "layers": 1, "heads": 2, "max_len": 12, "dropout": 0.1},
              "epochs": 2, "batch_size": 8, "optim": {"name": "adamw", "lr": 1e-2, "grad_clip": 1.0}, "seed": 0}


def instance(method="syntic", **train) -> cfg.MethodInstance:
    module = methods.get(method)
    return cfg.MethodInstance(method=method, train=cfg.parse(module.Train, {**BASE_TRAIN, **train}, "t"),
                              caption=cfg.parse(module.Caption, {"beam_size": 1, "batch_size": 4}, "c"))


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def content_id(*parts) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def write_features(folder, ids, id_column, feats, clip=CLIP):
    write_sharded(folder, len(ids), ROWS_PER_SHARD, content_id(ids, feats.tobytes(), clip),
                  lambda t: pa.table({id_column: ids[t.start:t.stop], "global": feature_array(feats[t.start:t.stop],
                                                                                             "float32")}),
                  {"model": clip, "dtype": "float32"})


def write_corpus(texts=TEXTS):
    rows = [{"caption_id": f"c{i:03d}", "group_id": f"g{i // 3}", "text": t, "split": "train", "source": "test"}
            for i, t in enumerate(texts)]
    write_sharded(paths.CORPUS, len(rows), ROWS_PER_SHARD, content_id(rows),
                  lambda t: pa.Table.from_pylist(rows[t.start:t.stop]), {"model": None})
    return [r["caption_id"] for r in rows]


def write_artifacts(texts=TEXTS):
    """corpus, synthetic image features (one direction per group, plus noise), eval features of two CLIPs."""
    ids = write_corpus(texts)
    rng = np.random.default_rng(0)
    groups = unit(rng.standard_normal((len(texts) // 3 + 1, DIM)))
    synthetic = unit(groups[np.arange(len(texts)) // 3] + 0.1 * rng.standard_normal((len(texts), DIM)))
    write_features(paths.SYNTHETIC_FEATURES, ids, "caption_id", synthetic.astype(np.float32))
    eval_feats = unit(rng.standard_normal((len(EVAL_IDS), DIM))).astype(np.float32)
    write_features(paths.eval_features("tiny"), EVAL_IDS, "image_id", eval_feats)
    write_features(paths.eval_features("other"), EVAL_IDS, "image_id", eval_feats, clip=OTHER_CLIP)
    return ids


# ---------------------------------------------------------------------------------------------
# fit: the epoch loop
# ---------------------------------------------------------------------------------------------
class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(3, 1)

    def loss(self, batch):
        err = (self.lin(batch["x"])[:, 0] - batch["y"]) ** 2
        return err.mean(), {"max_err": err.max().item()}


def toy_batches(sizes=(3, 1, 4)):
    g = torch.Generator().manual_seed(1)
    return [{"x": torch.randn(n, 3, generator=g), "y": torch.randn(n, generator=g), "note": "not a tensor"}
            for n in sizes]


def test_fit_epoch_loss_is_the_batch_size_weighted_mean():
    model, batches = Toy(), toy_batches()
    with torch.no_grad():
        per_batch = [model.loss(b) for b in batches]
    expected = sum(len(b["y"]) * loss.item() for b, (loss, _) in zip(batches, per_batch)) / 8
    expected_log = sum(len(b["y"]) * log["max_err"] for b, (_, log) in zip(batches, per_batch)) / 8
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)                     # lr 0: the weights never move
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    result = runner.fit(model, lambda epoch: iter(batches), 2, optimizer, scheduler, progress=False)
    assert result["epoch_loss"] == pytest.approx([expected, expected], rel=1e-6)
    assert [log["max_err"] for log in result["logs"]] == pytest.approx([expected_log] * 2, rel=1e-6)
    assert expected != pytest.approx(np.mean([loss.item() for loss, _ in per_batch]))  # not the plain batch mean
    assert result["steps"] == 6 and scheduler.last_epoch == 6                # the schedule steps per optimizer step
    assert result["step_loss"] == pytest.approx([loss.item() for loss, _ in per_batch] * 2, rel=1e-6)
    assert not model.training                                                  # left in eval mode
    # max_steps stops inside an epoch; the epoch's loss is over the batches it ran
    part = runner.fit(Toy(), lambda epoch: iter(batches), 5, *fresh_sgd(), progress=False, max_steps=2)
    assert part["steps"] == 2 and part["epoch_loss"] == pytest.approx([(3 * per_batch[0][0].item()
                                                                          + per_batch[1][0].item()) / 4], rel=1e-6)
    with pytest.raises(ValueError, match="epoch 0 yielded no batch"):
        runner.fit(Toy(), lambda epoch: iter([]), 1, *fresh_sgd(), progress=False)


def test_loss_curve_averages_steps_in_bins_never_across_phases():
    losses = [float(x) for x in range(10)]
    assert runner.loss_curve(losses, max_points=20) == [{"step": i + 1, "loss": x} for i, x in enumerate(losses)]
    assert runner.loss_curve(losses, max_points=4) == [{"step": 3, "loss": 1.0}, {"step": 6, "loss": 4.0},
                                                       {"step": 9, "loss": 7.0}, {"step": 10, "loss": 9.0}]
    assert runner.loss_curve(losses, [("mle", 4), ("rl", 6)], max_points=4) == [
        {"step": 3, "loss": 1.0, "phase": "mle"}, {"step": 4, "loss": 3.0, "phase": "mle"},
        {"step": 7, "loss": 5.0, "phase": "rl"}, {"step": 10, "loss": 8.0, "phase": "rl"}]
    assert 0.9 * runner.CURVE_POINTS < len(runner.loss_curve([1.0] * 123_457)) <= runner.CURVE_POINTS
    with pytest.raises(ValueError, match="the phases count 9 steps, the losses 10"):
        runner.loss_curve(losses, [("mle", 4), ("rl", 5)])


def fresh_sgd():
    model = Toy()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)


def test_fit_lowers_the_loss_and_clips_gradients():
    model, batches = Toy(), toy_batches((16, 16))
    optimizer, scheduler = schedules.build(model, Optim(name="adam", lr=0.05))
    result = runner.fit(model, lambda epoch: iter(batches), 30, optimizer, scheduler, grad_clip=1e-9,
                        progress=False)
    assert result["epoch_loss"][-1] < result["epoch_loss"][0]                  # Adam's step ignores the scale
    clipped = Toy()
    before = [p.detach().clone() for p in clipped.parameters()]
    opt = torch.optim.SGD(clipped.parameters(), lr=1.0)
    runner.fit(clipped, lambda epoch: iter(batches[:1]), 1, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
               grad_clip_value=1e-3, progress=False)
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(clipped.parameters(), before)])
    assert moved.abs().max() <= 1e-3 + 1e-9                                    # SGD lr 1: the step is the gradient


# ---------------------------------------------------------------------------------------------
# The optimiser and schedules every method's training takes (pipeline/nn/schedules.py)
# ---------------------------------------------------------------------------------------------
def lrs(optimizer, scheduler, steps):
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_schedules_warm_up_then_hold_or_decay_like_transformers():
    from transformers import get_linear_schedule_with_warmup
    model = Toy()
    opt, sched = schedules.build(model, Optim(name="adamw", lr=0.1, schedule="linear", warmup_steps=3), total_steps=10)
    ref_opt = torch.optim.AdamW(Toy().parameters(), lr=0.1)
    ref = get_linear_schedule_with_warmup(ref_opt, 3, 10)                    # ClipCap's schedule
    ours, theirs = lrs(opt, sched, 10), lrs(ref_opt, ref, 10)
    assert ours[:3] == pytest.approx([0.1 / 3, 0.2 / 3, 0.1])                 # warm-up from lr / warmup (no lr-0 step)
    assert ours[3:] == pytest.approx(theirs[3:], rel=1e-12)                   # then the same decay towards 0
    assert [schedules.warmup_linear_decay(s, 3, None) for s in (3, 50)] == [1.0, 1.0]   # no total: constant
    opt, sched = schedules.build(Toy(), Optim(name="adam", lr=0.1, warmup_steps=4))          # constant
    assert lrs(opt, sched, 7) == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1, 0.1])
    assert [schedules.warmup_constant(s, 0) for s in range(3)] == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="width"):
        schedules.build(Toy(), Optim(schedule="noam", warmup_steps=4))


def test_adamw_decays_matrices_only_and_adam_every_parameter():
    model = syntic.create(parse_train(af=True), facts_of(TEXTS))
    opt, _ = schedules.build(model, Optim(name="adamw", lr=1e-3, weight_decay=0.1))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() < 2 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))
    assert any(p is model.aux.no_object for p in plain["params"])             # the no-object vector: no decay
    (group,) = schedules.build(model, Optim(name="adam", lr=1e-3, weight_decay=0.1))[0].param_groups
    assert group["weight_decay"] == 0.1 and len(group["params"]) == len(list(model.parameters()))
    frozen = Toy().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        schedules.build(frozen, Optim())


# ---------------------------------------------------------------------------------------------
# train_model: what a method's batch() is handed
# ---------------------------------------------------------------------------------------------
def test_train_model_hands_batch_seeded_shard_orders_offsets_and_every_row_once(artifacts_root, monkeypatch):
    ids = write_artifacts()
    seen = []
    real = syntic.batch

    def spy(model, rows, idx, train, data, step):
        seen.append((step.epoch, step.shard, step.offset, [rows["caption_id"][i] for i in idx]))
        return real(model, rows, idx, train, data, step)

    monkeypatch.setattr(syntic, "batch", spy)
    s = instance().train
    inputs = runner.Inputs(syntic.needs(s), "cpu")
    assert inputs.num_shards == 3 and inputs.shard_rows() == [8, 8, 8]
    model, facts, result = runner.train_model(syntic, s, inputs, progress=False)
    assert result["steps"] == 6 and len(result["epoch_loss"]) == 2 and not model.training
    assert facts == facts_of(TEXTS)
    for epoch in range(2):
        rows = [r for r in seen if r[0] == epoch]
        assert [r[1] for r in rows] == shard_order(3, epoch, s.seed)         # the seeded shard order
        for _, shard, offset, batch_ids in rows:
            assert offset == 8 * shard                                        # the shard's first corpus row
            assert sorted(batch_ids) == ids[offset:offset + 8]                # its rows, shuffled
        assert sorted(i for r in rows for i in r[3]) == ids                   # every caption once per epoch
    first = [r[3] for r in seen]
    seen.clear()
    again, _, result2 = runner.train_model(syntic, s, runner.Inputs(syntic.needs(s), "cpu"), progress=False)
    assert [r[3] for r in seen] == first and result2 == result                # seeded: the same run
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# The model folder
# ---------------------------------------------------------------------------------------------
def test_model_folder_is_kept_when_unchanged_and_retrained_when_a_byte_flips(artifacts_root):
    write_artifacts()
    inst = instance()
    report = runner.train("base", inst, "cpu", progress=False)
    folder = paths.model("base")
    model_file = folder / runner.MODEL_FILE
    assert report["variant"] == "Baseline" and report["training_rows"] == 24 and report["steps"] == 6
    assert report["clip_model"] == CLIP and report["facts"] == facts_of(TEXTS) and "summary" in report
    # the curve (DVC plots rows): one row per step here, whose losses average to the epochs' losses
    assert [row["step"] for row in report["curve"]] == list(range(1, 7))
    assert np.mean([row["loss"] for row in report["curve"]]) == pytest.approx(np.mean(report["epoch_loss"]), rel=0.2)
    assert json.loads((folder / runner.REPORT_FILE).read_text()) == report
    recorded = json.loads(paths.fingerprint_record(folder).read_text())
    assert recorded["files"][runner.MODEL_FILE] == hashlib.sha256(model_file.read_bytes()).hexdigest()
    original, stamp = model_file.read_bytes(), model_file.stat().st_mtime_ns

    kept = runner.train("base", inst, "cpu", progress=False)
    assert kept == {**report, "kept_from_previous_run": True}
    assert model_file.stat().st_mtime_ns == stamp                              # not rewritten
    # an artifact this instance does not read changes: still kept (DVC reruns train@NAME for it)
    write_features(paths.OPTIMIZED, write_corpus(), "caption_id", unit(np.ones((24, DIM), np.float32)))
    assert runner.train("base", inst, "cpu", progress=False)["kept_from_previous_run"]

    damaged = bytearray(original)
    damaged[-1] ^= 0x01                                                        # one bit of the last weight
    model_file.write_bytes(bytes(damaged))
    retrained = runner.train("base", inst, "cpu", progress=False)
    assert "kept_from_previous_run" not in retrained and retrained == report
    assert model_file.read_bytes() == original                                 # deterministic: the same bytes

    changed = runner.train("base", instance(seed=1), "cpu", progress=False)    # other settings: retrained
    assert "kept_from_previous_run" not in changed and model_file.read_bytes() != original
    write_corpus(TEXTS[::-1])                                                   # other captions: retrained
    assert "kept_from_previous_run" not in runner.train("base", instance(seed=1), "cpu", progress=False)
    assert runner.kept_report(folder, "another fingerprint") is None


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
def parse_train(**kw):
    return cfg.parse(syntic.Train, {**BASE_TRAIN, **kw}, "t")


def facts_of(texts):
    from pipeline.nn.tokenizer import CaptionTokenizer
    return {"feature_dim": DIM, "vocabulary": CaptionTokenizer.for_corpus("corpus", texts).vocabulary}


def test_a_checkpoint_of_another_format_is_refused_naming_the_file(tmp_path):
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"), metadata={"format": "other"})
    save_file({"x": torch.zeros(2)}, str(tmp_path / "bare.safetensors"))
    torch.save({"x": torch.zeros(2)}, tmp_path / "pickled.safetensors")       # a torch pickle under that name
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00")
    for name in ("other", "bare", "pickled", "cut"):
        with pytest.raises(ValueError, match=rf"{name}.safetensors is not a synthcap.checkpoint.v2 checkpoint"):
            runner.load_checkpoint(tmp_path / f"{name}.safetensors")
    with pytest.raises(FileNotFoundError, match="no trained model at .*missing.safetensors"):
        runner.load_checkpoint(tmp_path / "missing.safetensors")


def test_load_checkpoint_loads_tensors_only_and_rebuilds_the_same_model(tmp_path, monkeypatch):
    train = parse_train(af=True, fp=True)
    facts = facts_of(TEXTS)
    torch.manual_seed(3)
    model = syntic.create(train, facts).eval()
    header = {"method": "syntic", "train": cfg.as_dict(train), "facts": facts, "clip_model": CLIP, "fingerprint": "f"}
    path = tmp_path / "model.safetensors"
    runner.save_checkpoint(model, path, header)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])                                        # safetensors: a JSON header, then bytes
    meta = json.loads(raw[8:8 + n])["__metadata__"]
    assert meta["format"] == runner.CHECKPOINT_FORMAT and json.loads(meta["synthcap"]) == header
    for i in range(6):                                                         # the same model, the same bytes
        runner.save_checkpoint(model, tmp_path / f"again{i}.safetensors", header)
        assert (tmp_path / f"again{i}.safetensors").read_bytes() == raw

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint must never be unpickled")

    for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    back, got = runner.load_checkpoint(path)
    monkeypatch.undo()
    assert got["train"] == train and got["facts"] == facts and got["clip_model"] == CLIP and not back.training
    assert runner.checkpoint_header(path) == header
    for (k, a), (k2, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    g = torch.Generator().manual_seed(0)
    tokens, lengths = model.tokenizer.encode(TEXTS[:4], 12)
    batch = {"feature": torch.randn(4, DIM, generator=g), "aux_query": torch.randn(4, DIM, generator=g),
             "tag_feats": torch.randn(4, 2, DIM, generator=g), "tag_mask": torch.tensor([[1, 1], [1, 0], [0, 0], [1, 0]]),
             "tokens": tokens, "lengths": lengths}
    with torch.no_grad():
        torch.testing.assert_close(back.decoder(back.prefix(batch), tokens), model.decoder(model.prefix(batch), tokens),
                                   rtol=0, atol=0)                              # the same logits
    assert back.generate(batch, beam_size=2) == model.generate(batch, beam_size=2)


def test_a_checkpoint_with_damaged_tensor_bytes_is_refused_naming_the_file_and_its_rebuild(tmp_path):
    train = parse_train()
    model = syntic.create(train, facts_of(TEXTS)).eval()
    header = {"method": "syntic", "train": cfg.as_dict(train), "facts": facts_of(TEXTS), "clip_model": CLIP}
    path = tmp_path / "methods" / "mine" / "model" / runner.MODEL_FILE
    path.parent.mkdir(parents=True)
    runner.save_checkpoint(model, path, header)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    sealed = json.loads(raw[8:8 + n])["__metadata__"][runner.TENSORS_SHA256_KEY]
    assert sealed == hashlib.sha256(raw[8 + n:]).hexdigest()                   # the checksum of the tensor bytes
    runner.load_checkpoint(path)                                                # intact: loads
    damaged = bytearray(raw)
    middle = 8 + n + (len(raw) - 8 - n) // 2
    damaged[middle:middle + 4096] = bytes(b ^ 0xFF for b in damaged[middle:middle + 4096])   # 4 KiB flipped
    path.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match=r"model\.safetensors is damaged: .*`dvc repro train@mine`"):
        runner.load_checkpoint(path)


# ---------------------------------------------------------------------------------------------
# What is read: one CLIP model, known sources
# ---------------------------------------------------------------------------------------------
def test_captioning_features_of_another_clip_model_is_refused_naming_both(artifacts_root):
    write_artifacts()
    inst = instance(epochs=1)
    runner.train("base", inst, "cpu", progress=False)
    captions = runner.caption("base", inst, "tiny", "cpu", progress=False)
    assert sorted(captions) == EVAL_IDS and all(isinstance(c, str) for c in captions.values())
    assert runner.caption("base", inst, "tiny", "cpu", progress=False) == captions          # deterministic
    with pytest.raises(ModelMismatchError, match=r"(?s)fake-clip.*other-clip.*the model base cannot caption"):
        runner.caption("base", inst, "other", "cpu", progress=False)
    with pytest.raises(ValueError, match="holds a syntic model but params.yaml says methods.base.method is pcmnet"):
        runner.caption("base", cfg.MethodInstance(method="pcmnet", train=None, caption=None), "tiny", "cpu")
    # the training side refuses to mix CLIP models too
    write_features(paths.OPTIMIZED, write_corpus(), "caption_id", unit(np.ones((24, DIM), np.float32)), clip=OTHER_CLIP)
    with pytest.raises(ModelMismatchError, match=r"(?s)(?=.*fake-clip)(?=.*other-clip)"):
        runner.train("fo", instance(fo=True, epochs=1), "cpu", progress=False)


def test_needs_naming_an_unknown_source_fail_naming_it(artifacts_root):
    write_artifacts()
    with pytest.raises(ValueError, match=r"`nosuch\.global`: 'nosuch' is not a training source"):
        runner.Inputs(Needs(rows={"x": "nosuch.global"}), "cpu")
    with pytest.raises(ValueError, match=r"`nosuch\.global`: 'nosuch' is not a captioning source"):
        runner.Inputs(Needs(rows={"x": "nosuch.global"}), "cpu", evalset="tiny")
    with pytest.raises(ValueError, match=r"'image' is not a training source"):          # the eval side at training
        runner.Inputs(Needs(rows={"x": "image.global"}), "cpu")
    with pytest.raises(ValueError, match=r"'synthetic' is not a captioning source"):    # the corpus side at captioning
        runner.Inputs(Needs(rows={"x": "synthetic.global"}), "cpu", evalset="tiny")
    with pytest.raises(ValueError, match=r"`synthetic\.nosuch`: 'synthetic' has no column 'nosuch'"):
        runner.Inputs(Needs(rows={"x": "synthetic.nosuch"}), "cpu")
    # a column the encode stage did not cache (no enabled instance reads it): named, with the artifact
    with pytest.raises(ValueError, match=r"features/synthetic has no column 'grid' \(it holds caption_id, global\): "
                                         r"the encode stage caches only .*`encode\.synthetic_columns`"):
        runner.Inputs(Needs(rows={"x": "synthetic.global", "y": "synthetic.grid"}), "cpu")
    with pytest.raises(ValueError, match=r"features/eval/tiny has no column 'attention' .*`encode\.eval_columns`"):
        runner.Inputs(Needs(rows={"x": "image.attention"}), "cpu", evalset="tiny")
    with pytest.raises(ValueError, match="at least one CLIP feature column"):
        runner.Inputs(Needs(rows={"text": "corpus.text"}), "cpu")
    inputs = runner.Inputs(Needs(rows={"text": "corpus.text", "image": "synthetic.global"}), "cpu")
    assert isinstance(inputs.data, Data) and inputs.data.clip == CLIP and inputs.data.feature_dim == DIM
    k, rows = next(inputs.shards())
    assert k == 0 and rows["text"] == TEXTS[:8] and rows["image"].shape == (8, DIM)
    assert rows["image"].dtype == np.float32


# ---------------------------------------------------------------------------------------------
# Small artifacts from real data, for the method tests
# ---------------------------------------------------------------------------------------------
TINY_CLIP = ("synthcap-tiny-vit", None, 0, "fp32", "cpu")        # clip_for(name, pretrained, seed, precision, device)
REAL_ROWS_PER_SHARD = 16


def build_real_artifacts(root: Path, shared: Path, parts: set[str], n_groups: int = 12, n_eval: int = 4,
                         clip_config: tuple = TINY_CLIP, synthetic_columns: tuple | None = None,
                         eval_columns: tuple | None = None) -> dict:
    """Artifacts under ``root`` (laid out as pipeline/paths.py lays out artifacts/), written as the stages
    write them (Parquet shards + manifests, the producing model in the meta):

    - ``corpus``: the Flickr8k train captions of ``n_groups`` photos present in the shared data (5 each)
      plus one caption of a further photo (a singleton group), in shards of 16 rows;
    - ``text``: their CLIP text features (the tiny seeded CLIP);
    - ``synthetic``: the CLIP features (``synthetic_columns``; None: every image column) of each caption's
      REAL photo, standing in for its synthetic image (no diffusion model runs in tests): every pair is a
      true pair; ``clip_config``: the CLIP (clip_for's arguments), the tiny seeded ViT by default;
    - ``evalset tiny`` and its features (``eval_columns``): ``n_eval`` photos outside the train split with
      their references;
    - ``parts`` adds: "optimized" (Eq. 2, a few steps), "tags" (the tiny detector's tags of both image
      sets, and the tag vocabulary), "support" (the corpus support set: tau 0.01, top-k 8), "target" (a
      support set "coco" over 200 COCO captions), "concepts" (40 concepts of the corpus nouns).
    Copy it into the ``artifacts_root`` fixture's folder with ``use_real_artifacts``."""
    from pipeline.data.captions import read_captions
    from pipeline.data.evalsets import EVAL_SCHEMA, load_eval_images, read_references
    from pipeline.data.shards import ShardedArtifact, feature_numpy, write_table_atomic
    from pipeline.extract.encode import encode_image_table, encode_text_table, patch_grid
    from pipeline.models.clip import IMAGE_COLUMNS, clip_for

    at = paths.layout(root)
    flickr = shared / "flickr8k"
    clip = clip_for(*clip_config)
    synthetic_columns, eval_columns = synthetic_columns or IMAGE_COLUMNS, eval_columns or IMAGE_COLUMNS
    train_split = set((flickr / "Flickr_8k.trainImages.txt").read_text().split())
    photos = {p.name for p in (flickr / "images").iterdir()}
    records = [r for r in read_captions(flickr / "Flickr8k.token.txt").records
               if r.group_id in photos and r.group_id in train_split]
    order = list(dict.fromkeys(r.group_id for r in records))
    chosen = set(order[:n_groups])
    rows = [r.to_dict() for r in records if r.group_id in chosen]
    rows += [next(r.to_dict() for r in records if r.group_id == order[n_groups])]
    blobs = {name: (flickr / "images" / name).read_bytes() for name in {r["group_id"] for r in rows}}
    references = read_references(flickr / "Flickr8k.token.txt")
    eval_names = sorted(n for n in photos - train_split if n in references)[:n_eval]
    eval_rows, _ = load_eval_images(flickr / "images", {n: references[n] for n in eval_names})
    clip_meta = {"model": clip.identity, "dtype": "float16"}

    def sharded(folder, n, make, meta):
        write_sharded(folder, n, REAL_ROWS_PER_SHARD, content_id(str(folder.relative_to(root))), make, meta,
                      desc=folder.name)

    def photo_table(t):
        part = rows[t.start:t.stop]
        return pa.table({"caption_id": [r["caption_id"] for r in part], "image": [blobs[r["group_id"]] for r in part]})

    def eval_table(t):
        return pa.Table.from_pylist(eval_rows[t.start:t.stop], schema=EVAL_SCHEMA)

    corpus = lambda t: pa.Table.from_pylist(rows[t.start:t.stop])               # noqa: E731
    sharded(at["CORPUS"], len(rows), corpus, {"model": None})
    sharded(at["TEXT_FEATURES"], len(rows), lambda t: encode_text_table(corpus(t), clip, 64, "float16"), clip_meta)
    sharded(at["SYNTHETIC_FEATURES"], len(rows),
            lambda t: encode_image_table(photo_table(t), clip, "caption_id", 16, "float16", synthetic_columns),
            {**clip_meta, **patch_grid(clip, synthetic_columns)})
    sharded(at["EVALSETS"] / "tiny", len(eval_rows), eval_table, {"model": None, "evalset": "tiny"})
    sharded(at["EVAL_FEATURES"] / "tiny", len(eval_rows),
            lambda t: encode_image_table(eval_table(t), clip, "image_id", 16, "float16", eval_columns),
            {**clip_meta, **patch_grid(clip, eval_columns)})

    def column(folder, name):
        return np.concatenate([feature_numpy(b.column(0)) for b in ShardedArtifact(folder).iter_batches([name])])

    text = column(at["TEXT_FEATURES"], "text_feature")
    if "optimized" in parts:
        from pipeline.methods.syntic import optimize_features
        image = column(at["SYNTHETIC_FEATURES"], "global")

        out, _ = optimize_features(image, text, tau=0.01, lr=1e-2, epochs=5, batch_size=8, seed=0)

        def optimized(t):
            return pa.table({"caption_id": [r["caption_id"] for r in rows[t.start:t.stop]],
                             "global": feature_array(out[t.start:t.stop], "float16")})
        sharded(at["OPTIMIZED"], len(rows), optimized, {"model": clip.identity})
    if "tags" in parts:
        from pipeline.extract.tag import tag_table, vocabulary_table
        from pipeline.models.detector import detector_for
        detector = detector_for("synthcap-tiny-detr", None, 0, "cpu")
        meta = {"model": detector.identity, "threshold": 0.3}
        names = sorted(blobs)                          # each photo once: its captions share its tags
        tagged = tag_table(pa.table({"caption_id": names, "image": [blobs[n] for n in names]}), detector,
                           "caption_id", 0.3, 5, 16, detector.input_size)

        def synthetic_tags(t):
            part = rows[t.start:t.stop]
            table = tagged.take([names.index(r["group_id"]) for r in part]).drop_columns(["caption_id"])
            return table.add_column(0, "caption_id", pa.array([r["caption_id"] for r in part], pa.string()))
        sharded(at["SYNTHETIC_TAGS"], len(rows), synthetic_tags, meta)
        sharded(at["EVAL_TAGS"] / "tiny", len(eval_rows),
                lambda t: tag_table(eval_table(t), detector, "image_id", 0.3, 5, 16, detector.input_size), meta)
        write_table_atomic(at["TAG_VOCABULARY"], vocabulary_table(detector.vocabulary, clip, "float16"),
                           {"model": clip.identity, "detector": detector.identity})
    if "support" in parts:
        SupportSet.build(text, tau=0.01, top_k=8, model=clip.identity).save(at["SUPPORTS"] / "corpus")
    if "target" in parts:
        coco = json.loads((shared / "coco-karpathy" / "val.json").read_text())
        captions = [c for entry in coco[:40] for c in entry["captions"]][:200]
        SupportSet.build(clip.encode_texts(captions), tau=0.0125, top_k=8, model=clip.identity).save(
            at["SUPPORTS"] / "coco")
    if "concepts" in parts:
        from pipeline.extract.concepts import concept_table, noun_counts
        table = concept_table(noun_counts(r["text"] for r in rows), clip, 40, 1, "float16")
        write_table_atomic(at["CONCEPTS"], table, {"model": clip.identity})
    return {"root": root, "clip": clip.identity, "rows": rows, "eval_ids": eval_names,
            "references": {r["image_id"]: r["references"] for r in eval_rows}}


def use_real_artifacts(built: dict, artifacts_root: Path) -> dict:
    """A fresh copy of artifacts built once per test module, where the ``artifacts_root`` fixture points
    every artifact path: each test trains into its own folder."""
    shutil.copytree(built["root"], artifacts_root, dirs_exist_ok=True)
    return {**built, "root": artifacts_root}
