"""params.yaml and the configuration profiles it is made from.

``profiles/offline.yaml`` is the full offline profile (what ``params.yaml`` holds in a fresh clone).
Any other profile is an overlay: ``_base: offline`` plus the keys it changes, merged recursively
(a mapping merges, anything else replaces; a mapping with ``_replace: true`` replaces the base's
mapping whole, e.g. a profile's own list of methods or eval sets). Select one with::

    make profile NAME=paper-syntic-coco      # = python -m pipeline.params use paper-syntic-coco
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
PROFILES = REPO / "profiles"
PARAMS = REPO / "params.yaml"


def load_params(path: Path | str = PARAMS) -> dict:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def merge(base: dict, overlay: dict) -> dict:
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and value.get("_replace"):
            out[key] = {k: v for k, v in value.items() if k != "_replace"}
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def resolve_profile(name: str) -> dict:
    path = PROFILES / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILES.glob("*.yaml"))
        raise FileNotFoundError(f"no profile {name!r} in {PROFILES} (known: {', '.join(known)})")
    overlay = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    base = overlay.pop("_base", None)
    return merge(resolve_profile(base), overlay) if base else overlay


def render(params: dict, name: str) -> str:
    header = (f"# Generated from profiles/{name}.yaml by `make profile NAME={name}`; edit freely, or\n"
              f"# switch back with `make profile NAME=offline`. Every stage reads its section from here.\n")
    return header + yaml.safe_dump(params, sort_keys=False, default_flow_style=False, width=100)


def use_profile(name: str, path: Path = PARAMS) -> dict:
    params = resolve_profile(name)
    path.write_text(render(params, name), encoding="utf-8")
    return params


def section(params: dict, dotted: str) -> Any:
    node: Any = params
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            raise KeyError(f"params.yaml has no '{dotted}' (missing '{key}')")
        node = node[key]
    return node


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[0] != "use":
        sys.exit("usage: python -m pipeline.params use PROFILE")
    use_profile(argv[1])
    print(f"params.yaml now holds profile '{argv[1]}'; run `dvc repro` (or `dvc repro --dry` to see the plan)")


if __name__ == "__main__":
    main(sys.argv[1:])
