"""Where every artifact lives (all under artifacts/, each one a DVC output). Only the stages and the
runner use these paths: method modules are handed their inputs and never look anything up."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "artifacts"

WORLDS = ARTIFACTS / "world"                           # world/NAME/{corpus.json,eval/,clip/,detector/,text_to_image/}
WORLD_METRICS = ARTIFACTS / "metrics" / "world"        # world/NAME/{data,clip,detector}.json (DVC metrics)
CORPUS = ARTIFACTS / "corpus"                          # captions: caption_id, group_id, text, split, source
DEMO_PHOTOS = ARTIFACTS / "demo_photos"                # the offline profile's eval photos (scikit-image samples)
EVALSETS = ARTIFACTS / "evalsets"                      # evalsets/NAME: image_id, image bytes, references
SYNTHETIC_IMAGES = ARTIFACTS / "synthetic"             # one generated image per caption (aligned with corpus)
FEATURES = ARTIFACTS / "features"
TEXT_FEATURES = FEATURES / "text"                      # CLIP text feature per corpus caption
SYNTHETIC_FEATURES = FEATURES / "synthetic"            # CLIP global/patches/cls_attention per synthetic image
EVAL_FEATURES = FEATURES / "eval"                      # eval/NAME: the same for the real eval images
TAGS = ARTIFACTS / "tags"
SYNTHETIC_TAGS = TAGS / "synthetic"                    # detector labels/scores/boxes per synthetic image
EVAL_TAGS = TAGS / "eval"                              # eval/NAME
TAG_VOCABULARY = TAGS / "vocabulary" / "vocabulary.parquet"   # CLIP text feature of every detector label
OPTIMIZED = ARTIFACTS / "optimized"                    # SynTIC Eq. 2 features (aligned with corpus)
OPTIMIZE_REPORT = ARTIFACTS / "metrics" / "optimize.json"   # how far Eq. 2 moved them (DVC metrics)
REFINED = ARTIFACTS / "refined"                        # SynC re-pairing per caption: image_row, score, kept
REFINE_REPORT = ARTIFACTS / "metrics" / "refine.json"  # its counts, score distribution, pair audit (DVC metrics)
OPTIMIZED_REFINED = ARTIFACTS / "optimized_refined"    # Eq. 2 over the kept re-paired rows (aligned with corpus)
OPTIMIZE_REFINED_REPORT = ARTIFACTS / "metrics" / "optimize_refined.json"
SUPPORTS = ARTIFACTS / "supports"                      # supports/corpus and supports/NAME: Eq. 3 support sets
SUPPORT_AGREEMENT = ARTIFACTS / "metrics" / "support_agreement"   # NAME.json: top-k vs exact Eq. 3 on eval images
CONCEPTS = ARTIFACTS / "concepts" / "concepts.parquet"  # PCM-Net concept vocabulary + CLIP text features
METHODS = ARTIFACTS / "methods"                        # methods/NAME/{model,train_curve.json,captions,metrics,evaluation}
REPORT = ARTIFACTS / "report"
FINGERPRINT_RECORDS = ARTIFACTS / "fingerprints"       # fingerprints/<artifact>.json: how each artifact was made


def layout(root: Path) -> dict[str, Path]:
    """Every artifact constant of this module, for an artifacts folder at ``root``."""
    here = globals()
    return {key: root / value.relative_to(ARTIFACTS) for key, value in here.items()
            if key.isupper() and isinstance(value, Path) and value != REPO and value.is_relative_to(ARTIFACTS)
            and key != "ARTIFACTS"} | {"ARTIFACTS": Path(root)}


def fingerprint_record(out_dir: Path) -> Path:
    """Where the record of how artifact folder ``out_dir`` was made lives (each file's fingerprint and
    sha256: pipeline/data/shards.py). For an artifact under artifacts/ it is
    ``artifacts/fingerprints/<its path>.json``, a DVC output of the same stage beside the artifact: it
    travels with ``dvc push``/``pull`` (a pulled checkout keeps the pulled work when the stage reruns),
    but no other stage depends on it, so a code change that changes no byte reruns nothing downstream.
    Any other folder keeps it inside, as ``_fingerprints.json`` (ignored by DVC)."""
    out = Path(out_dir).resolve()
    root = ARTIFACTS.resolve()
    if out != root and out.is_relative_to(root):
        return FINGERPRINT_RECORDS / f"{out.relative_to(root)}.json"
    return Path(out_dir) / "_fingerprints.json"


def evalset(name: str) -> Path:
    return EVALSETS / name


def eval_features(name: str) -> Path:
    return EVAL_FEATURES / name


def eval_tags(name: str) -> Path:
    return EVAL_TAGS / name


def support(name: str = "corpus") -> Path:
    """The support set ``name``: "corpus" (the training corpus) or one of params.yaml's ``target_supports``."""
    return SUPPORTS / name


def support_agreement(evalset: str) -> Path:
    """How close the corpus support set's top-k projection stays to the exact one on eval set ``evalset``'s
    real image features (a DVC metric of stage support_agreement@NAME)."""
    return SUPPORT_AGREEMENT / f"{evalset}.json"


def method(name: str) -> Path:
    return METHODS / name


def model(name: str) -> Path:
    return METHODS / name / "model"


def train_curve(name: str) -> Path:
    """The training loss of method instance ``name`` per step (DVC plots data: rows {step, loss, phase})."""
    return METHODS / name / "train_curve.json"


def captions(name: str, evalset: str) -> Path:
    return METHODS / name / "captions" / f"{evalset}.json"


def metrics(name: str, evalset: str) -> Path:
    return METHODS / name / "metrics" / f"{evalset}.json"


def evaluation(name: str, evalset: str) -> Path:
    return METHODS / name / "evaluation" / f"{evalset}.json"


def world(name: str) -> Path:
    """World NAME's own artifacts: its corpus file, eval set folder and model folders."""
    return WORLDS / name


def world_metrics(name: str, part: str) -> Path:
    return WORLD_METRICS / name / f"{part}.json"
