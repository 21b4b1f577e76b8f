"""CMSA (pipeline/methods/cmsa.py): each step against a direct computation on hand-sized tensors (the
multi-level joint feature and its I-F / T-F switches, the entities, the joint reward, SCST's advantage and
gradient, the discriminator's loss), the runner's training phases on real Flickr8k captions
(pipeline/runner.py ``fit_phases``), checkpoints, the pretrained (RoBERTa-class) discriminator loaded from a
folder, and the paper profile against ../shared/docs/METHODS.md."""
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import methods_md_section
from pipeline import config as cfg
from pipeline import paths, runner
from pipeline.methods import Data, Phase, Step, cmsa
from pipeline.evaluation import metrics
from pipeline.methods.cmsa import (Generator, discriminator_loss, entity_set, id_tokens, joint_reward,
                                   salient_concepts, scst_loss, variant)
from pipeline.nn import decoding, schedules
from pipeline.nn.prefix_decoder import DecoderConfig
from pipeline.profiles import resolve_profile

REPO = Path(__file__).resolve().parents[1]
N_IMAGES, STEPS_PER_EPOCH = 4, 4             # 61 real captions in shards of 16, batches of 16
TINY = {"vocabulary": "corpus", "entities": "both", "concept_k": 3, "fusion_heads": 2,
        "decoder": {"width": 32, "layers": 1, "heads": 2, "max_len": 14, "dropout": 0.1},
        "discriminator": {"width": 16, "layers": 1, "heads": 2, "optim": {"name": "adam", "lr": 3e-3}},
        "mle_epochs": 3, "discriminator_epochs": 1, "rl_epochs": 1, "batch_size": 16,
        "optim": {"name": "adamw", "lr": 5e-3, "grad_clip": 1.0}, "rl_optim": {"name": "adam", "lr": 1e-4},
        "seed": 0}
CAPTIONS = ["a dog runs on the grass", "two children play in the snow", "a man rides a red bike",
            "a woman walks on a beach", "a black dog jumps over a log", "a girl in a pink dress smiles"]

pytestmark = pytest.mark.usefixtures("one_thread")


def train_settings(**kw) -> cmsa.Train:
    return cfg.parse(cmsa.Train, {**TINY, **kw}, "methods.cmsa.train")


def caption_settings(**kw) -> cmsa.Caption:
    return cfg.parse(cmsa.Caption, {"beam_size": 2, "batch_size": 3, **kw}, "methods.cmsa.caption")


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def manual_fusion(fusion, query, entities, mask):
    """SynTIC's Eq. 5 by hand, one row: attention over the valid entities (the "no object" token alone
    when there is none), softmax(q k^T / sqrt(d_h)) v per head, then the output projection."""
    from test_syntic import manual_mha
    valid = entities[mask]
    return manual_mha(fusion, query, valid if len(valid) else fusion.no_object[None])


# ---------------------------------------------------------------------------------------------
# 1. The multi-level joint feature: I-F, T-F, entities
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("image_feature,entity_features", [(True, False), (False, True), (True, True)])
def test_the_prefix_is_i_f_then_t_f_as_the_switches_say(image_feature, entity_features):
    D, W = 8, 12
    torch.manual_seed(0)
    g = Generator(D, DecoderConfig(vocab_size=10, width=W, layers=1, heads=2, max_len=6), image_feature,
                  entity_features, fusion_heads=2).double().eval()
    image = unit(torch.randn(3, D, dtype=torch.float64))
    entities = torch.randn(3, 4, D, dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False], [False] * 4])
    prefix = g.prefix(image, entities, mask)
    P = int(image_feature) + int(entity_features)
    assert prefix.shape == (3, P, W) and g.decoder.cfg.prefix_len == P
    assert hasattr(g, "v_proj") == image_feature and hasattr(g, "fusion") == entity_features
    for b in range(3):
        parts = []
        if image_feature:                                                      # I-F: W_v s
            parts.append(image[b] @ g.v_proj.weight.T + g.v_proj.bias)
        if entity_features:                                                    # T-F: W_u MHAttn(s, E, E)
            u = manual_fusion(g.fusion, image[b], entities[b], mask[b])
            parts.append(u @ g.u_proj.weight.T + g.u_proj.bias)
        torch.testing.assert_close(prefix[b], torch.stack(parts), rtol=1e-10, atol=1e-10)
    tokens = torch.tensor([[8, 3, 4, 9, 0, 0]] * 3)
    assert g.decoder(prefix, tokens).shape == (3, 6, 10)
    if entity_features:                                                        # padded entities never matter
        noise = torch.where(mask[..., None], entities, 1e3 * torch.randn_like(entities))
        torch.testing.assert_close(g.prefix(image, noise, mask), prefix, rtol=0, atol=0)


