"""Resume equivalence: the loss of every step of an uninterrupted run next to interrupted ones.

``python -m benchmarks.resume_equivalence [--out DIR] [--steps 8]`` runs the tiny model on CPU
under ``torchrun`` (gloo) and prints a markdown table, one row per step:

* **uninterrupted**, 2 processes;
* **kill -9 and resume**, 2 processes: the whole process group is killed at a random moment after
  the step-``steps/2`` checkpoint, then the same command is run again;
* **resumed on 3 processes** and **on 1 process**: 2 processes stop after ``steps/2`` updates
  (``--stop-after``), then the run continues with another world size (the same global batch:
  12 videos per update, micro-batches of 2, accumulation 3 on 2 processes, 2 on 3, 6 on 1);
* the same uninterrupted / 3-process pair with the contrastive loss off (``contrastive_weight:
  0``), where only the order of floating-point sums differs between world sizes.

Each run also records, per process, the global position, video and a digest of the tokens of
every sample it trained on; the table's last rows say whether every update of every run saw
exactly the samples of the uninterrupted run. Loss values are the metrics.jsonl means over all
processes, printed to the last bit (``float.hex`` equality is what "equal" means here).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

DRIVER = """\
import hashlib, json, os, sys
from vimpac.config import PretrainConfig
from vimpac.pretrain import train

cfg = PretrainConfig(**json.loads(sys.argv[3]))
stop_after = int(sys.argv[4]) or None
rank = int(os.environ.get("RANK", "0"))
record = open(os.path.join(sys.argv[2], f"samples-rank{rank}.jsonl"), "a", buffering=1)


class Recorded:
    def __init__(self, loader):
        self.loader, self.dataset = loader, loader.dataset

    def __iter__(self):
        for batch in self.loader:
            for pos, video, tokens in zip(batch["position"].tolist(), batch["video"].tolist(),
                                          batch["tokens"]):
                digest = hashlib.sha1(tokens.numpy().tobytes()).hexdigest()[:16]
                record.write(json.dumps([pos, video, digest]) + "\\n")
            yield batch


