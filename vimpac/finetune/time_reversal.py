"""Time-reversal probe: how much does a backbone's feature move when its clip is played backwards?

A **diagnostic**, never a training target. For a backbone ``f`` and evaluation clips ``x`` it
measures the cosine distance ``1 - cos(f(x), f(reverse_time(x)))`` for two features, the CLS
feature and the mean of the token features, and sets it against the same distance between two
*different* clips (clip ``i`` against a partner chosen by a seeded cyclic pairing, so never
itself). The ratio reversal / between-clip says whether the arrow of time moves the feature a lot
(near 1: as much as swapping the video) or hardly at all (near 0: the feature barely sees the
order of the frames). The same numbers for a randomly initialised backbone of the same preset
(seeded) give the architecture's own sensitivity, so a reader sees what pre-training changed.

Reversing a token clip is flipping it along time. That is the tokenization of the reversed video
because vimpac's tokenizers encode every frame on its own (``FrameTokenizer``: temporal stride 1,
DALL-E's dVAE and the VQ-VAE alike): the token frames of the reversed frames are the reversed
token frames. A tokenizer that compresses time (an archive with ``temporal_stride`` > 1) breaks
that equivalence; the probe then still flips token frames and records ``exact: false``. Test clips
are right-padded with [PAD] when a video is shorter than the clip: only the real frames are
reversed and the padding stays at the end, as it would for the reversed video.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from vimpac.common.progress import NULL_PROGRESS, Progress
from vimpac.finetune.data import TestClips
from vimpac.pretrain.model import ModelConfig, VimpacBackbone, token_mean

log = logging.getLogger(__name__)

# tokens [B, T, H, W] -> {feature name: [B, D]}
FeatureFn = Callable[[Tensor], dict[str, Tensor]]

RANDOM_SEED = 0  # seed of the random backbone and of the between-clip pairing
FEATURES = {"cls": "CLS", "tokens": "mean of token features"}


def reverse_time(tokens: Tensor, pad_id: int | None = None) -> Tensor:
    """Token clips [B, T, H, W] with their frames in reverse order.

    With ``pad_id``, frames made only of [PAD] at the end of a clip (the right-padding of a short
    video) stay at the end and only the real frames are reversed; a clip equal to its own reverse
    (palindromic in time) comes back unchanged."""
    if pad_id is None:
        return tokens.flip(1)
    real = (tokens != pad_id).flatten(2).any(-1)  # [B, T]: the frame has a real token
    length = real.sum(1, keepdim=True)  # [B, 1]: real frames, padding trails them
    t = torch.arange(tokens.shape[1], device=tokens.device)[None]  # [1, T]
    index = torch.where(t < length, length - 1 - t, t)  # [B, T]
    return tokens.gather(1, index[:, :, None, None].expand_as(tokens))


def cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """``1 - cos`` of matching rows of a, b [N, D] -> [N] (float64: a floor far below 1e-6)."""
    return 1.0 - (F.normalize(a.double(), dim=1) * F.normalize(b.double(), dim=1)).sum(1)


def between_clip_partners(n: int, seed: int = RANDOM_SEED) -> Tensor:
    """[n] partner of every clip: a seeded cyclic order, each clip paired with the next one in it,
    so no clip is its own partner (n >= 2)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    partner = torch.empty(n, dtype=torch.long)
    partner[order] = order.roll(-1)
    return partner


def describe(values: Tensor) -> dict[str, float]:
    """mean, std, median and the 10 / 90 % quantiles of [N] values."""
    v = values.double()
    q10, q50, q90 = torch.quantile(v, torch.tensor([0.1, 0.5, 0.9], dtype=v.dtype)).tolist()
    return {"mean": float(v.mean()), "std": float(v.std()) if len(v) > 1 else 0.0,
            "median": q50, "q10": q10, "q90": q90}


def backbone_features(backbone: VimpacBackbone) -> FeatureFn:
    """The probe's feature function of a backbone: CLS [B, D] and the mean of the token features
    over the real (non-[PAD]) tokens [B, D]; fp32, eval mode, no gradients."""
    pad_id = backbone.config.pad_id

    @torch.no_grad()
    def features(tokens: Tensor) -> dict[str, Tensor]:
        cls, x = backbone(tokens)  # [B, D], [B, T, H, W, D]
        return {"cls": cls, "tokens": token_mean(tokens, x, pad_id)}

    return features


