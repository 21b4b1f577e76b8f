"""params.yaml and the configuration profiles it is made from.

``profiles/offline.yaml`` is the full offline profile; ``params.yaml`` in a fresh clone holds the demo's,
``DEMO_PROFILE``. Any other profile is an overlay: ``_base: offline`` plus the keys it changes, merged recursively
(a mapping merges, anything else replaces; a mapping with ``_replace: true`` replaces the base's
mapping whole, e.g. a profile's own list of methods or eval sets). A method instance may start from
another with ``_like: NAME`` (merged recursively, so an ablation row names only what it switches), resolved
once the profile is merged onto its bases.
The result is validated (pipeline/config.py) before it is written. Select one with::

    make profile NAME=paper-syntic-coco      # = python -m pipeline.profiles use paper-syntic-coco
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import yaml

from pipeline import config as cfg

REPO = Path(__file__).resolve().parents[1]
PROFILES = REPO / "profiles"
PARAMS = REPO / "params.yaml"
DEMO_PROFILE = "world"       # what params.yaml holds in a fresh clone, and what `make demo` runs


def merge(base: dict, overlay: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and value.get("_replace"):
            out[key] = {k: copy.deepcopy(v) for k, v in value.items() if k != "_replace"}
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def expand_instances(methods: dict) -> dict:
    """Resolve ``_like: NAME`` in method instances (recursively merged onto NAME's settings)."""
    out: dict = {}

    def resolve(name: str, seen: tuple = ()) -> dict:
        if name in out:
            return out[name]
        if name in seen:
            raise cfg.ConfigError(f"`methods.{name}._like` forms a cycle: {' -> '.join(seen + (name,))}")
        if name not in methods:
            raise cfg.ConfigError(f"`methods.{seen[-1]}._like` names {name!r}, which is not in `methods`")
        entry = dict(methods[name] or {})
        like = entry.pop("_like", None)
        out[name] = merge(resolve(like, seen + (name,)), entry) if like else entry
        return out[name]

    for name in methods:
        resolve(name)
    return {name: out[name] for name in methods}


def resolve_profile(name: str) -> dict:
    """Profile ``name`` merged onto its bases, then its method instances expanded: ``_like`` is resolved once,
    on the merged profile, so an overlay that changes an instance changes the instances made like it too
    (the world's `syntic` epochs reach the offline profile's `syntic-baseline`)."""
    params = _merged(name)
    if isinstance(params.get("methods"), dict):
        params["methods"] = expand_instances(params["methods"])
    return params


def _merged(name: str) -> dict:
    path = PROFILES / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILES.glob("*.yaml"))
        raise FileNotFoundError(f"no profile {name!r} in {PROFILES} (known: {', '.join(known)})")
    overlay = cfg.read_yaml(path)
    base = overlay.pop("_base", None)
    return merge(_merged(base), overlay) if base else overlay


class _NoAliases(yaml.SafeDumper):
    def ignore_aliases(self, data):
        return True


def render(params: dict, name: str) -> str:
    header = (f"# Generated from profiles/{name}.yaml by `make profile NAME={name}`; edit freely (every key is\n"
              f"# documented in pipeline/config.py and the method modules), or switch back with\n"
              f"# `make profile NAME={DEMO_PROFILE}` (the demo's). Every stage reads its keys from here (dvc.yaml `params:`).\n")
    return header + yaml.dump(params, Dumper=_NoAliases, sort_keys=False, default_flow_style=False, width=100,
                              allow_unicode=True)


def use_profile(name: str, path: Path = PARAMS) -> dict:
    """Resolve, validate and write profile ``name`` to params.yaml with every key explicit (defaults
    filled in), so that DVC tracks every value a stage reads."""
    try:
        params = cfg.as_dict(cfg.from_dict(resolve_profile(name)))
    except cfg.ConfigError as err:
        raise cfg.ConfigError(f"profile {name!r}: {err}") from None
    path.write_text(render(params, name), encoding="utf-8")
    return params


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[0] != "use":
        sys.exit("usage: python -m pipeline.profiles use PROFILE")
    try:
        use_profile(argv[1])
    except (cfg.ConfigError, FileNotFoundError) as err:
        sys.exit(str(err))
    print(f"params.yaml now holds profile '{argv[1]}'; run `dvc repro` (or `dvc repro --dry --force` to see the plan)")


if __name__ == "__main__":
    main(sys.argv[1:])
