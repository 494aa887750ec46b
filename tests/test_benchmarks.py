"""The benchmark harness: every benchmark yields numbers at --scale tiny; gpu_check.sh dry-runs."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = {"tokenize", "loader", "training", "loader-memory"}


def _run(cmd, tmp_path, timeout):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2",
           "PYTHON": sys.executable}                 # gpu_check.sh runs this interpreter
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _finite(stat):
    return all(math.isfinite(stat[k]) for k in ("median", "min", "max")) and stat["n"] >= 1


def test_harness_tiny_writes_every_benchmark(tmp_path):
    out = tmp_path / "out"
    _run([sys.executable, "-m", "benchmarks", "--scale", "tiny", "--out", str(out),
          "--work", str(tmp_path / "work")], tmp_path, timeout=400)
    data = json.loads((out / "bench.json").read_text())
    assert data["errors"] == {}
    assert set(data["benchmarks"]) == EXPECTED
    assert data["machine"]["cores"] >= 1 and data["machine"]["torch"]
    figures = [f for b in data["benchmarks"].values() for f in b["figures"]]
    names = " | ".join(f["figure"] for f in figures)
    for needle in ("decode-only", "encode-only", "webdataset", "zarr", "on-the-fly",
                   "block mask", "MFU", "bf16", "peak RSS"):
        assert needle in names, needle
    for fig in figures:
        assert _finite(fig["value"]) and fig["value"]["median"] > 0, fig
        if fig["baseline"] is not None:
            assert _finite(fig["baseline"]) and _finite(fig["ratio"]), fig
        if fig["target"] is not None:
            assert fig["met"] in (True, False), fig
    assert sum(f["baseline"] is not None for f in figures) >= len(figures) - 1
    md = (out / "bench.md").read_text()
    assert "| benchmark | figure | value | baseline | ratio | target | met? |" in md
    assert data["machine"]["cpu"] in md
    assert not (tmp_path / "RESULTS.md").exists()      # tiny runs never overwrite RESULTS.md


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu"
    proc = _run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out",
                 str(out)], tmp_path, timeout=400)
    data = json.loads((out / "gpu.json").read_text())
    assert data["dry_run"] is True and data["errors"] == {} and data["skipped"] == []
    tok = data["tokenize"]
    assert tok["failed"] == 0 and tok["job_src_fps"] > 0 and tok["decode_only_src_fps"] > 0
    assert tok["encoder_calls"] >= 1 and 0 < tok["encoder_busy_fraction"] < 1
    modes = {(r["preset"], r["compile"]) for r in data["pretrain"]}
    assert modes == {("tiny", "eager"), ("tiny", "layers")}
    assert all(r["clips_per_s"] > 0 and r["mfu"] > 0 for r in data["pretrain"])
    assert 0 <= data["loader"]["wait_fraction"] < 1
    kernels = data["attention"]["kernels"]
    assert set(kernels) == {"sdpa-math", "matmul"}
    assert all(k["clips_per_s"] > 0 for k in kernels.values())
    assert data["max_batch"]["largest"]["tiny"]["videos"] >= 1
    assert data["max_batch"]["at_largest"]["clips_per_s"] > 0
    assert "| kind of op | tiny bf16 |" in data["profile"]["tables"][0]
    assert "clips/s" in proc.stdout and "decode limit" in proc.stdout
    assert "FLOP/byte" in proc.stdout


@pytest.mark.parametrize("flag", ["--scale", "--only"])
def test_harness_rejects_bad_arguments(tmp_path, flag):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "benchmarks", flag, "nope"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "nope" in proc.stderr


def test_profile_step_tables_share_time_by_kind_and_count_bytes_and_flops(tmp_path):
    out = tmp_path / "profile.json"
    proc = _run([sys.executable, "-m", "benchmarks.profile_step", "--preset", "tiny", "--dtype",
                 "fp32", "--videos", "1", "--steps", "1", "--out", str(out)], tmp_path,
                timeout=300)
    assert "| kind of op | tiny fp32 |" in proc.stdout and "FLOP/byte" in proc.stdout
    (profile,) = json.loads(out.read_text())
    shares = profile["kinds_s"]
    assert {"matmul", "copy / layout", "LayerNorm", "dropout"} <= set(shares)
    assert abs(sum(shares.values()) - sum(profile["profiler_self_s"].values())) < 1e-6
    mm = profile["costs"]["aten::mm"]
    assert mm["flops"] > 0 and mm["bytes"] > 0 and mm["seconds"] > 0
    assert profile["costs"]["aten::view"]["bytes"] == 0          # views move nothing