def test_the_joint_feature_needs_i_f_or_t_f():
    with pytest.raises(ValueError, match="I-F"):
        Generator(8, DecoderConfig(vocab_size=10, width=12, layers=1, heads=2), False, False)
    with pytest.raises(cfg.ConfigError, match=r"methods\.cmsa\.train.*image_feature \(I-F\)"):
        train_settings(image_feature=False, entity_features=False)


def test_entities_are_the_tags_the_salient_concepts_or_both():
    torch.manual_seed(0)
    D = 6
    image = torch.randn(2, D, dtype=torch.float64)
    concepts = torch.randn(5, D, dtype=torch.float64)
    top = salient_concepts(image, concepts, 2)
    for b in range(2):                                                          # top-K by cosine, most similar first
        cos = [float(image[b] @ c / (image[b].norm() * c.norm())) for c in concepts]
        order = sorted(range(5), key=lambda j: -cos[j])[:2]
        torch.testing.assert_close(top[b], unit(concepts[order]))
    tags = torch.randn(2, 3, D, dtype=torch.float64)
    tag_mask = torch.tensor([[True, True, False], [False, False, False]])
    feats, mask = entity_set(image, tags, tag_mask, None, 2)
    assert torch.equal(feats, tags) and torch.equal(mask, tag_mask)
    feats, mask = entity_set(image, None, None, concepts, 2)
    assert torch.equal(feats, top) and mask.all() and mask.shape == (2, 2)
    feats, mask = entity_set(image, tags, tag_mask, concepts, 2)              # both: tags, then the concepts
    assert torch.equal(feats, torch.cat([tags, top], 1))
    assert mask.tolist() == [[True, True, False, True, True], [False, False, False, True, True]]
    assert salient_concepts(image, concepts, 9).shape == (2, 5, D)             # K > N_c: every concept
    with pytest.raises(ValueError):
        entity_set(image, None, None, None, 2)


# ---------------------------------------------------------------------------------------------
# 4. The joint reward, 5. SCST
# ---------------------------------------------------------------------------------------------
def test_the_joint_reward_is_the_weighted_clipscore_plus_the_discriminator_probability():
    text = torch.tensor([[3.0, 4.0], [1.0, 0.0], [-1.0, 0.0]])
    image = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 0.0]])                   # cosines 0.6, 0 and -1
    prob = torch.tensor([0.9, 0.25, 0.5])
    reward, terms = joint_reward(text, image, prob, 2.0, 0.5)                    # CLIPScore: 2.5 * max(cos, 0)
    torch.testing.assert_close(terms["clip"], torch.tensor([2.5 * 0.6, 0.0, 0.0]))
    torch.testing.assert_close(reward, torch.tensor([2.0 * 2.5 * 0.6 + 0.5 * 0.9, 0.5 * 0.25, 0.5 * 0.5]))
    torch.testing.assert_close(terms["fluency"], prob)
    assert float(metrics.clip_score(image[:1].numpy(), text[:1].numpy())[0]) == pytest.approx(float(terms["clip"][0]))
    reward, terms = joint_reward(text, image, None, 1.0, 0.0, clip_scale=1.0)    # B-R off, the raw cosine
    torch.testing.assert_close(reward, torch.tensor([0.6, 0.0, 0.0])) and set(terms) == {"clip"}
    reward, terms = joint_reward(None, None, prob, 0.0, 1.0)                     # C-R off
    torch.testing.assert_close(reward, prob) and set(terms) == {"fluency"}
    with pytest.raises(ValueError, match="at least one term"):
        joint_reward(text, image, prob, 0.0, 0.0)


