"""The README's faithful-profile table: one row per paper row of ``paper_results.yaml`` (its numbers and the
table they come from), the paper-profile instances that run it, and whether each is comparable (the
reason when not, as the report gives it: ``papers.not_comparable``). Made from the data, never by hand:

    python -m pipeline.evaluation.paper_table            # print the table
    python -m pipeline.evaluation.paper_table README.md  # rewrite the README's table between its markers
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pipeline import config as cfg
from pipeline.evaluation import papers
from pipeline.methods import get
from pipeline.profiles import resolve_profile

PAPER_PROFILES = ("paper-syntic-coco", "paper-coco", "paper-coco-to-flickr30k", "paper-capdec-coco",
                  "paper-pcmnet-l14-coco")
SHORT = {"BLEU-1": "B1", "BLEU-4": "B4", "METEOR": "M", "ROUGE-L": "R", "CIDEr": "C", "SPICE": "S"}
BEGIN = "<!-- faithful-profile table: python -m pipeline.evaluation.paper_table README.md -->"
END = "<!-- end of the faithful-profile table -->"
HEADER = ("| paper row | paper, source | variant | corpus → eval | the paper's numbers | run by (profile: instance) "
          "| CLIP here | comparable? |\n|---|---|---|---|---|---|---|---|")


@dataclass(frozen=True)
class Run:
    """A paper profile's method instance that the report compares with a paper row."""
    profile: str
    instance: str
    clip: str
    not_comparable: str | None


@lru_cache(maxsize=None)
def profile_config(profile: str) -> cfg.Config:
    return cfg.from_dict(resolve_profile(profile))


def runs(row: papers.PaperRow, profiles=PAPER_PROFILES) -> list[Run]:
    """Every (profile, instance) whose method, variant, corpus and an eval set's dataset match ``row``."""
    out = []
    for profile in profiles:
        c = profile_config(profile)
        if c.corpus.source != row.corpus or row.eval not in {e.dataset for e in c.evalsets.values()}:
            continue
        for name, instance in c.methods.items():
            if instance.method == row.method and get(instance.method).variant(instance.train, instance.caption) == \
                    row.variant:
                out.append(Run(profile, name, c.models.clip.name,
                               papers.not_comparable(row, c.models.clip.name, instance, c)))
    return out


def numbers(row: papers.PaperRow) -> str:
    return " · ".join(f"{SHORT[m]} {row.metrics[m]:.1f}" for m in papers.METRICS if m in row.metrics)


def verdict(run: Run) -> str:
    return "yes" if run.not_comparable is None else f"no: {run.not_comparable}"


def markdown(profiles=PAPER_PROFILES) -> str:
    lines = [HEADER]
    for row in papers.table():
        found = runs(row, profiles)
        where = "<br>".join(f"{r.profile}: `{r.instance}`" for r in found) or "none"
        clip = "<br>".join(r.clip for r in found) or "—"
        judged = "<br>".join(verdict(r) for r in found) or \
            f"no: no paper profile trains on {row.corpus} and evaluates on {row.eval}"
        lines.append(f"| `{row.id}` | {row.paper}, {row.source} | {row.variant} | {row.corpus} → {row.eval} | "
                     f"{numbers(row)} (CLIP {row.clip}) | {where} | {clip} | {judged} |")
    return "\n".join(lines)


def rewrite(readme: Path) -> None:
    text = readme.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme}: no faithful-profile table markers ({BEGIN!r} ... {END!r})")
    head, rest = text.split(BEGIN, 1)
    readme.write_text(f"{head}{BEGIN}\n{markdown()}\n{END}{rest.split(END, 1)[1]}", encoding="utf-8")


if __name__ == "__main__":
    rewrite(Path(sys.argv[1])) if len(sys.argv) > 1 else print(markdown())