build = train.build_loader
train.build_loader = lambda *a, **k: Recorded(build(*a, **k))
result = train.run_pretrain([sys.argv[1]], cfg, sys.argv[2], stop_after=stop_after)
print("STEP", result.step)
"""

CONFIG = dict(model="tiny", frames=5, grid=8, batch_size=12, micro_batch=2, steps=8,
              num_workers=0, checkpoint_every=2, log_every=1, proj_hidden=32, lr=1e-3,
              read_window=24, seed=0)


def torchrun(archive: Path, out: Path, cfg: dict[str, Any], procs: int, stop_after: int = 0,
             driver: Path | None = None, timeout: float = 900) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={procs}", str(driver), str(archive), str(out), json.dumps(cfg),
           str(stop_after)]
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / f"torchrun-{procs}.log", "a")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def finish(proc: subprocess.Popen, what: str, timeout: float = 900) -> None:
    if proc.wait(timeout=timeout) != 0:
        raise RuntimeError(f"{what}: torchrun exited with {proc.returncode} (see its log)")


def losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[int(row["step"])] = float(row["loss"])
    return out


def samples_by_step(run: Path, batch: int) -> dict[int, list[tuple[int, int, str]]]:
    """step -> sorted (position, video, digest) of the samples trained on in that update."""
    seen: dict[int, tuple[int, str]] = {}
    for path in sorted(run.glob("samples-rank*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                pos, video, digest = json.loads(line)
            except ValueError:
                continue                       # a line cut by kill -9
            if seen.setdefault(pos, (video, digest)) != (video, digest):
                raise RuntimeError(f"{run}: position {pos} gave two different samples")
    steps: dict[int, list[tuple[int, int, str]]] = {}
    for pos, (video, digest) in sorted(seen.items()):
        steps.setdefault(pos // batch + 1, []).append((pos, video, digest))
    return steps


def kill_and_resume(archive: Path, out: Path, cfg: dict[str, Any], driver: Path,
                    rng: random.Random) -> str:
    """Start 2 processes, SIGKILL the group at a random moment after the middle checkpoint,
    run again to the end; returns when the kill landed."""
    middle = out / "checkpoints" / f"step-{cfg['steps'] // 2:09d}.pt"
    proc = torchrun(archive, out, cfg, 2, driver=driver)
    deadline = time.monotonic() + 900
    while not middle.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 1.5))
    landed = "after the run ended (no kill)"
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        done = sorted((out / "checkpoints").glob("step-*.pt"))
        landed = f"killed with {done[-1].stem} as the newest checkpoint" if done else "killed"
    finish(torchrun(archive, out, cfg, 2, driver=driver), "resume after kill -9")
    return landed


def run_all(work: Path, steps: int, seed: int = 0) -> dict[str, Any]:
    from benchmarks.fixtures import write_token_archive

    archive = write_token_archive(work / "archive", shards=6, videos_per_shard=16,
                                  frames=(4, 24), grid=8, codebook=256)
    driver = work / "driver.py"
    driver.write_text(DRIVER)
    cfg = {**CONFIG, "steps": steps}
    mlm = {**cfg, "contrastive_weight": 0.0}
    half = steps // 2
    runs: dict[str, Path] = {}

    def whole(name: str, config: dict[str, Any]) -> None:
        runs[name] = work / name
        finish(torchrun(archive, runs[name], config, 2, driver=driver), name)

    def elastic(name: str, config: dict[str, Any], procs: list[int]) -> None:
        first = work / f"{name}-first"
        finish(torchrun(archive, first, config, 2, half, driver=driver), f"{name}: first half")
        for n in procs:
            runs[f"{name}-{n}"] = work / f"{name}-{n}"
            shutil.copytree(first, runs[f"{name}-{n}"])
            finish(torchrun(archive, runs[f"{name}-{n}"], config, n, driver=driver),
                   f"{name}: resume on {n}")

    whole("uninterrupted", cfg)
    runs["kill9"] = work / "kill9"
    landed = kill_and_resume(archive, runs["kill9"], cfg, driver, random.Random(seed))
    elastic("resumed", cfg, [3, 1])
    whole("mlm-uninterrupted", mlm)
    elastic("mlm-resumed", mlm, [3])
    batch = cfg["batch_size"]
    return {"steps": steps, "half": half, "kill": landed, "config": cfg,
            "losses": {k: losses(v) for k, v in runs.items()},
            "samples": {k: samples_by_step(v, batch) for k, v in runs.items()}}


COLUMNS = [("uninterrupted", "uninterrupted, 2 procs", None),
           ("kill9", "kill -9 + resume, 2 procs", "uninterrupted"),
           ("resumed-3", "resume on 3 procs", "uninterrupted"),
           ("resumed-1", "resume on 1 proc", "uninterrupted"),
           ("mlm-uninterrupted", "MLM only: uninterrupted", None),
           ("mlm-resumed-3", "MLM only: resume on 3 procs", "mlm-uninterrupted")]


def cell(value: float, reference: float | None) -> str:
    text = f"{value:.9g}"
    if reference is None:
        return text
    if value.hex() == reference.hex():
        return f"{text} (=)"
    return f"{text} ({value - reference:+.1e})"


def table(result: dict[str, Any]) -> str:
    loss, seen = result["losses"], result["samples"]
    head = "| step | " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for step in range(1, result["steps"] + 1):
        row = [cell(loss[k][step], loss[ref][step] if ref else None) for k, _, ref in COLUMNS]
        mark = " (resumed here)" if step == result["half"] + 1 else ""
        lines.append(f"| {step}{mark} | " + " | ".join(row) + " |")
    same = []
    for key, _, ref in COLUMNS:
        base = ref or key
        ok = all(seen[key].get(s) == seen[base].get(s) and len(seen[key].get(s, [])) ==
                 result["config"]["batch_size"] for s in range(1, result["steps"] + 1))
        same.append("yes" if ok else "**no**")
    lines.append("| same samples in every update | " + " | ".join(same) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.resume_equivalence",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moment")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vimpac-resume-") as tmp:
        result = run_all(Path(tmp), args.steps, args.seed)
    md = table(result)
    print(md)
    print(f"kill -9: {result['kill']}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "resume-equivalence.md").write_text(md + f"\nkill -9: {result['kill']}\n")
    clean = {k: v for k, v in result.items() if k != "samples"}
    (args.out / "resume-equivalence.json").write_text(json.dumps(clean, indent=1) + "\n")
    digest = hashlib.sha1(json.dumps(result["samples"], sort_keys=True).encode()).hexdigest()
    print(f"samples digest {digest[:12]}; wrote {args.out / 'resume-equivalence.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
