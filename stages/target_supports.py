"""Stage target_supports: support sets (Eq. 3) over other caption files, for the papers' "-TT" variants.

Cross-domain captioning trains on corpus A and captions eval set B; with ``inference_support: NAME``
a method projects B's image features onto the captions of B's domain (e.g. Flickr30k's training
captions) instead of A's. Each entry of ``target_supports`` in params.yaml is read and cleaned like
the corpus, encoded with the pipeline's CLIP, and indexed like the corpus support set.
"""
import shutil

from pipeline import paths
from pipeline.data.captions import clean_captions, read_captions
from pipeline.runtime import clip_model, params, say, write_json
from pipeline.support import SupportSet


def main() -> None:
    p = params()
    wanted = {name: cfg for name, cfg in (p.get("target_supports") or {}).items() if cfg}
    paths.TARGET_SUPPORTS.mkdir(parents=True, exist_ok=True)
    for stale in paths.TARGET_SUPPORTS.iterdir():
        if stale.is_dir() and stale.name not in wanted:
            shutil.rmtree(stale)
    write_json(paths.TARGET_SUPPORTS / "index.json", {"target_supports": sorted(wanted)})  # never an empty output
    clip = clip_model(p)
    for name, cfg in wanted.items():
        read = read_captions(cfg["path"], cfg.get("format", "auto"), splits=cfg.get("splits"),
                             split_file=cfg.get("split_file"))
        kept, report = clean_captions(read, max_words=p["corpus"]["max_words"])
        texts = [c.text for c in kept][:cfg.get("max_captions")]
        support = SupportSet.build(clip.encode_texts(texts, p["encode"]["batch_size"]), index=p["support"]["index"])
        support.save(paths.support_dir(name))
        write_json(paths.support_dir(name) / "report.json",
                   {"model": clip.identity, "support_size": support.n, "source": str(cfg["path"]), "cleaning": report})
        say(f"target_supports: {name}: {support.n} captions of {cfg['path']}")


if __name__ == "__main__":
    main()
