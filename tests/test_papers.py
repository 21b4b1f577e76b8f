"""The papers' numbers beside this run's: the table agrees with METHODS.md, every paper profile's rows
find their paper row with the paper's settings, and the report renders the comparison."""
import json
import platform
import re
from pathlib import Path

import pyarrow as pa
import pytest

from conftest import methods_md_section
from pipeline.environment import library_versions
from pipeline import config, paths
from pipeline.data.evalsets import EVAL_SCHEMA
from pipeline.data.shards import write_sharded
from pipeline.evaluation import papers
from pipeline.evaluation.report import build_report
from pipeline.methods import get
from pipeline.profiles import resolve_profile

REPO = Path(__file__).resolve().parents[1]
PAPER_PROFILES = ["paper-syntic-coco", "paper-coco", "paper-coco-to-flickr30k", "paper-capdec-coco",
                  "paper-pcmnet-l14-coco"]


@pytest.fixture(scope="module")
def methods_md() -> str:
    return methods_md_section()


def row(id_: str) -> papers.PaperRow:
    return next(r for r in papers.table() if r.id == id_)


def test_the_headline_numbers_are_in_the_table():
    headline = {"syntic-coco": 101.1, "pcmnet-coco-b32": 103.8, "pcmnet-coco-l14": 113.6, "capdec-coco": 91.8,
                "decap-coco": 91.2, "unsupervised-clipcap-coco": 74.6, "maccap-coco": 69.7, "cmsa-coco": 100.2}
    assert {id_: row(id_).metrics["CIDEr"] for id_ in headline} == headline