def test_scst_advantage_is_sample_minus_greedy_and_its_gradient_raises_good_samples():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]], requires_grad=True)   # 0 after the end token
    r_sample = torch.tensor([0.8, 0.2], requires_grad=True)
    r_greedy = torch.tensor([0.5, 0.6])
    loss, advantage = scst_loss(logp, r_sample, r_greedy)
    torch.testing.assert_close(advantage, torch.tensor([0.3, -0.4]))
    torch.testing.assert_close(loss, torch.tensor(-(0.3 * -3.0 + -0.4 * -1.5) / 2))   # -mean(A log p(sample))
    loss.backward()
    torch.testing.assert_close(logp.grad, -advantage[:, None].expand(2, 3) / 2)
    assert r_sample.grad is None                                                  # no gradient through a reward

    def loss_at(x):
        return scst_loss(x, r_sample.detach(), r_greedy)[0].item()
    up_good, up_bad = logp.detach().clone(), logp.detach().clone()
    up_good[0, 0] += 0.1                                                          # the sample that beat greedy
    up_bad[1, 0] += 0.1                                                           # the sample worse than greedy
    assert loss_at(up_good) < loss.item() < loss_at(up_bad)


def stub_encoder(dim, calls):
    """A text encoder whose feature of a text depends on the text only (seeded by its bytes)."""
    def encode(texts):
        calls.append(list(texts))
        out = [np.random.default_rng(list(t.encode()) or [0]).standard_normal(dim) for t in texts]
        return np.stack([v / np.linalg.norm(v) for v in out]).astype(np.float32)
    return encode


def hand_model(**kw):
    """A tiny CMSA on hand-made data: its tag vocabulary stub, concepts and a stub CLIP text encoder."""
    D = 16
    rng = np.random.default_rng(0)

    class Tags:
        def batch(self, labels):
            feats = np.zeros((len(labels), 2, D), np.float32)
            mask = np.zeros((len(labels), 2), bool)
            for b, row in enumerate(labels):
                for j, label in enumerate(row[:2]):
                    feats[b, j] = np.random.default_rng(len(label)).standard_normal(D)
                    mask[b, j] = True
            return feats, mask

    calls = []
    data = Data(clip={}, feature_dim=D, corpus={"text": CAPTIONS}, tag_vocabulary=Tags(),
                concepts=(["dog", "child", "bike"], rng.standard_normal((3, D)).astype(np.float32)),
                text_encoder=stub_encoder(D, calls))
    s = train_settings(**kw)
    facts = cmsa.facts(s, data)
    torch.manual_seed(s.seed)
    model = cmsa.create(s, facts, data)
    rows = {"image": rng.standard_normal((len(CAPTIONS), D)).astype(np.float32), "text": CAPTIONS,
            "tags": [["dog"], [], ["person", "bicycle"], ["person"], ["dog"], ["person"]]}
    return model, s, data, rows, calls


def test_the_model_rewards_samples_and_greedy_captions_in_one_encoder_call():
    model, s, data, rows, calls = hand_model()
    model.train()
    batch = cmsa.batch(model, rows, np.arange(6), s, data, Step(0, 0, 0, 0, "rl"))
    # the reward of captions = w_c 2.5 max(cos(CLIP_t(caption), image), 0) + w_f sigmoid(D(caption)), by hand
    ids = [[3, 4], [5], []]
    image = batch["image"][:3]
    reward, terms = model.reward(ids, image)
    texts = [model.tokenizer.decode(i) for i in ids]
    text = torch.from_numpy(stub_encoder(16, [])(texts))
    model.discriminator.eval()
    prob = torch.sigmoid(model.discriminator.score(ids)).detach()
    cosine = (text * image).sum(-1) / (text.norm(dim=-1) * image.norm(dim=-1))
    torch.testing.assert_close(reward, 2.5 * cosine.clamp(min=0) + prob)
    assert model.discriminator.training is False and calls == [texts]
    # through the SCST loss: one encoder call for the batch's 6 samples and 6 greedy captions
    model.train()
    seen, calls[:] = [], []
    original = model.reward
    model.reward = lambda ids, image: seen.append((ids, original(ids, image))) or seen[-1][1]
    model.start_adversarial(s.discriminator.optim, 10)
    torch.manual_seed(3)
    loss, logs = model.loss(batch)
    (ids, (reward, _)), = seen
    assert len(calls) == 1 and len(calls[0]) == 12 and len(ids) == 12
    model.generator.decoder.eval()
    t = model.tokenizer
    greedy = decoding.greedy(model.generator.decoder, model.prefix(batch), t.sot_id, t.eot_id, 14)
    assert ids[6:] == greedy                                                      # the baseline is greedy decoding
    assert logs["advantage"] == pytest.approx((reward[:6] - reward[6:]).mean().item(), abs=1e-6)
    assert logs["reward"] == pytest.approx(reward[:6].mean().item(), abs=1e-6)
    assert {"reward_greedy", "clip_reward", "fluency_reward", "discriminator_loss"} <= set(logs)
    loss.backward()
    assert model.generator.decoder.tok_emb.weight.grad is not None
    assert all(p.grad is None for p in model.discriminator.parameters())         # its own step left none behind


