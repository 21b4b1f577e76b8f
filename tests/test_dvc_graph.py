"""dvc.yaml says what each stage reads: the params DVC tracks are exactly the keys the configuration
declares for the stage (pipeline/config.py STAGE_PARAMS), and its code deps cover the import closure
that the stage's fingerprint hashes (pipeline/data/provenance.py)."""
import shlex
import subprocess
import shutil
from pathlib import Path

import pytest
from dvc.dependency.param import ParamsDependency
from dvc.repo import Repo

from pipeline import config, methods
from pipeline.data.provenance import code_files
from pipeline.profiles import use_profile

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=["params.yaml", "offline"])
def resolved(request, tmp_path_factory):
    """(the configuration, its stages as DVC resolves them: foreach and matrix expanded by DVC itself), for
    params.yaml as committed (the world profile, whose world stages exist only there) and for the offline
    profile (its eval set of photos, the demo_photos stage's)."""
    root = REPO
    if request.param != "params.yaml":
        root = tmp_path_factory.mktemp(request.param)
        shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
        use_profile(request.param, root / "params.yaml")
    with Repo(str(root), uninitialized=True) as repo:
        return config.load(root / "params.yaml"), [(s.name, s.cmd, s.deps) for s in repo.index.stages]


@pytest.fixture(scope="module")
def stages(resolved):
    return resolved[1]


@pytest.fixture(scope="module")
def offline(resolved):
    """The configuration the stages above were resolved from."""
    return resolved[0]


def stage_key(name: str, cmd: str) -> tuple[str, str | None]:
    """(STAGE_PARAMS key, the stage's foreach/matrix name) from the DVC stage name and command."""
    base = name.split("@")[0]
    args = shlex.split(cmd)[3:]
    instance = args[0] if base in ("train", "evaluate", "modality_gap") else None
    return base, instance if instance is not None else (name.split("@")[1] if "@" in name else None)


def test_every_stage_tracks_exactly_the_params_the_configuration_declares(stages, offline):
    assert set(config.read_yaml(REPO / "dvc.yaml")["stages"]) == set(config.STAGE_PARAMS)
    for name, cmd, deps in stages:
        base, key = stage_key(name, cmd)
        tracked = [p for d in deps if isinstance(d, ParamsDependency) for p in d.params]
        assert sorted(tracked) == sorted(config.dvc_params(base, offline, key)), name


def covers(deps: set[str], path: str) -> bool:
    return path in deps or any(path.startswith(d.rstrip("/") + "/") for d in deps)


def test_every_stage_depends_on_the_code_its_fingerprint_hashes(stages, offline):
    for name, cmd, deps in stages:
        declared = {str(d.def_path) for d in deps if not isinstance(d, ParamsDependency)}
        module = shlex.split(cmd)[2]
        modules = [module]
        base, key = stage_key(name, cmd)
        if base in ("train", "evaluate", "modality_gap"):
            modules.append(f"pipeline.methods.{offline.methods[key].method}")
        needed = {f for f in code_files(*modules) if (REPO / f).read_text().strip() or not f.endswith("__init__.py")}
        missing = sorted(f for f in needed if not covers(declared, f))
        assert not missing, f"{name} does not list the code it runs: {missing}"
        assert "pipeline/config.py" in declared, f"{name}: configuration defaults are parameter values"


def test_training_depends_on_no_eval_side_artifact(stages):
    """Adding or editing an eval set trains nothing: training reads the corpus side only."""
    for name, _, deps in stages:
        if name.startswith("train@"):
            data = [str(d.def_path) for d in deps if str(d.def_path).startswith("artifacts/")]
            assert data and not [d for d in data if "eval" in d or d in ("artifacts/supports", "artifacts/features")]


def test_every_method_module_defines_the_contract():
    for name in methods.available():
        methods.get(name)


def test_the_repository_ships_no_dvc_lock():
    """dvc.lock names one machine's float bytes (README, "Share your features"): shipped, every other
    machine's make demo would leave it modified. Each user's first run writes their own."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files", "dvc.lock"], cwd=REPO, capture_output=True, text=True, check=True)
    assert tracked.stdout.strip() == ""
