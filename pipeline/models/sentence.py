"""Sentence embeddings (sentence-transformers) for SynC's text-text similarity (pipeline/refine.py).

``sentence_encoder_for(name)`` loads a sentence-transformers model id or local folder like every other
loader (HF_HUB_OFFLINE=1 and local paths work) and returns texts -> L2-normalised embeddings [n, E]
with its identity. Only a profile whose `refine.text_similarity` names such a model uses it (the paper
profiles); the offline and world profiles use CLIP's text features instead. The package is in the locks and
imported here only, on first use (it is slow to import); an environment built without it gets an error that
names the fix.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from pipeline.vectors import l2_normalize


def sentence_encoder_for(name: str, device: str = "cpu", batch_size: int = 256
                         ) -> tuple[Callable[[list[str]], np.ndarray], dict]:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise RuntimeError(
            f"refine.text_similarity names the sentence-transformers model {name!r}, but the package "
            f"sentence-transformers is not installed: `pip install sentence-transformers` (SynC's "
            f"text-text similarity), or set refine.text_similarity: clip to use the CLIP text features") from None
    try:
        model = SentenceTransformer(name, device=device)
    except Exception as err:    # noqa: BLE001 (hub, path and format errors alike: name the model)
        raise RuntimeError(
            f"could not load the sentence-transformers model {name!r} (refine.text_similarity): {err}\n"
            f"Provide it by one of: a local folder in params.yaml (refine.text_similarity), a Hugging Face cache "
            f"that already holds it (with HF_HUB_OFFLINE=1), or network access to the hub.") from None
    model.eval()

    def encode(texts: list[str]) -> np.ndarray:
        return l2_normalize(model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True))

    from pipeline.models import weights_sha256
    return encode, {"name": name, "library": "sentence-transformers", "weights_sha256": weights_sha256(model)}
