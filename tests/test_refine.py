"""SynC's refined pairs (pipeline/refine.py, stages/refine.py) and the switch that trains on them
(``train.pairs: refined``, pipeline/runner.py Inputs): the cycle score against a direct computation, the
re-pairing against brute force, the filter, and the rows a refined instance trains on."""
import numpy as np
import pyarrow as pa
import pytest

from pipeline import config as cfg
from pipeline import paths, runner
from pipeline.data.shards import ShardedArtifact, feature_array, write_sharded
from pipeline.methods import pcmnet, syntic
from pipeline.refine import cycle_scores, keep_top, refine_brute_force, refine_pairs
from tests.test_runner import (CLIP, DIM, ROWS_PER_SHARD, TEXTS, content_id, instance, unit, write_artifacts,
                               write_corpus, write_features)

pytestmark = pytest.mark.usefixtures("one_thread")


def pool(n=120, m=100, d=8, e=6, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, d)).astype(np.float32), rng.standard_normal((m, d)).astype(np.float32),
            rng.standard_normal((n, e)).astype(np.float32))


def test_the_cycle_score_is_the_best_text_text_cosine_of_the_captions_each_candidate_retrieves():
    text, image, sentence = pool()
    k, kr = 5, 3
    got = refine_pairs(text, image, sentence, k=k, kr=kr, tau=1.0, batch_size=16)
    t, v, e = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (text, image, sentence))
    for i in range(text.shape[0]):                                       # the equations, caption by caption
        candidates = sorted(range(image.shape[0]), key=lambda j: -float(t[i] @ v[j]))[:k]
        scores = []
        for j in candidates:
            retrieved = sorted(range(text.shape[0]), key=lambda r: -float(v[j] @ t[r]))[:kr]
            scores.append(max(float(e[r] @ e[i]) for r in retrieved))
        best = int(np.argmax(scores))
        assert got.image_row[i] == candidates[best]
        assert got.score[i] == pytest.approx(scores[best], abs=1e-5)
    # the batched kernel on its own: [B, K] from candidates and the image -> caption lists
    candidates = np.array([[0, 1], [2, 0]])
    image_captions = np.array([[1, 2], [0, 0], [2, 1]])
    unit_e = e[:3]
    s = cycle_scores(candidates, image_captions, unit_e, np.array([0, 1]))
    assert s[0, 0] == pytest.approx(max(unit_e[1] @ unit_e[0], unit_e[2] @ unit_e[0]))
    assert s[1, 0] == pytest.approx(max(unit_e[2] @ unit_e[1], unit_e[1] @ unit_e[1]))   # its own caption: 1


@pytest.mark.parametrize("batch_size", [7, 1024])
def test_re_pairing_equals_brute_force_whatever_the_batch(batch_size):
    text, image, sentence = pool(n=300, m=250, d=16, e=12, seed=1)
    fast = refine_pairs(text, image, sentence, k=15, kr=2, tau=0.9, batch_size=batch_size)
    slow = refine_brute_force(text, image, sentence, k=15, kr=2, tau=0.9)
    assert np.array_equal(fast.image_row, slow.image_row)
    np.testing.assert_allclose(fast.score, slow.score, atol=1e-5)
    assert np.array_equal(fast.kept, slow.kept)
    assert len(np.unique(fast.image_row)) < 300                           # an image serves several captions


def test_tau_keeps_exactly_the_top_fraction_ties_in_corpus_order():
    score = np.array([0.5, 0.9, 0.5, 0.1, 0.7, 0.5, 0.3, 0.5, 0.2, 0.6], dtype=np.float32)
    for tau in (0.0, 0.1, 0.5, 0.55, 0.9, 1.0):
        kept = keep_top(score, tau)
        assert kept.sum() == int(tau * len(score))
        if 0 < kept.sum() < len(score):
            assert score[kept].min() >= score[~kept].max()
    kept = keep_top(score, 0.5)                                            # 0.9, 0.7, 0.6, then two of four 0.5s
    assert kept.tolist() == [True, True, True, False, True, False, False, False, False, True]
    assert refine_pairs(*pool(), tau=0.5).kept.sum() == 60


