"""Captioning methods. Each is one module (its paper's equations) exposing:

    train(name, cfg, p, out_dir) -> dict     # fit on the cached artifacts, write out_dir, return a report
    caption(name, cfg, p, model_dir) -> {eval_set: {image_id: caption}}
    variant(cfg) -> str                      # the ablation row this instance is (for the report)

``params.yaml`` lists method instances under ``methods:``; ``method:`` names the module, so one
module serves several instances (ablation rows with different switches).
"""
import importlib
import pkgutil

ENTRY_POINTS = ("train", "caption", "variant")


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def method_module(method: str):
    if method not in available():
        raise ValueError(f"unknown method {method!r} (available: {', '.join(available())})")
    module = importlib.import_module(f"{__name__}.{method}")
    missing = [f for f in ENTRY_POINTS if not callable(getattr(module, f, None))]
    if missing:
        raise TypeError(f"pipeline/methods/{method}.py lacks the entry point(s) {', '.join(missing)}")
    return module