# ---------------------------------------------------------------------------------------------
# 3. The discriminator
# ---------------------------------------------------------------------------------------------
def test_discriminator_loss_is_binary_cross_entropy_and_goes_down_on_real_vs_generated_text():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5])
    expected = 0.5 * (-(math.log(torch.sigmoid(real[0])) + math.log(torch.sigmoid(real[1]))) / 2
                      - math.log(1 - torch.sigmoid(fake[0])))
    assert discriminator_loss(real, fake).item() == pytest.approx(expected)
    model, s, data, rows, _ = hand_model()
    t = model.tokenizer
    real_ids = [t.encode(c, 14)[0][0, 1:int(t.encode(c, 14)[1][0]) - 1].tolist() for c in CAPTIONS]
    with torch.no_grad():                                                           # samples of the untrained generator
        batch = cmsa.batch(model, rows, np.arange(6), s, data, Step(0, 0, 0, 0, "discriminator"))
        fake_ids = decoding.ids_of(model._sample(model.prefix(batch))[0], t.eot_id)
    d = model.discriminator
    d.train()
    optimizer = torch.optim.Adam(d.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = discriminator_loss(d.score(real_ids), d.score(fake_ids))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.15 and max(losses[-5:]) < min(losses[:5]), losses
    # padding after the end token changes nothing; the layout is CaptionTokenizer.encode's
    tokens, lengths = id_tokens(real_ids[:2], t.sot_id, t.eot_id, t.pad_id, 14)
    enc_tokens, enc_lengths = t.encode(CAPTIONS[:2], 14)
    assert torch.equal(tokens, enc_tokens) and torch.equal(lengths, enc_lengths)
    d.eval()
    wider, _ = id_tokens(real_ids[:2], t.sot_id, t.eot_id, t.pad_id, 14)
    wider[0, int(lengths[0]):] = 7
    torch.testing.assert_close(d(wider, lengths), d(tokens, lengths))


# ---------------------------------------------------------------------------------------------
# Training phases through the runner, on artifacts built from real data (tests/test_runner.py)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(tmp_path_factory, shared_data):
    from test_runner import build_real_artifacts
    return build_real_artifacts(tmp_path_factory.mktemp("cmsa-artifacts"), shared_data, {"tags", "concepts"},
                                n_eval=N_IMAGES)


@pytest.fixture
def art(built, artifacts_root):
    from test_runner import use_real_artifacts
    return use_real_artifacts(built, artifacts_root)


def test_needs_follow_the_switches():
    s = train_settings()
    n = cmsa.needs(s)
    assert n.rows == {"image": "synthetic.global", "text": "corpus.text", "tags": "synthetic_tags.labels"}
    assert n.tag_vocabulary and n.concepts and n.text_encoder and n.corpus == ("text",)
    assert cmsa.needs(s, caption_settings()).rows == {"image": "image.global", "tags": "image_tags.labels"}
    assert not cmsa.needs(s, caption_settings()).concepts                      # the concepts are in the model
    concepts = cmsa.needs(train_settings(entities="concepts"))
    assert "tags" not in concepts.rows and not concepts.tag_vocabulary and concepts.concepts
    i_f = cmsa.needs(train_settings(entity_features=False, clip_reward=False))
    assert set(i_f.rows) == {"image", "text"} and not i_f.concepts and not i_f.text_encoder
    assert not cmsa.needs(train_settings(rl_epochs=0)).text_encoder            # no RL, no reward
    assert [p.name for p in cmsa.phases(s)] == ["mle", "discriminator", "rl"] and s.epochs == 5
    assert [p.name for p in cmsa.phases(train_settings(fluency_reward=False))] == ["mle", "rl"]
    assert [p.name for p in cmsa.phases(train_settings(fluency_reward_weight=0.0))] == ["mle", "rl"]


def test_phases_run_in_order_with_their_own_optimisers_and_the_mle_loss_goes_down(art, monkeypatch):
    s = train_settings()
    built_optimisers, snapshots = [], {}
    real_build = schedules.build

    def spy(module, o, total_steps=None, width=None):
        built_optimisers.append(({id(p) for p in module.parameters()}, o, total_steps))
        return real_build(module, o, total_steps=total_steps, width=width)

    def state(module):
        return {k: v.clone() for k, v in module.state_dict().items()}

    def recording(phase):                           # snapshot both players as each phase begins
        def setup(model, total):
            snapshots[phase.name] = (state(model.generator), state(model.discriminator))
            if phase.setup is not None:
                phase.setup(model, total)
        return Phase(phase.name, phase.epochs, phase.optim, phase.trains, setup)

    monkeypatch.setattr(schedules, "build", spy)
    monkeypatch.setattr(cmsa, "phases", lambda train: [recording(p) for p in cmsa_phases(train)])
    inputs = runner.Inputs(cmsa.needs(s), "cpu")
    model, facts, result = runner.train_model(cmsa, s, inputs, progress=False)
    assert [(p["name"], p["epochs"], p["steps"]) for p in result["phases"]] == [
        ("mle", 3, 3 * STEPS_PER_EPOCH), ("discriminator", 1, STEPS_PER_EPOCH), ("rl", 1, STEPS_PER_EPOCH)]
    generator = {id(p) for p in model.generator.parameters()}
    discriminator = {id(p) for p in model.discriminator.parameters()}
    # one optimiser per phase over the parameters it trains, then the discriminator's own (the rl phase's setup)
    assert [(params, o, total) for params, o, total in built_optimisers] == [
        (generator, s.optim, 12), (discriminator, s.discriminator.optim, 4), (generator, s.rl_optim, 4),
        (discriminator, s.discriminator.optim, 4)]
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)               # noqa: E731
    g_mle, d_mle = snapshots["mle"]
    g_disc, d_disc = snapshots["discriminator"]
    g_rl, d_rl = snapshots["rl"]
    assert not same(g_mle, g_disc) and same(d_mle, d_disc)                     # MLE trains the generator only
    assert same(g_disc, g_rl) and not same(d_disc, d_rl)                       # then the discriminator only
    assert not same(g_rl, state(model.generator)) and not same(d_rl, state(model.discriminator))   # RL: both
    mle = result["phases"][0]["epoch_loss"]
    assert mle[-1] < mle[0] - 0.5, mle                                          # on real captions
    assert result["epoch_loss"] == mle + result["phases"][1]["epoch_loss"] + result["phases"][2]["epoch_loss"]
    assert {"reward", "reward_greedy", "advantage", "discriminator_loss"} <= set(result["logs"][-1])
    assert result["steps"] == 5 * STEPS_PER_EPOCH and len(facts["concepts"]) == 40


