"""The arrow of time on token clips: can a backbone learn the order of frames at all, and does
masked-token pre-training make it learn sooner?

The direction classes of ``demo-direction`` are pairs of clips played backwards, so only the order
of the frames tells them apart, and the ``tiny`` model does not learn them at CPU scale (README,
"Table 7 in miniature"). This benchmark takes the video, the tokenizer and the data pipeline out
of that question: it draws token clips directly, each a fixed background of random codes with a
2 x 2 object of fixed codes crossing the same cells either left to right or right to left (label 0
= left, 1 = right). The set of cells the object visits has the same distribution in both classes and
a left clip is exactly a right clip reversed in time, so a model that does not use the order of the
frames stays at 50 %. By default data is unlimited (every update draws fresh clips), so what is
measured is whether and when the model finds the rule, not how it generalises from a few videos.
``--train-clips N`` instead draws one fixed set of ``N`` clips per seed, which pre-training
(without the labels) and fine-tuning both go through in shuffled epochs, as ``demo-direction``
did with its earlier 320 training videos; the validation clips are always other ones.

Arms (:data:`ARMS`), all from the same seed and with the same budget of fine-tuning updates:

* ``scratch``: the project's backbone (``--preset``, default ``tiny``) and classification head,
  from a random start, as ``vimpac finetune`` builds them.
* ``pretrained``: the same, after ``--pretrain-steps`` updates of masked-token prediction (block
  masking with the paper's Table 2 count, no contrastive loss) on unlabelled clips of both
  directions from another random stream.
* ``mean-pool``: the ``scratch`` backbone with the head on the mean of its token features
  instead of the CLS (which averages its attention outputs over every 1-D sequence): is the
  difficulty the CLS readout's?
* ``encoder``: a control, ``torch.nn.TransformerEncoder`` of the same depth and width with joint
  attention and one learned position per token: is the difficulty this model's or a transformer's?
* ``conv3d``: a control, two 3-D convolutions: is the task learnable by a small model at all?

Each run records validation accuracy (``--val-clips`` fixed clips) every ``--eval-every`` updates
and the first update at which it reaches ``--learned-at`` (default 0.9). The summary per arm is the
mean final accuracy over seeds with its 95 % t-interval, how many seeds learned the rule (chance
is 50 %) and, beside ``scratch``, the one-sided Fisher exact p of learning it in more seeds.
Nothing is tuned on these numbers; the settings are the demo's fine-tuning ones.

    python -m benchmarks.arrow_of_time --seeds 0,1,2 --steps 2000 --out bench-out/arrow.json

Arms and seeds can run side by side (``--arms scratch --seeds 1`` in one process, ``--arms
pretrained --seeds 1`` in another, each with its own ``--out``); ``--combine A.json B.json --out
T.json`` makes one table of finished files with the same settings. The same command run again
after an interruption keeps the runs already in ``--out`` and trains the rest.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.pipeline_runs import csv_list, interval_text, mean_interval, run_main
from vimpac.common.environment import machine
from vimpac.common.fileio import atomic_write_json
from vimpac.pretrain.losses import (
    changed_from_previous_frame,
    masked_token_loss,
    moving_counts,
)
from vimpac.pretrain.masking import MASKS, MaskParams, apply_mask
from vimpac.pretrain.model import (
    PRESETS,
    ClassifierHead,
    ModelConfig,
    VimpacBackbone,
    VimpacPretrainModel,
)

OBJECT_CODES = 8  # codes 0..7 are object codes; the background uses the others
OBJECT_SIZE = 2  # the object covers 2 x 2 token cells


# ------------------------------------------------------------------------------------ the clips

def direction_clips(n: int, grid: tuple[int, int, int], codebook: int,
                    generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` clips (long [n, T, H, W]) and labels (long [n]; 0 = left, 1 = right).

    Background: one random code >= :data:`OBJECT_CODES` per cell, the same on every frame. Object:
    2 x 2 random object codes, the same on every frame, on a random row; it moves one cell per
    frame over columns ``s .. s + T - 1`` (right) or ``s + T - 1 .. s`` (left)."""
    frames, height, width = grid
    span = width - OBJECT_SIZE - (frames - 1)  # start columns that keep the path in the frame
    if span < 0 or height < OBJECT_SIZE or codebook <= OBJECT_CODES:
        raise ValueError(f"grid {grid} / codebook {codebook}: too small for a {OBJECT_SIZE}x"
                         f"{OBJECT_SIZE} object crossing {frames} columns")
    background = torch.randint(OBJECT_CODES, codebook, (n, 1, height, width), generator=generator)
    clips = background.expand(n, frames, height, width).clone()
    labels = torch.randint(0, 2, (n,), generator=generator)
    obj = torch.randint(0, OBJECT_CODES, (n, OBJECT_SIZE, OBJECT_SIZE), generator=generator)
    rows = torch.randint(0, height - OBJECT_SIZE + 1, (n,), generator=generator)
    starts = torch.randint(0, span + 1, (n,), generator=generator)
    for i in range(n):
        r, s = int(rows[i]), int(starts[i])
        for t in range(frames):
            c = s + (t if labels[i] == 1 else frames - 1 - t)
            clips[i, t, r:r + OBJECT_SIZE, c:c + OBJECT_SIZE] = obj[i]
    return clips, labels