@torch.no_grad()
def clip_features(features: FeatureFn, batches: Iterable[Tensor],
                  pad_id: int | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Features of every clip and of its time reversal: ({name: [N, D]}, {name: [N, D]})."""
    forward: dict[str, list[Tensor]] = {}
    backward: dict[str, list[Tensor]] = {}
    for clips in batches:  # [B, T, H, W]
        for out, x in ((forward, clips), (backward, reverse_time(clips, pad_id))):
            for name, value in features(x).items():
                out.setdefault(name, []).append(value.float().cpu())
    return ({k: torch.cat(v) for k, v in forward.items()},
            {k: torch.cat(v) for k, v in backward.items()})


def reversal_summary(forward: dict[str, Tensor], backward: dict[str, Tensor],
                     seed: int = RANDOM_SEED) -> dict[str, dict[str, Any]]:
    """Per feature: the reversal distance, the between-clip distance and their ratio (of means;
    None when the clips are fewer than two or all alike)."""
    out = {}
    for name, feats in forward.items():
        rev = cosine_distance(feats, backward[name])
        entry: dict[str, Any] = {"reversal": describe(rev), "between_clips": None, "ratio": None}
        if len(feats) >= 2:
            between = cosine_distance(feats, feats[between_clip_partners(len(feats), seed)])
            entry["between_clips"] = describe(between)
            mean = entry["between_clips"]["mean"]
            entry["ratio"] = entry["reversal"]["mean"] / mean if mean > 0 else None
        out[name] = entry
    return out


def time_reversal_probe(features: FeatureFn, batches: Iterable[Tensor],
                        pad_id: int | None = None, seed: int = RANDOM_SEED) -> dict[str, Any]:
    """The probe of one feature function over token clips [B, T, H, W] (batches of different
    videos): ``{"clips": N, "features": {name: summary}}`` (:func:`reversal_summary`)."""
    forward, backward = clip_features(features, batches, pad_id)
    clips = len(next(iter(forward.values()))) if forward else 0
    return {"clips": clips, "features": reversal_summary(forward, backward, seed)}


def random_backbone(config: ModelConfig, seed: int = RANDOM_SEED) -> VimpacBackbone:
    """A freshly initialised backbone of ``config`` (same preset and grid), from ``seed`` alone:
    the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VimpacBackbone(config).eval()


def _clip_batches(data: TestClips, batch_size: int, device: torch.device,
                  progress: Progress, label: str) -> Iterator[Tensor]:
    """One clip per video of ``data`` (one view), in batches [B, T, G, G] on ``device``."""
    loader = DataLoader(data, batch_size=batch_size)
    task = progress.task(f"time reversal, {label}", len(data), "video")
    for tokens, _ in loader:  # [B, 1, T, G, G]
        yield tokens.flatten(0, 1).to(device)
        task.advance(len(tokens))
    task.close()


def run_time_reversal(backbone: VimpacBackbone, data: TestClips, device: torch.device, *,
                      kind: str, batch_size: int = 16, seed: int = RANDOM_SEED,
                      progress: Progress = NULL_PROGRESS) -> dict[str, Any]:
    """The probe of ``backbone`` (named ``kind``, e.g. ``pre-trained``) and of a random backbone
    of the same config (seeded) on the clips of ``data``: the ``time_reversal`` section of
    ``probes.json``."""
    exact = data.archive.settings.temporal_stride == 1
    if not exact:
        log.warning("time reversal: the archive's tokens span %d frames each in time, so flipping "
                    "token frames only approximates the reversed video",
                    data.archive.settings.temporal_stride)
    arms = {kind: backbone, "random init": random_backbone(backbone.config, seed)}
    section: dict[str, Any] = {
        "diagnostic": "1 - cos(f(x), f(x reversed in time)) against 1 - cos(f(x), f(y)) for a "
                      "different clip y; not a training target",
        "clips": len(data), "exact": exact, "random_seed": seed,
        "pairing": f"each clip against the next in a random cyclic order (seed {seed})",
        "features": FEATURES, "backbones": {}}
    for name, model in arms.items():
        model.eval().to(device)
        batches = _clip_batches(data, batch_size, device, progress, name)
        probe = time_reversal_probe(backbone_features(model), batches, model.config.pad_id, seed)
        section["backbones"][name] = probe["features"]
    for line in time_reversal_lines(section):
        log.info("%s", line)
    return section


def time_reversal_lines(section: dict[str, Any]) -> list[str]:
    """One line per backbone: reversal / between-clip distance (ratio) per feature."""
    lines = []
    for name, feats in section.get("backbones", {}).items():
        parts = []
        for feature, entry in feats.items():
            between = entry["between_clips"]["mean"] if entry["between_clips"] else float("nan")
            ratio = f"{entry['ratio']:.3g}" if entry["ratio"] is not None else "n/a"
            parts.append(f"{FEATURES.get(feature, feature)} {entry['reversal']['mean']:.3g} / "
                         f"{between:.3g} (ratio {ratio})")
        lines.append(f"time reversal, a diagnostic ({name}): 1 - cos, reversed / between "
                     "clips: " + "; ".join(parts))
    return lines
