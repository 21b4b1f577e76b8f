"""Eq. 3 (feature projection onto the text support set) against a direct float64 computation; a support
set's own tau and top-k (``project(queries)`` uses them; ``top_k=None`` is the exact projection)."""
import json

import numpy as np
import pytest

from pipeline.support import SupportSet, project_exact


def naive_projection(queries, support, tau):
    """Eq. 3 written out: full softmax over every support feature, float64."""
    q = queries.astype(np.float64)
    t = support.astype(np.float64)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    out = np.zeros_like(q)
    for i in range(q.shape[0]):
        logits = np.array([q[i] @ t[j] / tau for j in range(t.shape[0])])
        w = np.exp(logits - logits.max())
        w /= w.sum()
        out[i] = (w[:, None] * t).sum(0)
    return out


def data(n=300, q=20, d=16, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((q, d)).astype(np.float32) * 3.0,
            rng.standard_normal((n, d)).astype(np.float32) * 2.0)


@pytest.mark.parametrize("tau", [0.01, 0.1, 1.0])
@pytest.mark.parametrize("chunk", [65536, 7, 1])
def test_project_exact_matches_naive_softmax(tau, chunk):
    queries, support = data()
    got = project_exact(queries, support, tau, chunk_size=chunk, query_chunk_size=6)
    assert got.dtype == np.float32 and got.shape == queries.shape
    np.testing.assert_allclose(got, naive_projection(queries, support, tau), atol=2e-6, rtol=1e-5)


def test_project_exact_small_tau_is_not_argmax():
    # a sanity check that the test above exercises a real softmax: the weights are spread
    queries, support = data()
    v = naive_projection(queries, support, 0.1)
    assert (np.linalg.norm(v, axis=1) < 0.99).all()


def test_topk_equal_to_n_is_exact():
    queries, support = data()
    ss = SupportSet.build(support)
    np.testing.assert_allclose(ss.project(queries, 0.05, top_k=len(support)),
                               ss.project(queries, 0.05, top_k=None), atol=2e-6)
    # k larger than N is clamped to N
    np.testing.assert_allclose(ss.project(queries, 0.05, top_k=10 * len(support)),
                               ss.project(queries, 0.05, top_k=None), atol=2e-6)


def test_topk_agreement_reported_and_high_for_small_tau():
    queries, support = data(n=1000, q=50)
    ss = SupportSet.build(support)
    sharp = ss.projection_agreement(queries, tau=0.01, top_k=16)
    flat = ss.projection_agreement(queries, tau=1.0, top_k=16)
    assert set(sharp) >= {"mean_cosine", "min_cosine", "n"}
    assert sharp["n"] == 50
    assert sharp["min_cosine"] <= sharp["mean_cosine"] <= 1.0 + 1e-6
    assert sharp["min_cosine"] > 0.99
    assert flat["mean_cosine"] < sharp["mean_cosine"]
    # the reported number really is the cosine between the two projections
    a = ss.project(queries, 0.01, top_k=16).astype(np.float64)
    e = naive_projection(queries, support, 0.01)
    cos = (a * e).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(e, axis=1)
    assert abs(cos.mean() - sharp["mean_cosine"]) < 1e-5


