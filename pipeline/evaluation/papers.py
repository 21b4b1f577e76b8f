"""The papers' own numbers beside this run's: the table ``paper_results.yaml`` and how a run's row
is matched to a paper row and judged comparable.

A run's row (a method instance on an eval set) matches the paper row of the same method module and
variant (its ablation switches) trained on the same corpus dataset (``corpus.source``) and evaluated
on the same dataset (``evalsets.NAME.dataset``). It is comparable only if the settings the paper's
number depends on agree too: the CLIP model, and the settings the row names (``settings``: dotted
keys of the instance's train/caption settings). Otherwise the report says "not comparable" and why.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from pipeline import config as cfg

TABLE = Path(__file__).with_name("paper_results.yaml")
METRICS = ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")


@dataclass(frozen=True)
class PaperRow:
    id: str
    paper: str
    source: str
    method: str
    variant: str
    corpus: str
    eval: str
    clip: str
    metrics: dict
    settings: dict = field(default_factory=dict)


@lru_cache(maxsize=1)
def table() -> tuple[PaperRow, ...]:
    rows = []
    for index, entry in enumerate(cfg.read_yaml(TABLE) or []):
        try:
            row = PaperRow(**entry)
        except TypeError as err:
            raise ValueError(f"{TABLE}: entry {index}: {err}") from None
        unknown = set(row.metrics) - set(METRICS)
        if unknown or not all(isinstance(v, (int, float)) for v in row.metrics.values()):
            raise ValueError(f"{TABLE}: {row.id}: metrics must be numbers of {METRICS}, got {row.metrics}")
        rows.append(row)
    if len({r.id for r in rows}) != len(rows):
        raise ValueError(f"{TABLE}: ids must be unique")
    return tuple(rows)


def paper_row(method: str, variant: str, corpus: str | None, eval_dataset: str | None) -> PaperRow | None:
    for row in table():
        if (row.method, row.variant, row.corpus, row.eval) == (method, variant, corpus, eval_dataset):
            return row
    return None


def setting(instance: cfg.MethodInstance | None, dotted: str, config: cfg.Config | None = None):
    """The value here of a paper row's setting: ``train.*`` / ``caption.*`` of the instance, any other key
    (e.g. ``concepts.source``) of the run's configuration."""
    section, _, key = dotted.partition(".")
    if section in ("train", "caption"):
        return None if instance is None else cfg.lookup(instance.train if section == "train" else instance.caption, key)
    return None if config is None else cfg.lookup(config, dotted)


def not_comparable(row: PaperRow, clip_name: str, instance: cfg.MethodInstance | None,
                   config: cfg.Config | None = None) -> str | None:
    """Why this run's row cannot be compared with ``row`` (None if it can); ``config``: the run's
    configuration, for the row's settings outside the instance."""
    reasons = []
    if clip_name != row.clip:
        reasons.append(f"CLIP {clip_name} here, {row.clip} in the paper")
    for dotted, value in row.settings.items():
        here = setting(instance, dotted, config)
        if here != value:
            reasons.append(f"{dotted} is {here!r} here, {value!r} in the paper")
    return "; ".join(reasons) or None


def comparison(run_metrics: dict, row: PaperRow) -> list[tuple[str, float | None, float, float | None]]:
    """(metric, this run x100, the paper's, difference) for every metric the paper reports."""
    out = []
    for metric in METRICS:
        if metric in row.metrics:
            here = run_metrics.get(metric)
            here = 100 * here if isinstance(here, (int, float)) else None
            out.append((metric, here, float(row.metrics[metric]), None if here is None else here - row.metrics[metric]))
    return out