@pytest.mark.parametrize("id_, section, pattern", [
    ("syntic-coco", "## 1. SynTIC", r"Reported: COCO B4 ([\d.]+) M ([\d.]+) R ([\d.]+) C ([\d.]+) S ([\d.]+)"),
    ("pcmnet-coco-b32", "## 2. PCM-Net", r"\(ViT-B/32\): COCO B4 ([\d.]+) M ([\d.]+) R ([\d.]+) C ([\d.]+) S ([\d.]+)"),
    ("unsupervised-clipcap-coco", "## 4. Unsupervised",
     r"COCO B4 ([\d.]+) M ([\d.]+) R ([\d.]+) C ([\d.]+) S ([\d.]+)"),
    ("cmsa-coco", "## 5. CMSA", r"COCO ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+)"),
])
def test_the_table_quotes_methods_md(methods_md, id_, section, pattern):
    text = methods_md[methods_md.index(section):]
    numbers = [float(x) for x in re.search(pattern, text).groups()]
    assert [row(id_).metrics[m] for m in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")] == numbers


def test_maccap_and_the_text_feature_family_quote_methods_md(methods_md):
    maccap = methods_md[methods_md.index("## 3. MacCap"):]
    b1, b4, m, r, c, s = map(float, re.search(
        r"COCO B1 ([\d.]+) B4 ([\d.]+) M ([\d.]+) R ([\d.]+) C ([\d.]+) S ([\d.]+)", maccap).groups())
    assert row("maccap-coco").metrics == {"BLEU-1": b1, "BLEU-4": b4, "METEOR": m, "ROUGE-L": r, "CIDEr": c, "SPICE": s}
    assert f"C {row('unsupervised-clipcap-coco-unmatched').metrics['CIDEr']}" in methods_md
    assert f"C {row('decap-coco').metrics['CIDEr']}" in methods_md
    assert f"CIDEr {row('capdec-coco').metrics['CIDEr']}" in methods_md


# Settings where a paper profile departs from the paper knowingly, each named in the profile and README
NAMED_DEPARTURES = {"concepts.source"}


def test_each_named_departure_is_named_in_the_profiles_and_readme():
    profile = (REPO / "profiles" / "paper-syntic-coco.yaml").read_text()
    readme = (REPO / "README.md").read_text()
    assert "source: corpus_nouns" in profile and "A departure from the released code" in profile
    assert "coco400_embeddings" in profile and "coco400_embeddings" in readme


@pytest.mark.parametrize("profile", PAPER_PROFILES)
def test_every_paper_profile_row_matches_its_paper_row_with_the_papers_settings(profile):
    """A main row of a paper profile finds its paper row and is comparable, unless its CLIP model
    differs from the paper's (CapDec on ViT-B/32 in paper-coco) or it departs knowingly (NAMED_DEPARTURES):
    then it says so."""
    c = config.from_dict(resolve_profile(profile))
    matched = 0
    for name, instance in c.methods.items():
        variant = get(instance.method).variant(instance.train, instance.caption)
        for evalset in c.evalsets.values():
            paper = papers.paper_row(instance.method, variant, c.corpus.source, evalset.dataset)
            if paper is None:
                continue
            matched += 1
            reason = papers.not_comparable(paper, c.models.clip.name, instance, c)
            reasons = [] if reason is None else reason.split("; ")
            if paper.clip != c.models.clip.name:
                assert reasons[0] == f"CLIP {c.models.clip.name} here, {paper.clip} in the paper"
                continue
            # what remains is a departure the profiles name: PCM-Net's released word list cannot be read here
            for r in reasons:
                assert r.split(" is ")[0] in NAMED_DEPARTURES, f"{profile}: {name} against {paper.id}: {r}"
                assert r == "concepts.source is 'corpus_nouns' here, 'word_list' in the paper"
    assert matched >= 1, f"{profile} has no row the papers report"


SYNTIC_PAPER = REPO.parent / "shared" / "seeds" / "001_f977dab971b3a38b.txt"
TABLE4_VARIANTS = {"Baseline": "Baseline", "+Feature Optimization (FO)": "FO", "+Feature Projection (FP)": "FP",
                   "+Auxiliary Feature (AF)": "AF", "+FO & AF w/o FP": "FO+AF", "+FP & FO w/o AF": "FO+FP",
                   "+FP & AF w/o FO": "FP+AF", "SynTIC": "FO+FP+AF"}


def test_syntics_table_4_and_its_tt_row_are_the_papers_numbers():
    """Every row of SynTIC's Table 4 (MSCOCO and MSCOCO -> Flickr30k) and SynTIC-TT (Table 2), read from the
    paper's text, is in paper_results.yaml under the variant the method module names it."""
    if not SYNTIC_PAPER.is_file():
        pytest.skip(f"the SynTIC paper's text is not at {SYNTIC_PAPER}")
    text = SYNTIC_PAPER.read_text(encoding="utf-8").replace("<b>", "").replace("</b>", "")
    table4 = text[text.index("Baseline\t25.1"):text.index("Table 4:")]
    metrics = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")
    for line in table4.strip().splitlines():
        label, *values = line.split("\t")
        variant = TABLE4_VARIANTS[label]
        numbers = [float(v) for v in values]
        for eval_dataset, half in (("coco", numbers[:5]), ("flickr30k", numbers[5:])):
            row = papers.paper_row("syntic", variant, "coco", eval_dataset)
            assert row is not None, f"Table 4 {label!r} on {eval_dataset}"
            assert row.metrics == dict(zip(metrics, half)), row.id
    tt = re.search(r"SynTIC-TT\t(.*)", text).group(1).split("\t")
    assert papers.paper_row("syntic", "FO+FP+AF-TT", "coco", "flickr30k").metrics == \
        dict(zip(metrics, map(float, tt[:5])))          # COCO -> Flickr30k: C 43.2


@pytest.mark.parametrize("profile", ["paper-syntic-coco", "paper-coco-to-flickr30k"])
def test_every_syntic_row_of_a_paper_profile_has_its_published_numbers(profile):
    c = config.from_dict(resolve_profile(profile))
    for name, instance in c.methods.items():
        if instance.method != "syntic":
            continue
        variant = get("syntic").variant(instance.train, instance.caption)
        for evalset in c.evalsets.values():
            assert papers.paper_row("syntic", variant, c.corpus.source, evalset.dataset) is not None, \
                f"{profile}: {name} ({variant}) on {evalset.dataset} has no paper row"


def test_a_setting_that_differs_from_the_papers_makes_the_row_not_comparable():
    c = config.from_dict(resolve_profile("paper-capdec-coco"))
    capdec = c.methods["capdec"]
    assert papers.not_comparable(row("capdec-coco"), "RN50x4", capdec) is None
    mlp = config.MethodInstance(method="clipcap", train=config.parse(type(capdec.train), {
        **config.as_dict(capdec.train), "mapper": "mlp", "prefix_length": 10}, "t"), caption=capdec.caption)
    assert papers.not_comparable(row("capdec-coco"), "RN50x4", mlp) == (
        "train.mapper is 'mlp' here, 'transformer' in the paper; train.prefix_length is 10 here, 40 in the paper")


def test_the_report_of_a_paper_profile_puts_the_papers_numbers_beside_this_runs(artifacts_root, tmp_path):
    c = config.from_dict(resolve_profile("paper-coco"))
    evalset = "coco-test"
    rows = [{"image_id": "COCO_val2014_000000000001.jpg", "image": _png(), "width": 4, "height": 4,
             "references": ["a cat"]}]
    write_sharded(paths.evalset(evalset), 1, 8, "fp", lambda t: pa.Table.from_pylist(rows, schema=EVAL_SCHEMA),
                  {"model": None})
    (paths.evalset(evalset) / "report.json").write_text(json.dumps({"skipped": {}}))
    tags = pa.table({"image_id": ["COCO_val2014_000000000001.jpg"], "labels": pa.array([["cat"]])})
    write_sharded(paths.eval_tags(evalset), 1, 8, "fp", lambda t: tags, {"model": None})
    fake = {"BLEU-4": 0.30, "METEOR": 0.25, "ROUGE-L": 0.5, "CIDEr": 1.0, "CLIPScore": 0.7, "RefCLIPScore": 0.7,
            "images_evaluated": 1, "images_skipped": 0, "images_missing": 0}
    for name in c.methods:
        for path, value in ((paths.metrics(name, evalset), fake), (paths.evaluation(name, evalset),
                                                                   {"skipped_metrics": {}}),
                            (paths.captions(name, evalset), {"COCO_val2014_000000000001.jpg": "a cat"})):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(value))
    (paths.method("unsupervised-clipcap") / "modality_gap.png").write_bytes(_png())
    (paths.method("unsupervised-clipcap") / "modality_gap.json").write_text(json.dumps(
        {"evalset": evalset, "caveat": "c", "results": [{"lambda": 0.0, "CIDEr": 0.1}]}))
    paths.model("syntic").mkdir(parents=True)          # a model trained with other software is named
    (paths.model("syntic") / "train_report.json").write_text(json.dumps(
        {"environment": {**library_versions(), "torch": "1.0.0"}}))
    build_report(c, tmp_path / "index.html")
    html = (tmp_path / "index.html").read_text()
    assert f"Software of this report: python {platform.python_version()}, torch {library_versions()['torch']}" in html
    assert f"syntic was trained with other software than this report&#x27;s: torch 1.0.0 (here " \
           f"{library_versions()['torch']})." in html and html.count("trained with other software") == 1
    assert "Against the papers" in html
    assert "SynTIC (Liu et al., AAAI 2024), Table 1 (MSCOCO)" in html and "101.1" in html and "-1.1" in html
    assert "103.8" in html and "74.6" in html and "91.2" in html
    assert "not comparable: CLIP ViT-B-32 here, RN50x4 in the paper" in html


