"""Multi-view evaluation of a fine-tuned model and frozen-feature probes (paper Sec. 4.1, App. C.1).

- :func:`run_evaluate`: every video is classified on ``test_clips x len(test_crops)`` views
  (uniform temporal clips including the first and last; scale-1 top-left / centre / bottom-right
  crops, centre only for SSV2); the **softmax probabilities are averaged** over the views, then the
  argmax is taken (App. C.1). Writes ``results.json`` (top-1, top-5, per-class accuracy, confusion
  matrix, per-video correctness, and which model was evaluated: ``final`` or ``best``, how it was
  chosen, its update and validation top-1) and ``confusion.png``. :func:`mean_over_splits`
  averages the three UCF101 / HMDB51 splits (Table 1 protocol).
- Probes of frozen CLS features (one centre clip per video) of a pre-trained or fine-tuned
  backbone: :func:`knn_probe` is the paper's kNN monitor (L2-normalised features, the k nearest
  training videos vote with weight ``exp(sim / tau)``, k = 200, tau = 0.07); :func:`linear_probe`
  is a multinomial logistic regression on standardised features trained full-batch with L-BFGS
  (the paper has no linear probe; this one is ours). :func:`run_probes` writes ``probes.json``,
  which also holds the time-reversal diagnostic of the test clips
  (:mod:`vimpac.finetune.time_reversal`): how far the features move when a clip is played
  backwards, against two different clips, for the backbone and a random one of the same preset.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from vimpac.archive import Archive, ArchiveError
from vimpac.common.checkpoint import CheckpointError, load_checkpoint
from vimpac.common.fileio import atomic_write_json
from vimpac.common.progress import NULL_PROGRESS, Progress
from vimpac.common.training import autocast_context
from vimpac.finetune.config import EvaluateConfig
from vimpac.finetune.data import TestClips, clip_workers
from vimpac.finetune.time_reversal import run_time_reversal
from vimpac.finetune.train import FORMAT as FINETUNED_FORMAT
from vimpac.finetune.train import (
    check_tokenizer,
    frame_step,
    load_finetuned,
    resolve_splits,
    view_averaged_probs,
)
from vimpac.pretrain.export import FORMAT as PRETRAINED_FORMAT
from vimpac.pretrain.export import load_pretrained
from vimpac.pretrain.model import VimpacBackbone

log = logging.getLogger(__name__)

NAMED_AXES_MAX = 30  # class names on the confusion-matrix axes up to this many classes
COUNTS_MAX = 15  # counts written in the cells up to this many classes


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` = the first GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ---------------------------------------------------------------------------------------- metrics

def classification_metrics(probs: Tensor, labels: Tensor, classes: list[str]) -> dict[str, Any]:
    """probs [N, C] (view-averaged), labels [N] -> top-1, top-5, per-class accuracy, confusion,
    and ``correct``: 1/0 per video in dataset order (for paired comparisons of two models)."""
    num = len(classes)
    pred = probs.argmax(-1)
    top5 = probs.topk(min(5, num), dim=-1).indices  # [N, k]
    confusion = torch.zeros(num, num, dtype=torch.long)
    confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    totals = confusion.sum(1)
    per_class = {name: (float(confusion[c, c] / totals[c]) if totals[c] else None)
                 for c, name in enumerate(classes)}
    present = [v for v in per_class.values() if v is not None]
    n = max(len(labels), 1)
    return {"videos": len(labels),
            "top1": float((pred == labels).sum()) / n,
            "top5": float((top5 == labels[:, None]).any(-1).sum()) / n,
            "mean_class_accuracy": sum(present) / len(present) if present else 0.0,
            "per_class": per_class,
            "confusion": confusion.tolist(),
            "correct": (pred == labels).int().tolist()}


def plot_confusion(confusion: list[list[int]], classes: list[str], path: str | Path,
                   title: str = "") -> None:
    """Row-normalised confusion matrix as a PNG (Agg canvas; no pyplot global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = torch.tensor(confusion, dtype=torch.float64)
    rates = counts / counts.sum(1, keepdim=True).clamp(min=1)
    num = len(classes)
    side = min(4 + 0.35 * num, 30)
    fig = Figure(figsize=(side, side))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if num <= NAMED_AXES_MAX:
        ax.set_xticks(range(num), classes, rotation=90)
        ax.set_yticks(range(num), classes)
    if num <= COUNTS_MAX:
        for (i, j), value in zip(((i, j) for i in range(num) for j in range(num)),
                                 counts.flatten().tolist(), strict=True):
            if value:
                ax.text(j, i, f"{int(value)}", ha="center", va="center",
                        color="white" if rates[i, j] > 0.5 else "black", fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)


def mean_over_splits(results_list: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean top-1 / top-5 over splits (UCF101 / HMDB51 report the mean of splits 1-3)."""
    if not results_list:
        raise ValueError("mean_over_splits: no results to average")
    out: dict[str, Any] = {"splits": [r.get("split") for r in results_list]}
    for key in ("top1", "top5", "mean_class_accuracy"):
        values = [float(r[key]) for r in results_list]
        mean = sum(values) / len(values)
        out[key] = mean
        out[f"{key}_per_split"] = values
        out[f"{key}_std"] = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return out


# ------------------------------------------------------------------------------------- evaluation

def chosen_model(meta: dict[str, Any]) -> dict[str, Any]:
    """Which model a fine-tuned file holds and how it was chosen (files written before this was
    recorded say ``unknown``)."""
    return {"checkpoint_kind": meta.get("checkpoint", "unknown"),
            "selection": meta.get("selection", "unknown"), "step": meta.get("step"),
            "val_top1": meta.get("val_top1"),
            "validation": meta.get("validation", {}).get("split")}


def check_classes(archive: Archive, classes: list[str], checkpoint: str | Path) -> None:
    have = list((archive.settings.dataset or {}).get("classes", []))
    if have != list(classes):
        raise ArchiveError(f"{archive.root}: classes ({len(have)}) differ from those {checkpoint} "
                           f"was fine-tuned on ({len(classes)}): evaluate on the same dataset")


def run_evaluate(archive_path: str | Path, checkpoint: str | Path, cfg: EvaluateConfig,
                 out_dir: str | Path, *, split_tag: str | None = None, batch_size: int = 8,
                 num_workers: int = 0, device: str = "auto",
                 progress: Progress = NULL_PROGRESS) -> dict[str, Any]:
    """Multi-view test of a fine-tuned ``best.pt`` / ``final.pt`` on ``split_tag`` (default: the
    evaluation split it was fine-tuned against). Writes ``results.json`` and ``confusion.png``.
    ``batch_size`` counts videos (each brings ``test_clips x len(test_crops)`` clips)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, meta = load_finetuned(checkpoint)
    archive = Archive(archive_path)
    check_tokenizer(meta, archive.settings, str(checkpoint), archive.root)
    check_classes(archive, meta["classes"], checkpoint)
    tag = split_tag or meta["eval_split"]
    fps = meta["finetune_config"]["fps"]
    conf = model.config
    data = TestClips(archive, tag, conf.frames, conf.height, cfg.test_clips, cfg.test_crops,
                     conf.pad_id, frame_step(archive.settings.fps, fps, archive.root))
    dev = pick_device(device)
    loader = DataLoader(data, batch_size=batch_size, num_workers=num_workers,
                        **clip_workers(data.archive, num_workers),
                        generator=torch.Generator().manual_seed(0))
    probs, labels = view_averaged_probs(model.to(dev), loader, dev, progress=progress)
    results = {"checkpoint": str(checkpoint), **chosen_model(meta),
               "archive": str(archive.root), "split": tag,
               "keys": [e.key for e in data.entries], "test_clips": cfg.test_clips,
               "test_crops": list(cfg.test_crops),
               "views": data.views, "views_per_video": cfg.test_clips * len(cfg.test_crops),
               **classification_metrics(probs, labels, meta["classes"])}
    plot_confusion(results["confusion"], meta["classes"], out / "confusion.png",
                   title=f"{meta.get('dataset', '')} {tag}: top-1 {results['top1']:.3f}")
    results["confusion_png"] = str(out / "confusion.png")
    atomic_write_json(out / "results.json", results)
    log.info("%s (%s model, update %s) on %s (%d videos, %d views each): top-1 %.4f, top-5 %.4f",
             checkpoint, results["checkpoint_kind"], results["step"], tag, results["videos"],
             results["views_per_video"], results["top1"], results["top5"])
    return results


# ----------------------------------------------------------------------------------------- probes

def knn_probe(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor,
              k: int = 200, temperature: float = 0.07, num_classes: int | None = None,
              chunk: int = 1024) -> float:
    """Weighted kNN top-1 (the paper's monitor): cosine similarity to the k nearest training
    features, each voting ``exp(sim / temperature)`` for its class. feats [N, D], labels [N]."""
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, len(train))
    correct = 0
    for start in range(0, len(test), chunk):
        sim = test[start:start + chunk] @ train.T  # [n, N]
        top, idx = sim.topk(k, dim=1)  # [n, k]
        votes = torch.zeros(len(sim), classes).scatter_add_(
            1, train_labels[idx], (top / temperature).exp())  # [n, classes]
        correct += int((votes.argmax(1) == test_labels[start:start + chunk]).sum())
    return correct / max(len(test), 1)


def linear_probe(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor,
                 test_labels: Tensor, steps: int = 100, weight_decay: float = 1e-4,
                 num_classes: int | None = None) -> float:
    """Top-1 of a logistic regression on frozen, standardised features (full-batch L-BFGS,
    ``steps`` iterations, L2 penalty ``weight_decay``). feats [N, D], labels [N]."""
    mean, std = train_feats.float().mean(0), train_feats.float().std(0).clamp(min=1e-6)
    x, x_test = (train_feats.float() - mean) / std, (test_feats.float() - mean) / std
    classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    linear = nn.Linear(x.shape[1], classes)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    opt = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=max(steps, 1),
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        penalty = weight_decay * linear.weight.square().sum()
        loss = F.cross_entropy(linear(x), train_labels) + penalty
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return float((linear(x_test).argmax(1) == test_labels).float().mean())


@torch.no_grad()
def extract_features(backbone: VimpacBackbone, data: TestClips, device: torch.device,
                     batch_size: int = 16, num_workers: int = 0,
                     progress: Progress = NULL_PROGRESS) -> tuple[Tensor, Tensor]:
    """CLS features of every video, averaged over its views: [N, D], labels [N]."""
    backbone.eval().to(device)
    loader = DataLoader(data, batch_size=batch_size, num_workers=num_workers,
                        **clip_workers(data.archive, num_workers),
                        generator=torch.Generator().manual_seed(0))
    task = progress.task("features", len(data), "video")
    feats, labels = [], []
    for tokens, label in loader:  # [B, V, T, G, G]
        b, v = tokens.shape[:2]
        with autocast_context("auto", device):
            cls, _ = backbone(tokens.flatten(0, 1).to(device))  # [B*V, D]
        feats.append(cls.float().view(b, v, -1).mean(1).cpu())
        labels.append(label)
        task.advance(b)
    task.close()
    return torch.cat(feats), torch.cat(labels)


def load_any_backbone(path: str | Path) -> tuple[VimpacBackbone, dict[str, Any]]:
    """The backbone of a ``pretrained.pt`` or of a fine-tuned ``best.pt`` / ``final.pt``."""
    fmt = load_checkpoint(path).get("format")
    if fmt == PRETRAINED_FORMAT:
        return load_pretrained(path)
    if fmt == FINETUNED_FORMAT:
        model, meta = load_finetuned(path)
        return model.backbone, meta
    raise CheckpointError(f"{path}: neither a pre-trained backbone ({PRETRAINED_FORMAT}) nor a "
                          f"fine-tuned model ({FINETUNED_FORMAT})")


def run_probes(archive_path: str | Path, checkpoint: str | Path, cfg: EvaluateConfig,
               out_dir: str | Path, *, splits: tuple[str, str] | None = None,
               frames: int | None = None, grid: int | None = None, fps: float | None = None,
               batch_size: int = 16, device: str = "auto",
               progress: Progress = NULL_PROGRESS) -> dict[str, Any]:
    """kNN and linear probes of frozen CLS features, and the time-reversal diagnostic on the test
    split's clips (section ``time_reversal``); writes ``probes.json``.

    Features come from one centre clip per video. ``frames`` / ``grid`` default to the backbone's
    own (pre-training) input and are interpolated otherwise; ``fps`` defaults to the fine-tuning
    rate for a fine-tuned model and to the archive's rate for a pre-trained one. ``splits`` =
    (train tag, test tag), default the dataset's standard split 1 (or the fine-tuning splits).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backbone, meta = load_any_backbone(checkpoint)
    archive = Archive(archive_path)
    check_tokenizer(meta, archive.settings, str(checkpoint), archive.root)
    frames, grid = frames or backbone.config.frames, grid or backbone.config.height
    backbone.interpolate_positions(frames, grid, grid)
    fps = fps or meta.get("finetune_config", {}).get("fps") or archive.settings.fps
    step = frame_step(archive.settings.fps, fps, archive.root)
    if splits is None:
        splits = ((meta["train_split"], meta["eval_split"]) if "train_split" in meta
                  else resolve_splits(archive.settings, "1", archive.root))
    dev = pick_device(device)
    feats, clips = {}, {}
    for tag in splits:
        clips[tag] = TestClips(archive, tag, frames, grid, 1, ["center"], backbone.config.pad_id,
                               step)
        feats[tag] = extract_features(backbone, clips[tag], dev, batch_size, progress=progress)
    (x, y), (x_test, y_test) = feats[splits[0]], feats[splits[1]]
    num_classes = len(archive.settings.dataset["classes"])
    results = {"checkpoint": str(checkpoint), "archive": str(archive.root),
               "train_split": splits[0], "test_split": splits[1], "train_videos": len(y),
               "test_videos": len(y_test), "feature_dim": int(x.shape[1]),
               "frames": frames, "grid": grid, "knn_k": cfg.knn_k,
               "knn_temperature": cfg.knn_temperature,
               "knn_top1": knn_probe(x, y, x_test, y_test, cfg.knn_k, cfg.knn_temperature,
                                     num_classes)}
    if cfg.linear_probe_epochs > 0:
        results["linear_probe_steps"] = cfg.linear_probe_epochs
        results["linear_top1"] = linear_probe(x, y, x_test, y_test, cfg.linear_probe_epochs,
                                              num_classes=num_classes)
    kind = "pre-trained" if meta.get("format") == PRETRAINED_FORMAT else "fine-tuned"
    results["time_reversal"] = run_time_reversal(backbone, clips[splits[1]], dev, kind=kind,
                                                 batch_size=batch_size, progress=progress)
    atomic_write_json(out / "probes.json", results)
    log.info("probes of %s: kNN top-1 %.4f%s", checkpoint, results["knn_top1"],
             f", linear top-1 {results['linear_top1']:.4f}" if "linear_top1" in results else "")
    return results