def test_topk_is_softmax_over_the_k_nearest():
    queries, support = data()
    ss = SupportSet.build(support)
    k, tau = 5, 0.05
    t = support / np.linalg.norm(support, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    cos = q.astype(np.float64) @ t.T.astype(np.float64)
    expected = []
    for i in range(len(q)):
        nn_ids = np.argsort(-cos[i])[:k]
        w = np.exp(cos[i, nn_ids] / tau - (cos[i, nn_ids] / tau).max())
        expected.append((w / w.sum()) @ t[nn_ids])
    np.testing.assert_allclose(ss.project(queries, tau, top_k=k), np.array(expected), atol=2e-6)


def test_ivf_exhaustive_equals_flat():
    queries, support = data(n=500, q=30, seed=1)
    flat = SupportSet.build(support, "Flat")
    ivf = SupportSet.build(support, "IVF4,Flat", nprobe=4)
    assert ivf.nprobe == 4
    np.testing.assert_allclose(ivf.project(queries, 0.02, top_k=20),
                               flat.project(queries, 0.02, top_k=20), atol=1e-6)


MODEL = {"kind": "clip", "name": "synthcap-tiny-vit", "pretrained": None, "seed": 0, "weights_sha256": "ab" * 32,
         "embed_dim": 16}


def test_project_uses_the_sets_own_tau_and_top_k_unless_given():
    queries, support = data(n=400, q=12, seed=4)
    ss = SupportSet.build(support, tau=0.05, top_k=7, model=MODEL)
    assert (ss.tau, ss.top_k, ss.model) == (0.05, 7, MODEL)
    np.testing.assert_array_equal(ss.project(queries), ss.project(queries, 0.05, top_k=7))
    np.testing.assert_array_equal(ss.project(queries, 0.2), ss.project(queries, 0.2, top_k=7))   # own top-k
    np.testing.assert_array_equal(ss.project(queries, top_k=3), ss.project(queries, 0.05, top_k=3))  # own tau
    exact = ss.project(queries, top_k=None)                                   # the exact Eq. 3, own tau
    np.testing.assert_allclose(exact, naive_projection(queries, support, 0.05), atol=2e-6, rtol=1e-5)
    assert np.abs(exact - ss.project(queries)).max() > 1e-4                   # top-7 is not the exact projection
    chunked = ss.project(queries, top_k=None, chunk_size=50, query_chunk_size=5)   # streamed in both directions
    np.testing.assert_allclose(chunked, exact, atol=2e-6, rtol=1e-5)
    whole = SupportSet.build(support, tau=0.05)                               # top_k None: exact by default
    np.testing.assert_array_equal(whole.project(queries), exact)
    with pytest.raises(ValueError, match="tau"):
        SupportSet.build(support, tau=0.0)
    with pytest.raises(ValueError, match="top_k"):
        ss.project(queries, top_k=0)


def test_save_load_round_trip(tmp_path):
    queries, support = data(n=500, q=10, seed=2)
    ss = SupportSet.build(support, "IVF4,Flat", nprobe=2, tau=0.02, top_k=8, model=MODEL)
    ss.save(tmp_path / "s")
    meta = json.loads((tmp_path / "s" / "support.json").read_text())
    assert meta == {"n": 500, "dim": 16, "index": "IVF4,Flat", "nprobe": 2, "tau": 0.02, "top_k": 8, "model": MODEL}
    back = SupportSet.load(tmp_path / "s")
    assert back.nprobe == 2 and back.n == 500 and back.dim == 16
    assert (back.tau, back.top_k, back.model) == (0.02, 8, MODEL)             # the set's own Eq. 3 settings
    np.testing.assert_array_equal(back.features, ss.features)
    np.testing.assert_array_equal(back.project(queries, 0.02, top_k=8), ss.project(queries, 0.02, top_k=8))
    np.testing.assert_array_equal(back.project(queries), ss.project(queries, 0.02, top_k=8))
    np.testing.assert_array_equal(back.project(queries, 0.02, top_k=None), ss.project(queries, 0.02, top_k=None))


def test_load_rejects_inconsistent_files(tmp_path):
    _, support = data(n=50, seed=3)
    d = SupportSet.build(support).save(tmp_path / "s")
    np.save(d / "features.npy", np.zeros((49, 16), np.float32))
    with pytest.raises(ValueError, match="shape"):
        SupportSet.load(d)
    np.save(d / "features.npy", np.zeros((50, 16), np.float32))
    meta = json.loads((d / "support.json").read_text())
    meta.update(n=49)
    (d / "support.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError):
        SupportSet.load(d)


def test_dim_mismatch_error_states_both_dims():
    queries, support = data()
    ss = SupportSet.build(support)
    bad = np.zeros((3, 12), np.float32)
    with pytest.raises(ValueError, match=r"12.*16"):
        ss.project(bad, 0.01, top_k=None)
    with pytest.raises(ValueError, match=r"12.*16"):
        ss.project(bad, 0.01, top_k=3)
    with pytest.raises(ValueError, match=r"12.*16"):
        project_exact(bad, support, 0.01)


def test_features_are_normalised_float32():
    _, support = data()
    ss = SupportSet.build(support)
    assert ss.features.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ss.features, axis=1), 1.0, atol=1e-6)