# ------------------------------------------------------------------------------------- the arms

class VimpacClassifier(nn.Module):
    """The project's backbone and fine-tuning head (CLS -> zero-initialised linear); with
    ``pool="mean"`` the head reads the mean of the token features instead of the CLS."""

    def __init__(self, config: ModelConfig, backbone: VimpacBackbone | None = None,
                 pool: str = "cls") -> None:
        super().__init__()
        self.backbone = backbone or VimpacBackbone(config)
        self.head = ClassifierHead(config.dim, 2)
        self.pool = pool

    def forward(self, clips: Tensor) -> Tensor:
        cls, tokens = self.backbone(clips)
        return self.head(cls if self.pool == "cls" else tokens.mean(dim=(1, 2, 3)))


class EncoderControl(nn.Module):
    """``nn.TransformerEncoder`` (post-LN, GELU) of the same size, joint attention over all
    tokens, one learned position per token, a CLS token in front."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, tokens = config.dim, config.frames * config.height * config.width
        self.embed = nn.Embedding(config.vocab_size, d)
        self.pos = nn.Parameter(torch.randn(1 + tokens, d) * 0.02)
        self.cls = nn.Parameter(torch.randn(d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, config.heads, config.mlp_dim, config.dropout,
                                           activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, 2)

    def forward(self, clips: Tensor) -> Tensor:
        x = self.embed(clips.flatten(1))
        x = torch.cat([self.cls.expand(len(x), 1, -1), x], dim=1) + self.pos
        return self.head(self.encoder(x)[:, 0])


class Conv3dControl(nn.Module):
    """Token embedding -> two 3x3x3 convolutions (GELU) -> mean over the clip -> linear."""

    def __init__(self, config: ModelConfig, width: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size, 32)
        self.convs = nn.Sequential(nn.Conv3d(32, width, 3, padding=1), nn.GELU(),
                                   nn.Conv3d(width, width, 3, padding=1), nn.GELU())
        self.head = nn.Linear(width, 2)

    def forward(self, clips: Tensor) -> Tensor:
        x = self.embed(clips).permute(0, 4, 1, 2, 3)  # [B, C, T, H, W]
        return self.head(self.convs(x).mean(dim=(2, 3, 4)))


@dataclass(frozen=True)
class Settings:
    """One benchmark run's settings (the command line)."""

    preset: str = "tiny"
    steps: int = 2000  # fine-tuning updates per arm
    pretrain_steps: int = 2000  # masked-token updates of the ``pretrained`` arm
    batch: int = 32
    lr: float = 5e-4  # the demo's fine-tuning learning rate
    pretrain_lr: float = 1e-3  # the demo's pre-training learning rate
    eval_every: int = 100
    val_clips: int = 512
    learned_at: float = 0.9
    train_clips: int = 0  # a fixed set of this many training clips per seed; 0: fresh clips

    def model_config(self) -> ModelConfig:
        return dataclasses.replace(PRESETS[self.preset])

    @property
    def grid(self) -> tuple[int, int, int]:
        c = self.model_config()
        return c.frames, c.height, c.width


Draw = Callable[[], tuple[Tensor, Tensor]]  # the next batch of clips and labels