def test_a_pool_too_small_for_k_or_kr_fails_naming_it():
    text, image, sentence = pool(n=10, m=4)
    with pytest.raises(ValueError, match="K = 15"):
        refine_pairs(text, image, sentence, k=15)
    with pytest.raises(ValueError, match="Kr = 11"):
        refine_pairs(text, image, sentence, k=2, kr=11)


def test_refine_params_are_typed_and_validated():
    base = cfg.as_dict(cfg.Refine())
    assert base["k"] == 15 and base["kr"] == 2 and base["tau"] == 0.9 and base["retrieval_model"] == "clip"
    for key, value, message in (("tau", 1.5, "tau"), ("k", 0, "k"), ("retrieval_model", "siglip2", "retrieval_model"),
                                ("kk", 3, "kk")):
        with pytest.raises(cfg.ConfigError, match=message):
            cfg.parse(cfg.Refine, {**base, key: value}, "refine")


# ---------------------------------------------------------------------------------------------
# train.pairs: refined
# ---------------------------------------------------------------------------------------------
def write_refined(ids, image_row, kept):
    n = len(ids)
    write_sharded(paths.REFINED, n, ROWS_PER_SHARD, content_id(list(image_row), list(kept)),
                  lambda t: pa.table({"caption_id": ids[t.start:t.stop],
                                      "image_row": pa.array(image_row[t.start:t.stop], pa.int64()),
                                      "image_caption_id": [ids[j] for j in image_row[t.start:t.stop]],
                                      "score": pa.array(np.ones(t.stop - t.start), pa.float32()),
                                      "kept": pa.array(kept[t.start:t.stop], pa.bool_())}),
                  {"model": CLIP})


def repairing(n=24, seed=3):
    rng = np.random.default_rng(seed)
    image_row = rng.permutation(n)[(np.arange(n) * 5) % n]                # several captions share an image
    kept = rng.random(n) < 0.7
    kept[:ROWS_PER_SHARD] = False                                          # a corpus shard whose captions all drop
    return image_row, kept


