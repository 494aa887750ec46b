"""Pictures of what the tokens hold: source frames, VQ reconstructions, token maps, masks."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from vimpac.archive import Archive
from vimpac.common.video import DecodeSpec, VideoError, decode_video

log = logging.getLogger(__name__)


def _token_map_rgb(ids: np.ndarray, codebook: int) -> np.ndarray:
    """ids [h, w] -> a colour image [h, w, 3] uint8 (a fixed random colour per code)."""
    palette = np.random.default_rng(0).integers(0, 256, (codebook, 3), dtype=np.uint8)
    return palette[np.clip(ids.astype(np.int64), 0, codebook - 1)]


def _upsample(img: np.ndarray, factor: int) -> np.ndarray:
    return img.repeat(factor, axis=0).repeat(factor, axis=1)


def inspect_archive(archive_dir: str | Path, out_png: str | Path, *,
                    tokenizer_dir: str | Path | None = None, videos: int = 3,
                    frames: int = 4) -> Path:
    """Draw a few videos: re-decoded source frames, VQ reconstructions, token maps (rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archive = Archive(archive_dir)
    settings = archive.settings
    view = settings.views[0]
    model = None
    if tokenizer_dir is not None:
        from vimpac.tokenize.tokenizer import load_tokenizer

        model = load_tokenizer(tokenizer_dir)
        if model.fingerprint() != settings.tokenizer_fingerprint:
            raise ValueError(f"{tokenizer_dir}: tokenizer fingerprint differs from the one "
                             f"{archive_dir} was written with")
    entries = archive.entries[:videos]
    rows = 3 if model is not None and model.can_decode else 2
    fig, axes = plt.subplots(rows * len(entries), frames, squeeze=False,
                             figsize=(2.0 * frames, 2.1 * rows * len(entries)))
    # at the token frame rate: source[t] is the first frame token frame t was encoded from
    spec = DecodeSpec(fps=settings.fps, shorter_side=round(settings.shorter_side * view.scale),
                      size=settings.size, crop=view.crop, hflip=view.hflip)
    for i, entry in enumerate(entries):
        tokens = archive.read_video(entry.key, view.name)
        picks = np.linspace(0, len(tokens) - 1, num=min(frames, len(tokens))).round().astype(int)
        source = _decode_or_none(archive.records[entry.key].source, spec)
        recon = _reconstruct(model, tokens, picks) if rows == 3 else None
        for j in range(frames):
            for r in range(rows):
                axes[i * rows + r, j].axis("off")
            if j >= len(picks):
                continue
            t = picks[j]
            if source is not None and t < len(source):
                axes[i * rows, j].imshow(source[t])
            axes[i * rows, j].set_title(f"{entry.key} t={t}" if j == 0 else f"t={t}", fontsize=7)
            if recon is not None:
                axes[i * rows + 1, j].imshow(recon[j])
            axes[i * rows + rows - 1, j].imshow(
                _upsample(_token_map_rgb(tokens[t], settings.codebook_size),
                          settings.size // settings.grid[0]))
    labels = ["source", "VQ reconstruction", "token ids"] if rows == 3 else ["source", "token ids"]
    fig.suptitle("rows per video: " + " / ".join(labels), fontsize=9)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def _reconstruct(model: Any, tokens: np.ndarray, picks: np.ndarray) -> np.ndarray:
    """The first decoded frame of each picked token frame: uint8 [len(picks), S, S, 3]."""
    import torch

    with torch.no_grad():
        return np.stack([model.decode(torch.from_numpy(
            tokens[None, t:t + 1].astype(np.int64)))[0, 0].cpu().numpy() for t in picks])


def _decode_or_none(path: str, spec: DecodeSpec) -> np.ndarray | None:
    try:
        return decode_video(path, spec)
    except VideoError as exc:
        log.warning("cannot re-decode %s", exc)
        return None


def mask_overlay_png(frames: np.ndarray, mask: np.ndarray, out_png: str | Path,
                     title: str = "") -> Path:
    """Frames [T, S, S, 3] with a token mask [T, h, w] drawn over them in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = len(frames)
    factor = frames.shape[1] // mask.shape[1]
    fig, axes = plt.subplots(1, t, squeeze=False, figsize=(2.0 * t, 2.3))
    for i in range(t):
        img = frames[i].astype(np.float32) / 255.0
        m = _upsample(mask[i].astype(np.float32), factor)[..., None]
        tinted = img * (1 - 0.6 * m) + np.array([1.0, 0.1, 0.1]) * 0.6 * m
        axes[0, i].imshow(np.clip(tinted, 0, 1))
        axes[0, i].set_title(f"frame {i}: {mask[i].mean():.0%}", fontsize=8)
        axes[0, i].axis("off")
    fig.suptitle(title or f"token mask over a clip ({mask.mean():.1%} masked)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)