def _png() -> bytes:
    import io
    from PIL import Image
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), "white").save(buffer, format="PNG")
    return buffer.getvalue()


def readme_table() -> list[list[str]]:
    """The cells of the README's faithful-profile table, one list per row (the header and rule left out)."""
    from pipeline.evaluation import paper_table
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = text[text.index(paper_table.BEGIN) + len(paper_table.BEGIN):text.index(paper_table.END)]
    lines = [line for line in block.strip().splitlines()][2:]
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]


def test_the_readmes_faithful_profile_table_is_made_from_the_data():
    from pipeline.evaluation import paper_table
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert f"{paper_table.BEGIN}\n{paper_table.markdown()}\n{paper_table.END}" in text, \
        "README's faithful-profile table is stale: python -m pipeline.evaluation.paper_table README.md"


def test_the_readmes_faithful_profile_table_agrees_with_the_papers_table_and_the_profiles():
    """Read back from the README: one row per paper row, in order, with its numbers, source and variant; every
    profile instance named runs that row (method, variant, corpus, an eval set of the dataset) with the CLIP
    named, every instance that does is named, and the verdict is the report's (papers.not_comparable)."""
    short = {"B1": "BLEU-1", "B4": "BLEU-4", "M": "METEOR", "R": "ROUGE-L", "C": "CIDEr", "S": "SPICE"}
    configs = {p: config.from_dict(resolve_profile(p)) for p in PAPER_PROFILES}
    cells = readme_table()
    assert [c[0].strip("`") for c in cells] == [r.id for r in papers.table()]
    for (id_, source, variant, datasets, numbers, where, clip, verdict), paper in zip(cells, papers.table()):
        assert source == f"{paper.paper}, {paper.source}" and variant == paper.variant
        assert datasets == f"{paper.corpus} → {paper.eval}"
        values, paper_clip = re.fullmatch(r"(.*) \(CLIP (\S+)\)", numbers).groups()
        assert paper_clip == paper.clip
        assert {short[k]: float(v) for k, v in (p.split(" ") for p in values.split(" · "))} == paper.metrics
        expected = [(p, name) for p, c in configs.items() for name, inst in c.methods.items()
                    if c.corpus.source == paper.corpus and paper.eval in {e.dataset for e in c.evalsets.values()}
                    and inst.method == paper.method and get(inst.method).variant(inst.train, inst.caption) == paper.variant]
        if where == "none":
            assert expected == [] and clip == "—"
            assert verdict == f"no: no paper profile trains on {paper.corpus} and evaluates on {paper.eval}"
            continue
        named = [tuple(x.replace("`", "").split(": ")) for x in where.split("<br>")]
        assert named == expected, id_
        for (profile, name), here, judged in zip(named, clip.split("<br>"), verdict.split("<br>")):
            c = configs[profile]
            assert here == c.models.clip.name
            reason = papers.not_comparable(paper, here, c.methods[name], c)
            assert judged == ("yes" if reason is None else f"no: {reason}"), (id_, profile)
    rows = {c[0].strip("`"): c for c in cells}
    assert rows["decap-coco"][7] == "yes"                      # DeCap's exact projection, as released
    assert rows["capdec-coco"][7] == "no: CLIP ViT-B-32 here, RN50x4 in the paper<br>yes"


def test_decaps_paper_row_asks_for_the_exact_projection_of_its_release(methods_md):
    decap = config.from_dict(resolve_profile("paper-coco")).methods["decap"]
    assert "(exact softmax)" in methods_md[methods_md.index("- DeCap (`dhg-wei/DeCap`)"):]
    assert decap.caption.correction == "projection" and decap.caption.projection == "exact"
    assert papers.not_comparable(row("decap-coco"), "ViT-B-32", decap) is None
    top_k = config.MethodInstance(method="clipcap", train=decap.train, caption=config.parse(
        type(decap.caption), {**config.as_dict(decap.caption), "projection": "top_k"}, "c"))
    assert papers.not_comparable(row("decap-coco"), "ViT-B-32", top_k) == \
        "caption.projection is 'top_k' here, 'exact' in the paper"