def test_pairs_refined_trains_on_the_kept_captions_with_their_re_paired_images(artifacts_root):
    ids = write_artifacts()
    image_row, kept = repairing()
    write_refined(ids, image_row, kept)
    synthetic = np.stack(ShardedArtifact(paths.SYNTHETIC_FEATURES).read_column("global").to_numpy(
        zero_copy_only=False)).astype(np.float32)
    s = instance(pairs="refined").train
    inputs = runner.Inputs(syntic.needs(s), "cpu")
    # training shard k: the kept captions whose re-paired image lies in synthetic shard k (read once an epoch)
    assert inputs.shard_rows() == [int((kept & (image_row // 8 == k)).sum()) for k in (0, 1, 2)]
    seen = {}
    for k, rows in inputs.shards([2, 0, 1]):
        for caption_id, text, feature in zip(rows["caption_id"], rows["text"], rows["image"]):
            assert caption_id not in seen
            seen[caption_id] = (k, text, feature)
    assert sorted(seen) == [i for i, keep in zip(ids, kept) if keep]       # the kept captions, each once
    for i, caption_id in enumerate(ids):
        if kept[i]:
            k, text, feature = seen[caption_id]
            assert text == TEXTS[i] and k == image_row[i] // 8             # the caption's own text
            np.testing.assert_allclose(feature, synthetic[image_row[i]])   # its re-paired image
    model, _, result = runner.train_model(syntic, s, inputs, progress=False)
    assert result["steps"] == sum(-(-r // s.batch_size) for r in inputs.shard_rows()) * s.epochs
    original = runner.Inputs(syntic.needs(instance().train), "cpu")
    assert original.shard_rows() == [8, 8, 8]                              # the switch off: every original pair


def test_pcmnet_refined_weighs_the_caption_against_its_re_paired_image():
    """Eq. 11's CLIP weight is computed from the batch's own (text, image) pair: the re-paired one."""
    g = unit(np.random.default_rng(0).standard_normal((4, DIM)))
    t = unit(np.random.default_rng(1).standard_normal((4, DIM)))
    import torch
    w = pcmnet.clip_weights(torch.tensor(g[[2, 2, 0, 1]]), torch.tensor(t), 2.5)
    direct = np.minimum(1, 2.5 * np.maximum((g[[2, 2, 0, 1]] * t).sum(1), 0))
    np.testing.assert_allclose(w.numpy(), direct, rtol=1e-5)
    assert pcmnet.needs(cfg.parse(pcmnet.Train, {"pairs": "refined"}, "t")).pairs == "refined"


def test_only_instances_that_read_refined_pairs_depend_on_them(artifacts_root):
    """The fingerprint covers the refine artifact exactly for pairs: refined (DVC reruns every train@ when
    artifacts/refined changes; the others keep their model)."""
    ids = write_artifacts()
    image_row, kept = repairing()
    write_refined(ids, image_row, kept)
    original, refined = instance().train, instance(pairs="refined").train
    before = {name: runner.Inputs(syntic.needs(s), "cpu").fingerprint() for name, s in
              (("original", original), ("refined", refined))}
    write_refined(ids, image_row, ~kept)                                   # refine's parameters changed
    after = {name: runner.Inputs(syntic.needs(s), "cpu").fingerprint() for name, s in
             (("original", original), ("refined", refined))}
    assert before["original"] == after["original"] and before["refined"] != after["refined"]
    assert before["original"] != before["refined"]


def test_syntic_fo_refined_reads_the_optimised_refined_features(artifacts_root):
    ids = write_artifacts()
    image_row, kept = repairing()
    write_refined(ids, image_row, kept)
    optimized = unit(np.random.default_rng(5).standard_normal((24, DIM))).astype(np.float32)
    write_features(paths.OPTIMIZED_REFINED, ids, "caption_id", optimized)
    write_features(paths.OPTIMIZED, ids, "caption_id", -optimized)
    inputs = runner.Inputs(syntic.needs(instance(fo=True, pairs="refined").train), "cpu")
    for _, rows in inputs.shards():
        for caption_id, feature in zip(rows["caption_id"], rows["optimized"]):
            np.testing.assert_allclose(feature, optimized[ids.index(caption_id)], atol=1e-6)   # the caption's row


@pytest.mark.parametrize("method", ["clipcap", "maccap"])
def test_text_feature_methods_have_no_pairs_switch(method):
    """CapDec, DeCap, Unsupervised-ClipCap (clipcap) and MacCap train on text features: no synthetic pair."""
    with pytest.raises(cfg.ConfigError, match="pairs"):
        cfg.MethodInstance.parse({"method": method, "train": {"pairs": "refined"}}, "methods.x")


# ---------------------------------------------------------------------------------------------
# Profiles and the report
# ---------------------------------------------------------------------------------------------
def test_the_world_compares_refined_syntic_and_pcmnet_with_their_originals():
    from pipeline.evaluation.report import original_instance
    from pipeline.profiles import resolve_profile
    world = cfg.from_dict(resolve_profile("world"))
    assert world.refine.text_similarity == "clip"                          # the world needs nothing new
    assert original_instance(world, "syntic-refined") == "syntic"
    assert original_instance(world, "pcmnet-refined") == "pcmnet"
    paper = cfg.from_dict(resolve_profile("paper-coco"))
    assert paper.methods["pcmnet-sync"].train.pairs == "refined" and original_instance(paper, "pcmnet-sync") == "pcmnet"
    assert paper.refine.text_similarity == "sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2"
    assert pcmnet.variant(paper.methods["pcmnet-sync"].train, None) == "Base+Mix-up+CXE+SynC"
    from pipeline.evaluation import papers
    row = papers.paper_row("pcmnet", "Base+Mix-up+CXE+SynC", "coco", "coco")
    assert row is not None and row.metrics["CIDEr"] == 112.0 and row.metrics["BLEU-4"] == 33.6


def test_the_report_shows_refined_rows_beside_originals_and_the_pair_audit(tmp_path):
    from pipeline.evaluation.report import write_report
    audit = {"original": {"pairs": 100, "exact_matches": 60, "exact_match_fraction": 0.6},
             "re-paired": {"pairs": 100, "exact_matches": 70, "exact_match_fraction": 0.7},
             "refined": {"pairs": 90, "exact_matches": 72, "exact_match_fraction": 0.8}}
    refined = {"rows": [{"method": "syntic-refined", "original": "syntic", "eval_set": "shapes",
                         "CIDEr": (0.5, 0.625), "object_f1": (0.7, 0.65)}],
               "report": {"k": 15, "kr": 2, "tau": 0.9, "kept": 90, "captions": 100, "pair_audit": audit}}
    write_report(tmp_path / "r.html", "t", [], [], refined=refined)
    page = (tmp_path / "r.html").read_text()
    assert "Refined synthetic pairs (SynC)" in page and "90 of 100 kept" in page
    assert "original 0.600 (60 of 100)" in page and "refined (kept) 0.800 (72 of 90)" in page
    assert "<td>50.0</td><td>62.5</td><td>+12.5</td>" in page                # CIDEr x100 and its difference
    assert "<td>0.700</td><td>0.650</td><td>-0.050</td>" in page             # object F1 and its difference


# ---------------------------------------------------------------------------------------------
# The stage, in a small world
# ---------------------------------------------------------------------------------------------
def test_the_stage_re_pairs_a_world_pool_and_raises_the_share_of_correct_pairs(artifacts_root, monkeypatch):
    """Two captions per scene, each drawn once; a third of the drawings show another scene. The features know
    only what was drawn (image) and described (text): refine finds each wrongly drawn caption its twin's image,
    and the checker's share of correct pairs, exactly as pair_audit counts it, rises."""
    import json
    from pipeline.world.checker import pair_audit
    from pipeline.world.grammar import describe
    from pipeline.world.scenes import Scene, sample_scene
    from stages import refine as stage
    rng = np.random.default_rng(0)
    scenes = []
    while len(scenes) < 30:
        s = sample_scene(rng)
        if all(s.kinds() != o.kinds() for o in scenes):
            scenes.append(s)
    n = 2 * len(scenes)
    ids = [f"c{i:03d}" for i in range(n)]
    texts = [describe(scenes[i // 2], rng) for i in range(n)]
    wrong = np.zeros(n, dtype=bool)
    wrong[0::6] = True                                                      # one of each scene's two drawings, ...
    drawn = [(i // 2 + 7) % len(scenes) if wrong[i] else i // 2 for i in range(n)]   # ... of another scene
    basis = unit(rng.standard_normal((len(scenes), DIM)))
    text = unit(basis[np.arange(n) // 2] + 0.05 * rng.standard_normal((n, DIM))).astype(np.float32)
    image = unit(basis[drawn] + 0.05 * rng.standard_normal((n, DIM))).astype(np.float32)
    write_corpus(texts)
    for folder, column, feats in ((paths.TEXT_FEATURES, "text_feature", text), (paths.SYNTHETIC_FEATURES, "global", image)):
        write_sharded(folder, n, ROWS_PER_SHARD, content_id(column, feats.tobytes()),
                      lambda t, c=column, f=feats: pa.table({"caption_id": ids[t.start:t.stop],
                                                             c: feature_array(f[t.start:t.stop], "float32")}),
                      {"model": CLIP})
    scene_json = [json.dumps(scenes[d].to_dict()) for d in drawn]
    write_sharded(paths.SYNTHETIC_IMAGES, n, ROWS_PER_SHARD, content_id(scene_json),
                  lambda t: pa.table({"caption_id": ids[t.start:t.stop], "text": texts[t.start:t.stop],
                                      "scene": scene_json[t.start:t.stop]}), {"model": None})
    from pipeline.profiles import resolve_profile
    config = cfg.from_dict({**resolve_profile("world"), "rows_per_shard": ROWS_PER_SHARD,
                            "refine": {"k": 4, "kr": 2, "tau": 0.9}})
    monkeypatch.setattr(stage, "start", lambda name: config)
    stage.main()

    refined = ShardedArtifact(paths.REFINED)
    assert refined.num_rows == n and len(refined.paths) == -(-n // ROWS_PER_SHARD)
    expected = refine_pairs(text, image, text, k=4, kr=2, tau=0.9)
    assert refined.read_column("image_row").to_pylist() == expected.image_row.tolist()
    assert refined.read_column("kept").to_pylist() == expected.kept.tolist()
    np.testing.assert_allclose(refined.read_column("score").to_numpy(), expected.score)
    report = json.loads(paths.REFINE_REPORT.read_text())
    assert report["kept"] == int(0.9 * n) and report["captions"] == n
    audit = report["pair_audit"]
    drawn_scenes = [scenes[d] for d in drawn]
    assert audit["original"]["exact_match_fraction"] == pair_audit(texts, drawn_scenes)["exact_match_fraction"]
    repaired = [drawn_scenes[j] for j in expected.image_row]
    kept = expected.kept
    assert audit["refined"]["exact_match_fraction"] == pair_audit(
        [t for t, k in zip(texts, kept) if k], [s for s, k in zip(repaired, kept) if k])["exact_match_fraction"]
    assert audit["refined"]["exact_match_fraction"] > audit["original"]["exact_match_fraction"]
    for i in np.flatnonzero(wrong):                                        # the wrong drawings' captions found
        assert drawn[expected.image_row[i]] == i // 2                      # an image of their own scene


def test_row_gather_returns_rows_of_any_shard_in_the_order_asked(artifacts_root):
    """The data layer's gather (CMSA's and SynTIC's AF tags, PCM-Net's patches come the same way)."""
    from pipeline.data.aligned import Column, RowGather
    ids = write_corpus()
    feats = unit(np.random.default_rng(2).standard_normal((24, DIM))).astype(np.float32)
    labels = [[f"tag{i}", "shared"] if i % 2 else [] for i in range(24)]
    write_sharded(paths.SYNTHETIC_TAGS, 24, ROWS_PER_SHARD, content_id(labels),
                  lambda t: pa.table({"caption_id": ids[t.start:t.stop], "labels": labels[t.start:t.stop]}),
                  {"model": None})
    write_features(paths.SYNTHETIC_FEATURES, ids, "caption_id", feats)
    gather = RowGather([Column(ShardedArtifact(paths.SYNTHETIC_FEATURES), "global", "image"),
                        Column(ShardedArtifact(paths.SYNTHETIC_TAGS), "labels", "tags")])
    rows = np.array([23, 0, 9, 9, 16, 7])
    got = gather.gather(rows)
    np.testing.assert_allclose(got["image"], feats[rows], atol=1e-6)
    assert got["tags"] == [labels[r] for r in rows]
    with pytest.raises(ValueError, match="row 24"):
        gather.gather(np.array([24]))


def test_a_missing_sentence_transformers_package_is_named_with_the_fix(monkeypatch):
    import builtins
    from pipeline.models.sentence import sentence_encoder_for
    real = builtins.__import__

    def no_package(name, *args, **kwargs):
        if name.startswith("sentence_transformers"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_package)
    with pytest.raises(RuntimeError, match="pip install sentence-transformers.*text_similarity: clip"):
        sentence_encoder_for("sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2")


# ---------------------------------------------------------------------------------------------
# Real features (tests/test_runner.py build_real_artifacts): PCM-Net and CMSA trained on refined pairs
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(tmp_path_factory, shared_data):
    from tests.test_runner import build_real_artifacts
    return build_real_artifacts(tmp_path_factory.mktemp("refine-artifacts"), shared_data, {"concepts", "tags"})


@pytest.fixture
def real(built, artifacts_root):
    """The real artifacts, refined by SynC (K = 5, Kr = 2, tau = 0.7) as stage refine writes them."""
    from tests.test_runner import REAL_ROWS_PER_SHARD, use_real_artifacts
    art = use_real_artifacts(built, artifacts_root)
    texts, images = ShardedArtifact(paths.TEXT_FEATURES), ShardedArtifact(paths.SYNTHETIC_FEATURES)
    text = np.stack(texts.read_column("text_feature").to_numpy(zero_copy_only=False)).astype(np.float32)
    pool = np.stack(images.read_column("global").to_numpy(zero_copy_only=False)).astype(np.float32)
    image = pool[np.random.default_rng(0).permutation(len(pool))]    # refined on shuffled rows: most re-paired
    ids = texts.read_column("caption_id").to_pylist()
    refined = refine_pairs(text, image, text, k=5, kr=2, tau=0.7)
    write_sharded(paths.REFINED, len(ids), REAL_ROWS_PER_SHARD, content_id(refined.image_row.tolist()),
                  lambda t: pa.table({"caption_id": ids[t.start:t.stop],
                                      "image_row": pa.array(refined.image_row[t.start:t.stop], pa.int64()),
                                      "image_caption_id": [ids[j] for j in refined.image_row[t.start:t.stop]],
                                      "score": pa.array(refined.score[t.start:t.stop], pa.float32()),
                                      "kept": pa.array(refined.kept[t.start:t.stop], pa.bool_())}),
                  {"model": images.model})
    return {**art, "refined": refined, "text": text, "global": pool}


def test_pcmnet_refined_trains_on_the_kept_rows_with_eq_11_weights_of_the_re_paired_images(real):
    from tests.test_pcmnet import PIPELINE_TRAIN
    refined = real["refined"]
    instance = cfg.MethodInstance(method="pcmnet", train=cfg.parse(pcmnet.Train, {**PIPELINE_TRAIN, "pairs": "refined",
                                                                                   "epochs": 1}, "t"),
                                  caption=cfg.parse(pcmnet.Caption, {"beam_size": 1}, "c"))
    report = runner.train("pcmnet-refined", instance, "cpu", progress=False)
    assert report["training_rows"] == int(refined.kept.sum()) and report["variant"] == "Base+Mix-up+CXE+SynC"
    g = real["global"][refined.image_row[refined.kept]]                  # each kept caption's re-paired image
    t = real["text"][refined.kept]
    cos = (g * t).sum(1) / np.linalg.norm(g, axis=1) / np.linalg.norm(t, axis=1)
    direct = np.minimum(1.0, PIPELINE_TRAIN["clip_w"] * np.maximum(cos, 0.0)).mean()    # Eq. 11 by hand
    assert report["logs"][0]["clip_weight"] == pytest.approx(direct, rel=1e-4)


def test_cmsa_refined_reads_the_tags_of_the_re_paired_images(real):
    from pipeline.methods import cmsa
    refined = real["refined"]
    tags = ShardedArtifact(paths.SYNTHETIC_TAGS).read_column("labels").to_pylist()
    ids = ShardedArtifact(paths.CORPUS).read_column("caption_id").to_pylist()
    s = cfg.parse(cmsa.Train, {"pairs": "refined", "vocabulary": "corpus", "rl_epochs": 0}, "t")
    inputs = runner.Inputs(cmsa.needs(s), "cpu")
    seen = 0
    for _, rows in inputs.shards():
        for caption_id, labels in zip(rows["caption_id"], rows["tags"]):
            assert labels == tags[refined.image_row[ids.index(caption_id)]]
            seen += 1
    assert seen == int(refined.kept.sum())


def test_optimize_refined_runs_eq_2_over_the_kept_re_paired_rows_only(artifacts_root, monkeypatch):
    from pipeline.methods.syntic import optimize_features
    from pipeline.profiles import resolve_profile
    from stages import optimize as stage
    ids = write_artifacts()
    text = unit(np.random.default_rng(4).standard_normal((24, DIM))).astype(np.float32)
    write_sharded(paths.TEXT_FEATURES, 24, ROWS_PER_SHARD, content_id("text", text.tobytes()),
                  lambda t: pa.table({"caption_id": ids[t.start:t.stop],
                                      "text_feature": feature_array(text[t.start:t.stop], "float32")}), {"model": CLIP})
    image_row, kept = repairing()
    write_refined(ids, image_row, kept)
    config = cfg.from_dict({**resolve_profile("offline"), "rows_per_shard": ROWS_PER_SHARD, "feature_dtype": "float32",
                            "optimize": {"epochs": 3, "batch_size": 4, "lr": 1e-2}})
    monkeypatch.setattr(stage, "start", lambda name: config)
    stage.main("refined")
    got = np.stack(ShardedArtifact(paths.OPTIMIZED_REFINED).read_column("global").to_numpy(zero_copy_only=False))
    pool = np.stack(ShardedArtifact(paths.SYNTHETIC_FEATURES).read_column("global").to_numpy(zero_copy_only=False))
    o = config.optimize
    direct, _ = optimize_features(pool[image_row][kept], text[kept], tau=o.tau, lr=o.lr, epochs=o.epochs,
                                  batch_size=o.batch_size, seed=o.seed)
    np.testing.assert_allclose(got[kept], direct, atol=1e-6)               # Eq. 2 on the kept re-paired pairs
    np.testing.assert_allclose(got[~kept], pool[image_row][~kept], atol=1e-6)   # the others as they are
    assert not paths.OPTIMIZED.exists()                                    # the original optimize untouched


def tiny_sentence_model(folder):
    """A small sentence-transformers model saved as the hub's are (a BERT encoder + mean pooling, the shape of
    SynC's paraphrase-multilingual-MiniLM-L12-v2), built from a config with seeded weights and a WordPiece
    vocabulary of single characters."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizerFast
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list(".,'-0123456789")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *(f"##{c}" for c in letters)]
    files = folder / "files"
    files.mkdir(parents=True)
    (files / "vocab.txt").write_text("\n".join(vocab) + "\n")
    torch.manual_seed(0)
    encoder = folder / "encoder"
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=128)).save_pretrained(encoder)
    BertTokenizerFast(vocab_file=str(files / "vocab.txt"), do_lower_case=True).save_pretrained(encoder)
    word = Transformer(str(encoder), max_seq_length=96)
    out = folder / "sentence-model"
    SentenceTransformer(modules=[word, Pooling(word.get_embedding_dimension(), "mean")]).save(str(out))
    return out


def test_a_sentence_transformers_model_loads_from_a_folder_and_embeds_as_its_mean_pooled_encoder(tmp_path):
    """pipeline/models/sentence.py against a direct computation: the masked mean of the encoder's last hidden
    states, L2-normalised; its identity is the hash of its weights."""
    import torch
    from transformers import AutoModel, AutoTokenizer
    from pipeline.models.sentence import sentence_encoder_for
    folder = tiny_sentence_model(tmp_path)
    encode, identity = sentence_encoder_for(str(folder), batch_size=2)
    texts = ["a red ball left of a box.", "two green discs", "x"]
    got = encode(texts)
    tokenizer, model = AutoTokenizer.from_pretrained(tmp_path / "encoder"), AutoModel.from_pretrained(tmp_path / "encoder")
    with torch.no_grad():
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        want = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    assert got.shape == (3, 16) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert identity["library"] == "sentence-transformers" and len(identity["weights_sha256"]) == 64
    with pytest.raises(RuntimeError, match="could not load the sentence-transformers model .*missing"):
        sentence_encoder_for(str(tmp_path / "missing"))
