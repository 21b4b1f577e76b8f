"""Where every artifact lives (all under artifacts/, each one a DVC output)."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "artifacts"

CORPUS = ARTIFACTS / "corpus"                          # captions: caption_id, group_id, text, split, source
EVALSETS = ARTIFACTS / "evalsets"                      # evalsets/NAME: image_id, image bytes, references
SYNTHETIC_IMAGES = ARTIFACTS / "synthetic"             # one generated image per caption (aligned with corpus)
FEATURES = ARTIFACTS / "features"
TEXT_FEATURES = FEATURES / "text"                      # CLIP text feature per corpus caption
SYNTHETIC_FEATURES = FEATURES / "synthetic"            # CLIP global/patches/cls_attention per synthetic image
EVAL_FEATURES = FEATURES / "eval"                      # eval/NAME: the same for the real eval images
TAGS = ARTIFACTS / "tags"
SYNTHETIC_TAGS = TAGS / "synthetic"                    # detector labels/scores/boxes per synthetic image
EVAL_TAGS = TAGS / "eval"                              # eval/NAME
TAG_VOCABULARY = TAGS / "vocabulary"                   # CLIP text feature of every detector label (Eq. 4)
OPTIMIZED = ARTIFACTS / "optimized"                    # SynTIC Eq. 2 features (aligned with corpus)
SUPPORT = ARTIFACTS / "support"                        # FAISS index over the corpus text features (Eq. 3)
TARGET_SUPPORTS = ARTIFACTS / "supports"               # supports/NAME: the same over other caption files ("-TT")
METHODS = ARTIFACTS / "methods"                        # methods/NAME/{model,captions,metrics.json}
CONCEPTS = ARTIFACTS / "concepts"                      # PCM-Net concept vocabulary + CLIP text features
REPORT = ARTIFACTS / "report"


def method_dir(name: str) -> Path:
    return METHODS / name


def support_dir(name: str = "corpus") -> Path:
    """The support set called ``name``: "corpus" (the training corpus) or one of params.yaml's ``target_supports``."""
    return SUPPORT if name == "corpus" else TARGET_SUPPORTS / name
