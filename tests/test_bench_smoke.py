"""`make bench` is not a test; this runs one tiny benchmark (Eq. 3, --quick) through bench/run.py for
correctness only: the table prints, results.json holds every figure with its fields, the ratios are
finite. No timing is asserted."""
import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quick_support_benchmark_writes_every_figure(tmp_path):
    out = tmp_path / "bench" / "results.json"
    run = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--only", "support", "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| figure | this project | baseline | ratio | target | conditions |" in run.stdout
    results = json.loads(out.read_text())
    assert any(name.startswith("Eq. 3 exact (streaming) vs dense") for name in results)
    assert any("top-64" in name and "vs exact" in name for name in results)
    for name, figure in results.items():
        assert {"value", "baseline", "ratio", "unit", "conditions"} <= set(figure), name
        assert all(math.isfinite(figure[k]) and figure[k] > 0 for k in ("value", "baseline", "ratio")), name
        assert figure["conditions"]
        if figure.get("target"):
            assert isinstance(figure["holds"], bool)
    cosines = [float(c.split("mean cosine to exact ")[1].split()[0].rstrip(";")) for c in
               (f["conditions"] for f in results.values()) if "mean cosine to exact" in c]
    assert cosines and all(0.99 <= c <= 1.000001 for c in cosines)
    assert json.loads(out.with_name("run.json").read_text())["quick"] is True


def test_bench_run_refuses_an_unknown_benchmark():
    run = subprocess.run([sys.executable, "-m", "bench.run", "--only", "nope"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode != 0 and "unknown benchmark" in run.stderr