def clip_stream(settings: Settings, seed: int, order: torch.Generator) -> Draw:
    """Batches of training clips: fresh ones from ``order`` (``train_clips == 0``), or shuffled
    epochs over the seed's fixed set of ``train_clips`` clips (the same set for pre-training
    and fine-tuning), ``order`` drawing the shuffles."""
    codebook = settings.model_config().codebook_size
    if settings.train_clips == 0:
        return lambda: direction_clips(settings.batch, settings.grid, codebook, order)
    clips, labels = direction_clips(settings.train_clips, settings.grid, codebook,
                                    torch.Generator().manual_seed(30_000 + seed))
    pending = torch.empty(0, dtype=torch.long)  # the rest of the current epoch's order

    def draw() -> tuple[Tensor, Tensor]:
        nonlocal pending
        while len(pending) < settings.batch:
            pending = torch.cat([pending, torch.randperm(settings.train_clips, generator=order)])
        picked, pending = pending[:settings.batch], pending[settings.batch:]
        return clips[picked], labels[picked]

    return draw


def pretrain_backbone(settings: Settings, seed: int) -> tuple[VimpacBackbone, dict[str, Any]]:
    """Masked-token prediction (block masking, Table 2 count) on unlabelled clips of both
    directions: the backbone and the last 100 updates' mean masked-token accuracy."""
    config = settings.model_config()
    torch.manual_seed(seed)
    model = VimpacPretrainModel(config, proj_hidden=256)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.pretrain_lr, weight_decay=0.01)
    draw = clip_stream(settings, seed, torch.Generator().manual_seed(10_000 + seed))
    masks = torch.Generator().manual_seed(20_000 + seed)
    accuracies: list[float] = []
    moving: list[tuple[int, int]] = []  # (hits, targets) on codes that changed since t-1
    model.train()
    for step in range(1, settings.pretrain_steps + 1):
        clips, _ = draw()
        mask = MASKS["block"].sample((settings.batch, *settings.grid), MaskParams(), masks)
        inputs, mask = apply_mask(clips, mask, pad_id=config.pad_id, mask_id=config.mask_id)
        outputs = model(inputs, mask)
        loss, accuracy = masked_token_loss(outputs["mlm_logits"], clips[mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        accuracies.append(float(accuracy))
        counts = moving_counts(outputs["mlm_logits"], clips[mask],
                               changed_from_previous_frame(clips)[mask])
        moving.append((int(counts["mlm_moving_hits"]), int(counts["mlm_moving"])))
        if step % 100 == 0 or step == settings.pretrain_steps:
            print(f"pre-training seed {seed}: update {step}/{settings.pretrain_steps}, "
                  f"masked-token accuracy {_mean_tail(accuracies):.3f}, on moving codes "
                  f"{_moving_tail(moving) or 0:.3f}", file=sys.stderr, flush=True)
    return model.backbone, {"pretrain_steps": settings.pretrain_steps,
                            "mlm_acc_last100": _mean_tail(accuracies),
                            "mlm_acc_moving_last100": _moving_tail(moving)}


def _mean_tail(values: list[float]) -> float:
    return sum(values[-100:]) / max(len(values[-100:]), 1)


def _moving_tail(counts: list[tuple[int, int]]) -> float | None:
    """Masked-token accuracy over the last 100 updates on the codes that differ from the same
    cell one frame earlier, as ``mlm_acc_moving`` in a pre-training run's metrics."""
    hits, total = (sum(c[i] for c in counts[-100:]) for i in (0, 1))
    return hits / total if total else None


def _scratch(settings: Settings, seed: int) -> tuple[nn.Module, dict[str, Any]]:
    return VimpacClassifier(settings.model_config()), {}


def _pretrained(settings: Settings, seed: int) -> tuple[nn.Module, dict[str, Any]]:
    backbone, info = pretrain_backbone(settings, seed)
    return VimpacClassifier(settings.model_config(), backbone), info


def _mean_pool(settings: Settings, seed: int) -> tuple[nn.Module, dict[str, Any]]:
    return VimpacClassifier(settings.model_config(), pool="mean"), {}


def _encoder(settings: Settings, seed: int) -> tuple[nn.Module, dict[str, Any]]:
    return EncoderControl(settings.model_config()), {}


def _conv3d(settings: Settings, seed: int) -> tuple[nn.Module, dict[str, Any]]:
    return Conv3dControl(settings.model_config()), {}


# arm name -> (settings, seed) -> (a model mapping clips to two logits, what its setup recorded)
ARMS: dict[str, Callable[[Settings, int], tuple[nn.Module, dict[str, Any]]]] = {
    "scratch": _scratch, "pretrained": _pretrained, "mean-pool": _mean_pool,
    "encoder": _encoder, "conv3d": _conv3d}


# ------------------------------------------------------------------------------------ a run

@torch.no_grad()
def accuracy(model: nn.Module, clips: Tensor, labels: Tensor) -> float:
    model.eval()
    hits = sum(int((model(c).argmax(1) == y).sum()) for c, y in zip(clips.split(128),
                                                                  labels.split(128), strict=True))
    model.train()
    return hits / len(labels)


def run_arm(arm: str, seed: int, settings: Settings) -> dict[str, Any]:
    """Train one arm from ``seed``; its validation curve, when it learned and its final accuracy."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    model, info = ARMS[arm](settings, seed)
    setup = time.perf_counter() - start
    codebook = settings.model_config().codebook_size
    val = direction_clips(settings.val_clips, settings.grid, codebook,
                          torch.Generator().manual_seed(1_000_000))
    draw = clip_stream(settings, seed, torch.Generator().manual_seed(seed))
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.01)
    curve: list[list[float]] = [[0, accuracy(model, *val)]]
    model.train()
    for step in range(1, settings.steps + 1):
        clips, labels = draw()
        loss = F.cross_entropy(model(clips), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % settings.eval_every == 0 or step == settings.steps:
            curve.append([step, accuracy(model, *val)])
            print(f"{arm} seed {seed}: update {step}/{settings.steps}, validation accuracy "
                  f"{curve[-1][1]:.3f}", file=sys.stderr, flush=True)
    learned = next((int(s) for s, a in curve if a >= settings.learned_at), None)
    return {"arm": arm, "seed": seed, "final_acc": curve[-1][1], "learned_at": learned,
            "curve": curve, "setup_seconds": setup,
            "seconds": time.perf_counter() - start, **info}


def fisher_one_sided(hits: int, n: int, base_hits: int, base_n: int) -> float:
    """Fisher's exact test, one-sided: the chance of ``hits`` or more of ``n`` seeds learning
    when the ``hits + base_hits`` seeds that learned fell at random between the two arms."""
    total, learned = n + base_n, hits + base_hits
    return sum(math.comb(learned, k) * math.comb(total - learned, n - k)
               for k in range(hits, min(n, learned) + 1)) / math.comb(total, n)


def summarise(rows: list[dict[str, Any]], arms: list[str]) -> dict[str, Any]:
    """Per arm: mean final accuracy over seeds with its interval, which seeds learned and, beside
    ``scratch``, the one-sided Fisher exact p of learning more often than ``scratch``."""
    out: dict[str, Any] = {}
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm]
        if mine:
            learned = [r["learned_at"] for r in mine if r["learned_at"] is not None]
            out[arm] = {"final_acc": mean_interval([r["final_acc"] for r in mine]),
                        "seeds": len(mine), "learned": len(learned),
                        "learned_at": learned}
    if "scratch" in out:
        base = out["scratch"]
        for arm, entry in out.items():
            if arm != "scratch":
                entry["learned_vs_scratch_p"] = fisher_one_sided(
                    entry["learned"], entry["seeds"], base["learned"], base["seeds"])
    return out


def table(summary: dict[str, Any], settings: Settings) -> list[str]:
    lines = [f"final validation accuracy after {settings.steps} updates, % (mean of seeds "
             f"[95 % t-interval]); seeds reaching {settings.learned_at:.0%} and at which update; "
             f"chance 50 %",
             "", "| arm | final accuracy | learned the rule | learns more often than scratch: "
             "one-sided Fisher p |", "|---|---|---|---|"]
    for arm, s in summary.items():
        when = ", ".join(str(x) for x in s["learned_at"]) or "-"
        p = s.get("learned_vs_scratch_p")
        lines.append(f"| {arm} | {interval_text(s['final_acc'])} | {s['learned']} of "
                     f"{s['seeds']} (at {when}) | {'-' if p is None else f'{p:.3f}'} |")
    return lines


RUN_KEYS = ("arm", "seed", "final_acc", "learned_at", "curve")


def read_result(path: Path) -> dict[str, Any]:
    """A result file of this benchmark whose runs all have :data:`RUN_KEYS`; anything else is a
    SystemExit naming the file."""
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("benchmark") != "arrow_of_time" \
                or not isinstance(data.get("runs"), list):
            raise ValueError("no arrow_of_time runs")
        for run in data["runs"]:
            missing = [k for k in RUN_KEYS if not isinstance(run, dict) or k not in run]
            if missing:
                raise ValueError(f"a run without {missing[0]!r}")
        known = dataclasses.asdict(Settings())
        settings = data.get("settings")
        unknown = [k for k in settings if k not in known] if isinstance(settings, dict) else []
        if not isinstance(settings, dict) or unknown:
            raise ValueError(f"settings {unknown[0]!r} unknown" if unknown else "no settings")
    except (OSError, ValueError) as exc:
        raise SystemExit(f"{path}: not an arrow_of_time result ({exc})") from None
    data["settings"] = {**known, **settings}  # files from before a setting existed: its default
    return data


def combine(paths: list[Path], out: Path) -> dict[str, Any]:
    """One result from finished files of this benchmark with the same settings, each (arm, seed)
    once; a file that is not one is a SystemExit naming it."""
    rows: list[dict[str, Any]] = []
    settings: dict[str, Any] | None = None
    machines: list[Any] = []
    for path in paths:
        data = read_result(path)
        if not data.get("complete"):
            raise SystemExit(f"{path}: the run that wrote it has not finished")
        if settings is not None and data["settings"] != settings:
            raise SystemExit(f"{path}: other settings than {paths[0]}")
        settings = data["settings"]
        machines.extend(data["machines"] if isinstance(data.get("machines"), list)
                        else [data.get("machine")])
        rows.extend(data["runs"])
    keys = [(r["arm"], r["seed"]) for r in rows]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise SystemExit(f"(arm, seed) {twice[0]} is in more than one file")
    arms = [a for a in ARMS if any(r["arm"] == a for r in rows)]
    result = {"benchmark": "arrow_of_time", "combined": [str(p) for p in paths],
              "settings": settings, "machines": machines, "complete": True,
              "seeds": sorted({r["seed"] for r in rows}), "arms": arms, "runs": rows,
              "summary": summarise(rows, arms)}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", type=csv_list, default=list(ARMS))
    p.add_argument("--seeds", type=lambda t: [int(x) for x in csv_list(t)], default=[0, 1, 2])
    for f in dataclasses.fields(Settings):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    p.add_argument("--out", type=Path, default=Path("bench-out/arrow-of-time.json"))
    p.add_argument("--combine", type=Path, nargs="+", metavar="JSON",
                   help="join finished result files into --out instead of running")
    args = p.parse_args(argv)
    if args.combine:
        result = combine(args.combine, args.out)
        print("\n".join(table(result["summary"], Settings(**result["settings"]))))
        return 0
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown or args.preset not in PRESETS:
        p.error(f"unknown arm(s) {unknown} or preset {args.preset!r}; arms: {', '.join(ARMS)}")
    if args.train_clips < 0:
        p.error(f"--train-clips {args.train_clips}: 0 (fresh clips) or a number of clips")
    settings = Settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)})
    rows = finished_runs(args.out, settings)
    for seed in args.seeds:
        for arm in args.arms:
            if any((r["arm"], r["seed"]) == (arm, seed) for r in rows):
                continue
            rows.append(run_arm(arm, seed, settings))
            r = rows[-1]
            print(f"{arm} seed {seed}: final {r['final_acc']:.3f}, learned at "
                  f"{r['learned_at']}, {r['seconds']:.0f} s", flush=True)
            write_result(args.out, settings, args.seeds, args.arms, rows)
    result = write_result(args.out, settings, args.seeds, args.arms, rows)
    print("\n".join(table(result["summary"], settings)))
    return 0


def write_result(out: Path, settings: Settings, seeds: list[int], arms: list[str],
                 rows: list[dict[str, Any]]) -> dict[str, Any]:
    done = {(r["arm"], r["seed"]) for r in rows}
    result = {"benchmark": "arrow_of_time", "settings": dataclasses.asdict(settings),
              "seeds": seeds, "arms": arms, "machine": machine(),
              "complete": all((a, s) in done for a in arms for s in seeds), "runs": rows,
              "summary": summarise(rows, arms)}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    return result


def finished_runs(out: Path, settings: Settings) -> list[dict[str, Any]]:
    """The runs an interrupted command with these settings left in ``out`` (none when it does
    not exist); a file that is not such a result, or has other settings, is a SystemExit naming
    it rather than something to overwrite."""
    if not out.exists():
        return []
    data = read_result(out)
    if data["settings"] != dataclasses.asdict(settings):
        raise SystemExit(f"{out}: written with other settings; remove it or pick another --out")
    if data["runs"]:
        print(f"{out}: continuing, {len(data['runs'])} finished run(s) kept", file=sys.stderr)
    return data["runs"]


if __name__ == "__main__":
    run_main(main)
