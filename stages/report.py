"""Stage report: one HTML page with every method's metrics (papers' Table 1 layout) and a gallery."""
import json

from pipeline import paths
from pipeline.methods import method_module
from pipeline.evaluation.report import write_report
from pipeline.runtime import evalsets, params, say
from pipeline.data.shards import ShardedArtifact


def read_json(path):
    return json.loads(path.read_text(encoding="utf-8"))


def main() -> None:
    p = params()
    methods = p["methods"]
    rows, gallery = [], []
    for name, cfg in methods.items():
        folder = paths.method_dir(name)
        metrics, details = read_json(folder / "metrics.json"), read_json(folder / "evaluation.json")
        variant = method_module(cfg["method"]).variant(cfg)
        for evalset, scores in metrics.items():
            rows.append({"method": name, "variant": variant, "eval_set": evalset, **scores,
                         "skipped": details[evalset]["skipped"]})
    for evalset in evalsets(p):
        images = ShardedArtifact(paths.EVALSETS / evalset)
        tags = ShardedArtifact(paths.EVAL_TAGS / evalset)
        predictions = {name: read_json(paths.method_dir(name) / "captions" / f"{evalset}.json") for name in methods}
        first = next(images.iter_batches(["image_id", "image", "references"], batch_size=p["evaluate"]["gallery_size"]))
        labels = dict(zip(tags.read_column("image_id").to_pylist(), tags.read_column("labels").to_pylist()))
        for image_id, image, references in zip(*(first.column(i).to_pylist() for i in range(3))):
            gallery.append({"image_id": f"{evalset}/{image_id}", "image": image, "references": references,
                            "tags": labels[image_id],
                            "predictions": {name: predictions[name][image_id] for name in methods}})
    notes = [f"Profile: {p['profile']}. CLIP: {p['models']['clip']['name']} "
             f"(pretrained: {p['models']['clip']['pretrained']}); detector: {p['models']['detector']['name']}; "
             f"text-to-image: {p['models']['diffusion']['name']}.",
             "BLEU, METEOR, ROUGE-L, CIDEr (CIDEr-D) and SPICE are pycocoevalcap's, x100. CLIPScore and "
             "RefCLIPScore (Hessel et al. 2021, w = 2.5) use the pipeline's CLIP model, so they compare methods "
             "within one profile only."]
    for name in p.get("mixup", {}).get("models", []):
        mixup = read_json(paths.method_dir(name) / "mixup.json")
        curve = ", ".join(f"λ={r['lambda']:g}: {100 * r['CIDEr']:.1f}" for r in mixup["results"])
        notes.append(f"Mix-up analysis of {name} on {mixup['evalset']} (CIDEr of caption(normalize(λ·t + (1−λ)·v)); "
                     f"{mixup['caveat']}): {curve}. Plot: methods/{name}/mixup.png.")
    if p["models"]["clip"]["pretrained"] is None:
        notes.append("The offline profile's models are small and randomly initialised: its numbers test the "
                     "plumbing, not caption quality.")
    out = paths.REPORT / "index.html"
    write_report(out, f"SynthCap report ({p['profile']})", rows, gallery, notes)
    say(f"report: {len(rows)} result rows, {len(gallery)} gallery images -> {out}")


if __name__ == "__main__":
    main()