# ---- the fast paths: torch streaming exact Eq. 3, `index: auto`, exact scores from the index ----------
def dense_reference(queries, support, tau):
    """Eq. 3 as one float64 dense softmax (vectorised naive_projection)."""
    q = queries.astype(np.float64) / np.linalg.norm(queries, axis=1, keepdims=True)
    t = support.astype(np.float64) / np.linalg.norm(support, axis=1, keepdims=True)
    logits = q @ t.T / tau
    w = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (w / w.sum(axis=1, keepdims=True)) @ t


@pytest.mark.parametrize("tau", [0.01, 0.5])
def test_streaming_exact_equals_float64_dense_softmax(tau):
    rng = np.random.default_rng(5)
    queries = rng.standard_normal((37, 24)).astype(np.float32) * 2
    centres = rng.standard_normal((8, 24))
    support = (centres[rng.integers(0, 8, 500)] + 0.3 * rng.standard_normal((500, 24))).astype(np.float32)
    expected = dense_reference(queries, support, tau)
    for chunk, q_chunk in [(7, 5), (64, 1024), (500, 3), (10_000, 16)]:     # uneven chunks, one chunk, one query block
        out = project_exact(queries, support, tau, chunk_size=chunk, query_chunk_size=q_chunk)
        assert out.dtype == np.float32 and out.shape == queries.shape
        np.testing.assert_allclose(out, expected, atol=2e-6)
    normalized = support / np.linalg.norm(support, axis=1, keepdims=True)
    np.testing.assert_allclose(project_exact(queries, normalized, tau, chunk_size=33, normalized=True), expected,
                               atol=2e-6)


def test_auto_index_rule():
    from pipeline.support import AUTO_IVF_FROM, auto_index
    assert AUTO_IVF_FROM == 50_000
    assert auto_index(1) == auto_index(AUTO_IVF_FROM - 1) == "Flat"
    assert auto_index(50_000) == auto_index(100_000) == "IVF512,Flat"      # 2 sqrt(n) = 447, 632 -> 512
    assert auto_index(500_000) == "IVF1024,Flat"
    assert auto_index(5_000_000) == "IVF4096,Flat"
    rng = np.random.default_rng(0)
    small = SupportSet.build(rng.standard_normal((300, 8)).astype(np.float32), "auto", tau=0.05, top_k=16)
    assert small.index_factory == "Flat" and small.top_k is None             # small: the exact Eq. 3


def test_ivf_top_k_uses_the_indexs_exact_scores_and_a_sampled_training_set():
    from pipeline.support import TRAIN_POINTS_PER_LIST, _exact_distances, _softmax_combine
    import torch
    rng = np.random.default_rng(1)
    n = TRAIN_POINTS_PER_LIST * 4 * 3                                          # more than the training sample
    support = rng.standard_normal((n, 16)).astype(np.float32)
    queries = rng.standard_normal((25, 16)).astype(np.float32)
    ivf = SupportSet.build(support, "IVF4,Flat", nprobe=4, tau=0.05, top_k=8)  # nprobe = nlist: exhaustive
    assert _exact_distances(ivf.index) and ivf.index.is_trained
    flat = SupportSet.build(support, "Flat", tau=0.05, top_k=8)
    np.testing.assert_allclose(ivf.project(queries), flat.project(queries), atol=1e-6)
    # the index's scores and the recomputed cosines give the same projection
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    scores, ids = flat.index.search(q, 8)
    feats = torch.from_numpy(flat.features)
    recomputed = _softmax_combine(torch.from_numpy(q), feats, ids, 0.05)
    np.testing.assert_allclose(_softmax_combine(torch.from_numpy(q), feats, ids, 0.05, scores), recomputed, atol=1e-6)
    # and both equal Eq. 3 over the 8 nearest, in float64
    t = flat.features.astype(np.float64)
    for i in range(len(q)):
        s = t[ids[i]] @ q[i].astype(np.float64) / 0.05
        w = np.exp(s - s.max())
        np.testing.assert_allclose(recomputed[i], (w / w.sum()) @ t[ids[i]], atol=1e-6)
    assert not _exact_distances(SupportSet.build(support, "IVF4,PQ4", nprobe=4, top_k=8).index)
