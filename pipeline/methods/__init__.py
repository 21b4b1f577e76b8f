"""Captioning methods. Each is one module (its paper's equations) exposing two entry points:

    train(name, cfg, p, out_dir) -> dict     # fit on the cached artifacts, write out_dir, return a report
    caption(name, cfg, p, model_dir) -> {eval_set: {image_id: caption}}

``params.yaml`` lists method instances under ``methods:``; ``method:`` names the module, so one
module serves several instances (ablation rows with different switches).
"""
import importlib

KNOWN = ("syntic",)


def method_module(method: str):
    if method not in KNOWN:
        raise ValueError(f"unknown method {method!r} (known: {', '.join(KNOWN)})")
    return importlib.import_module(f"pipeline.methods.{method}")