cmsa_phases = cmsa.phases


class TwoPart(torch.nn.Module):
    """Two linear parts; the loss of phase "a" reads part a, of phase "b" part b."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)

    def loss(self, batch):
        part = self.a if batch["phase"] == "a" else self.b
        return ((part(batch["x"])[:, 0] - 1.0) ** 2).mean(), {"phase_b": float(batch["phase"] == "b")}


def test_fit_phases_trains_each_phase_its_parts_skips_empty_phases_and_stops_at_max_steps():
    seen = []

    def batches_of(first_epoch, phase):
        def batches(epoch):
            seen.append((phase, first_epoch + epoch))
            return iter([{"x": torch.ones(3, 2), "phase": phase}] * 2)
        return batches
    adam = schedules.Optim(name="adam", lr=0.1)
    model = TwoPart()
    a0, b0 = model.a.weight.clone(), model.b.weight.clone()
    result = runner.fit_phases(model, [Phase("a", 2, adam, ("a",)), Phase("skip", 0, adam, ("b",)),
                                       Phase("b", 1, adam, ("b",))], batches_of, 2, 0, "toy", progress=False)
    assert seen == [("a", 0), ("a", 1), ("b", 2)]                              # epochs numbered across phases
    assert [(p["name"], p["steps"]) for p in result["phases"]] == [("a", 4), ("b", 2)] and result["steps"] == 6
    assert result["logs"] == [{"phase_b": 0.0}] * 2 + [{"phase_b": 1.0}]
    assert not torch.equal(model.a.weight, a0) and not torch.equal(model.b.weight, b0)
    only_a = TwoPart()
    runner.fit_phases(only_a, [Phase("a", 1, adam, ("a",))], batches_of, 2, 0, "toy", progress=False)
    assert torch.equal(only_a.b.weight, b0)                                    # a phase trains its parts only
    part = runner.fit_phases(TwoPart(), [Phase("a", 2, adam, ("a",)), Phase("b", 2, adam, ("b",))], batches_of, 2, 0,
                             "toy", progress=False, max_steps=5)
    assert [(p["name"], p["steps"]) for p in part["phases"]] == [("a", 4), ("b", 1)] and part["steps"] == 5
    with pytest.raises(ValueError, match="distinct names"):
        runner.fit_phases(TwoPart(), [Phase("a", 1, adam), Phase("a", 1, adam)], batches_of, 2, 0, "toy", progress=False)
    with pytest.raises(ValueError, match="'c', which is not a submodule"):
        runner.fit_phases(TwoPart(), [Phase("a", 1, adam, ("c",))], batches_of, 2, 0, "toy", progress=False)
    with pytest.raises(ValueError, match="every training phase has 0 epochs"):
        runner.fit_phases(TwoPart(), [Phase("a", 0, adam)], batches_of, 2, 0, "toy", progress=False)


def instance(s, **caption) -> cfg.MethodInstance:
    return cfg.MethodInstance(method="cmsa", train=s, caption=caption_settings(**caption))


def test_checkpoint_holds_both_players_and_gives_the_same_captions(art):
    s = train_settings()
    report = runner.train("cmsa", instance(s), "cpu", progress=False)
    assert report["variant"] == "I-F+T-F+C-R+B-R" and [p["name"] for p in report["phases"]] == ["mle", "discriminator",
                                                                                                  "rl"]
    assert report["summary"].startswith("I-F+T-F+C-R+B-R: mle loss") and "; rl loss" in report["summary"]
    path = paths.model("cmsa") / runner.MODEL_FILE
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert {k.split(".")[0] for k in keys} == {"generator", "discriminator", "concepts"}
    model, header = runner.load_checkpoint(path)
    assert header["train"] == s and model.text_encoder is None
    captions = runner.caption("cmsa", instance(s), "tiny", "cpu", progress=False)
    assert set(captions) == set(art["eval_ids"]) and all(isinstance(c, str) for c in captions.values())
    assert runner.caption("cmsa", instance(s), "tiny", "cpu", progress=False) == captions
    # the same captions as the trained model in memory (trained again: the run is seeded)
    trained, _, _ = runner.train_model(cmsa, s, runner.Inputs(cmsa.needs(s), "cpu"), progress=False)
    for k, v in trained.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    inputs = runner.Inputs(cmsa.needs(s, caption_settings()), "cpu", evalset="tiny")
    _, rows = next(inputs.shards())
    idx = np.arange(N_IMAGES)
    assert cmsa.caption(trained, rows, idx, s, caption_settings(), inputs.data) == [captions[i] for i in rows["image_id"]]


def test_without_b_r_no_discriminator_is_built_or_saved(art, tmp_path):
    s = train_settings(fluency_reward=False, entities="tags", mle_epochs=1)
    model, facts, result = runner.train_model(cmsa, s, runner.Inputs(cmsa.needs(s), "cpu"), progress=False)
    assert model.discriminator is None and [p["name"] for p in result["phases"]] == ["mle", "rl"]
    assert set(result["logs"][-1]) >= {"reward", "clip_reward"} and "fluency_reward" not in result["logs"][-1]
    header = {"method": "cmsa", "train": cfg.as_dict(s), "facts": facts, "clip_model": art["clip"]}
    runner.save_checkpoint(model, tmp_path / "m.safetensors", header)
    loaded, _ = runner.load_checkpoint(tmp_path / "m.safetensors")
    assert set(loaded.state_dict()) == set(model.state_dict()) and all(k.startswith("generator.")
                                                                        for k in model.state_dict())


# ---------------------------------------------------------------------------------------------
# The pretrained discriminator (the paper's RoBERTa) from a local folder
# ---------------------------------------------------------------------------------------------
def tiny_roberta(folder: Path) -> Path:
    """A small RobertaForSequenceClassification built from a config, with a byte-level RoBERTa tokenizer
    (the 256 byte symbols, no merges), saved as save_pretrained saves roberta-base."""
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import RobertaConfig, RobertaForSequenceClassification, RobertaTokenizer
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for symbol in bytes_to_unicode().values():
        vocab[symbol] = len(vocab)
    vocab["<mask>"] = len(vocab)
    files = folder / "files"
    files.mkdir(parents=True)
    (files / "vocab.json").write_text(json.dumps(vocab))
    (files / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = RobertaTokenizer(str(files / "vocab.json"), str(files / "merges.txt"))
    torch.manual_seed(0)
    model = RobertaForSequenceClassification(RobertaConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=80, pad_token_id=1, bos_token_id=0, eos_token_id=2))      # 2 labels: replaced
    out = folder / "roberta"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_the_roberta_discriminator_loads_from_a_folder_trains_and_is_stored(tmp_path):
    folder = tiny_roberta(tmp_path)
    ref = {"name": "roberta-base", "pretrained": str(folder)}
    model, s, data, rows, _ = hand_model(discriminator={"model": ref, "max_len": 20,
                                                        "optim": {"name": "adamw", "lr": 1e-3}})
    d = model.discriminator
    assert isinstance(d, cmsa.PretrainedClassifier) and type(d.model).__name__ == "RobertaForSequenceClassification"
    assert d.model.config.num_labels == 1 and type(d.tokenizer).__name__.startswith("RobertaTokenizer")
    t = model.tokenizer
    ids = [t.encode(c, 14)[0][0, 1:int(t.encode(c, 14)[1][0]) - 1].tolist() for c in CAPTIONS[:3]]
    d.eval()
    logits = d.score(ids)                                                          # re-tokenised by its own tokenizer
    enc = d.tokenizer([t.decode(i) for i in ids], padding=True, truncation=True, max_length=20, return_tensors="pt")
    torch.testing.assert_close(logits, d.model(**enc).logits[:, 0])
    assert logits.shape == (3,)
    before = {k: v.clone() for k, v in d.state_dict().items()}
    model.start_adversarial(s.discriminator.optim, 4)
    model.update_discriminator(ids, [[5, 5, 5]] * 3)                               # it trains: not frozen
    assert any(not torch.equal(v, before[k]) for k, v in d.state_dict().items())
    facts = cmsa.facts(s, data)
    assert facts["discriminator_config"]["model_type"] == "roberta" and facts["discriminator_config"]["id2label"] == {
        "0": "LABEL_0"}
    header = {"method": "cmsa", "train": cfg.as_dict(s), "facts": facts, "clip_model": {"name": "stub"}}
    runner.save_checkpoint(model, tmp_path / "m.safetensors", header)
    assert "frozen" not in runner.checkpoint_header(tmp_path / "m.safetensors")
    shutil.rmtree(folder)                                                           # loading needs no folder, no hub
    loaded, _ = runner.load_checkpoint(tmp_path / "m.safetensors")
    roberta = {k for k in loaded.state_dict() if k.startswith("discriminator.model.roberta.")}
    assert roberta and all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    batch = cmsa._features(rows, np.arange(3), s, data)
    assert loaded.generate(batch, 2) == model.eval().generate(batch, 2)
    with pytest.raises(RuntimeError, match=r"(?s)could not load the text_classifier model 'roberta-base' \(pretrained="
                                           r".*\).*discriminator\.model\.pretrained"):
        cmsa.create(s, {**facts}, data)                                            # the folder is gone


# ---------------------------------------------------------------------------------------------
# Ablation rows, the paper's numbers and the profiles
# ---------------------------------------------------------------------------------------------
def test_variant_names_the_ablation_columns_and_the_full_method_matches_the_paper_results():
    full = cmsa.Train()
    assert variant(full, cmsa.Caption()) == variant(full, None) == "I-F+T-F+C-R+B-R"
    rows = yaml.safe_load((REPO / "pipeline" / "evaluation" / "paper_results.yaml").read_text())
    assert {r["variant"] for r in rows if r["method"] == "cmsa"} == {"I-F+T-F+C-R+B-R"}
    t = lambda **kw: cfg.parse(cmsa.Train, kw, "t")                              # noqa: E731
    assert variant(t(image_feature=False), None) == "T-F+C-R+B-R"
    assert variant(t(entity_features=False), None) == "I-F+C-R+B-R"
    assert variant(t(clip_reward=False), None) == variant(t(clip_reward_weight=0.0), None) == "I-F+T-F+B-R"
    assert variant(t(fluency_reward=False), None) == variant(t(fluency_reward_weight=0), None) == "I-F+T-F+C-R"
    assert variant(t(rl_epochs=0), None) == "I-F+T-F"                              # MLE only: no reward
    with pytest.raises(cfg.ConfigError, match="needs a reward"):
        t(clip_reward=False, fluency_reward=False)
    with pytest.raises(cfg.ConfigError, match="entities"):
        t(entities="objects")


def test_paper_coco_cmsa_rows_carry_the_outline_of_methods_md():
    md = " ".join(methods_md_section("## 5. CMSA", "## Evaluation").split())
    methods = cfg.from_dict(resolve_profile("paper-coco")).methods
    m = methods["cmsa"].train
    assert "semantic entities (tags)" in md and m.entities == "tags" and m.image_feature and m.entity_features
    assert "the paper cites RoBERTa" in md and m.discriminator.model.name == "roberta-base"
    assert m.discriminator.model.pretrained == "roberta-base"
    assert "image-text alignment (CLIP similarity) + language fluency (discriminator)" in md
    assert m.clip_reward and m.fluency_reward and m.clip_reward_weight > 0 and m.fluency_reward_weight > 0
    assert "initialise by maximum likelihood, then reinforcement learning" in md and m.mle_epochs >= 1
    assert "(self-critical sequence training, greedy baseline)" in md and m.rl_epochs >= 1
    assert m.vocabulary == "full"
    components = re.search(r"components ([A-Z]-[A-Z]), ([A-Z]-[A-Z]), ([A-Z]-[A-Z]), ([A-Z]-[A-Z])", md).groups()
    assert "+".join(components) == variant(m, methods["cmsa"].caption) == "I-F+T-F+C-R+B-R"
    assert "rows with three of four" in md and "which one each row drops was lost" in md
    rows = {variant(i.train, i.caption) for i in methods.values() if i.method == "cmsa"}
    assert rows == {"+".join(components)} | {"+".join(c for c in components if c != drop) for drop in components}
    coco = re.search(r"COCO ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+);", md).groups()
    paper = yaml.safe_load((REPO / "pipeline" / "evaluation" / "paper_results.yaml").read_text())
    row = next(r for r in paper if r["id"] == "cmsa-coco")
    assert list(row["metrics"].values()) == [float(x) for x in coco]


def test_offline_profile_has_a_cmsa_instance_sized_like_syntic():
    offline = cfg.from_dict(resolve_profile("offline")).methods
    c, syn = offline["cmsa"].train, offline["syntic"].train
    assert offline["cmsa"].method == "cmsa" and variant(c, offline["cmsa"].caption) == "I-F+T-F+C-R+B-R"
    assert c.vocabulary == "corpus" == syn.vocabulary and c.decoder == syn.decoder
    assert c.discriminator.model is None and c.rl_epochs >= 1
