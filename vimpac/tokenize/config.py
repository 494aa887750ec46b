"""The ``tokenizer`` and ``tokenize`` sections of a pipeline: the VQ-VAE, and the batch job."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from vimpac.archive import FORMATS
from vimpac.archive.formats import DEFAULT_FORMATS
from vimpac.common.config import Where, check_crops, check_scales, param


@dataclass
class TokenizerConfig:
    """The VQ-VAE: trained on your videos, imported from DALL-E, or loaded from a folder."""
    source: str = param("train", "train | dalle | path",
                        choices=("train", "dalle", "path"))
    path: str = param("", "DALL-E encoder.pkl (source=dalle) or tokenizer folder (source=path)")
    codebook_size: int = param(8192, "codes in the codebook (DALL-E: 8192); tokens store as uint16",
                               ge=2, le=65535)
    channels: int = param(128, "width of the conv encoder/decoder", ge=8, le=1024)
    image_size: int = param(128, "side of the square training frames in pixels", ge=16, le=1024)
    fps: float = param(2.0, "frame rate at which training frames are sampled", gt=0)
    frames_per_video: int = param(64, "frames sampled per video for training", ge=1)
    steps: int = param(20000, "training steps", ge=1)
    batch_size: int = param(64, "frames per training step", ge=1)
    lr: float = param(3e-4, "Adam learning rate", gt=0)
    holdout: float = param(0.1, "fraction of frames held out for PSNR / code usage", gt=0, le=0.5)
    checkpoint_every: int = param(500, "steps between resumable checkpoints", ge=1,
                                  volatile=True)
    seed: int = param(0, "training seed", ge=0)

    def train_spec(self) -> Any:
        """The VQ-VAE training spec these settings describe (the CLI and the pipeline's
        tokenizer stage both build it here)."""
        from vimpac.tokenize.train_tokenizer import TokenizerTrainSpec

        return TokenizerTrainSpec(codebook_size=self.codebook_size, channels=self.channels,
                                  image_size=self.image_size, fps=self.fps,
                                  frames_per_video=self.frames_per_video, steps=self.steps,
                                  batch_size=self.batch_size, lr=self.lr, holdout=self.holdout,
                                  checkpoint_every=self.checkpoint_every, seed=self.seed)


@dataclass
class TokenizeConfig:
    """Stage 1: decode videos and write sharded token archives."""
    fps: float = param(2.0, "token frames per second (paper: 2 for pre-training)", gt=0, le=120)
    shorter_side: int = param(128, "resize so the shorter side is this (paper: S=128, then 256)",
                              ge=8, le=4096)
    size: int = param(128, "square crop side in pixels; tokens per side = size / 8", ge=8, le=4096)
    scales: list[float] = param([1.0], "extra resize scales of shorter_side as views "
                                       "(paper fine-tuning: [1.0, 1.25])")
    crops: list[str] = param(["center"],
                             "crop views: top (top-left), center, bottom (bottom-right)")
    hflip: bool = param(False, "also store horizontally flipped views (never for SSV2)")
    formats: list[str] = param(list(DEFAULT_FORMATS), "archive formats to write: "
                               + ", ".join(FORMATS), choices=tuple(FORMATS))
    videos_per_shard: int = param(256, "videos per shard", ge=1)
    chunk_frames: int = param(1024, "token frames per inner chunk of chunked formats (each "
                                    "chunk costs ~0.3 ms to read: keep them large; a clip read "
                                    "decodes one chunk)", ge=1)
    zstd_level: int = param(3, "zstd compression level", ge=1, le=22)
    decode_workers: int = param(2, "concurrent ffmpeg decodes, each driven by a thread "
                                   "(0: decode inline)", ge=0, le=256, volatile=True)
    batch_frames: int = param(256, "frames per encoder batch", ge=1, volatile=True)
    decode_timeout_s: float = param(600.0, "per-video decode time limit in seconds", gt=0,
                                    volatile=True)
    device: str = param("auto", "encoder device: auto, cpu, cuda, cuda:N", volatile=True)

    def check(self, where: Where) -> None:
        """Rules across this section's fields."""
        if self.size > self.shorter_side:
            raise where.error("tokenize.size", self.size,
                              f"expected <= tokenize.shorter_side ({self.shorter_side})")
        if self.size % 8:
            raise where.error("tokenize.size", self.size,
                              "expected a multiple of 8 (8x8 pixel tokens)")
        check_crops(where, "tokenize.crops", self.crops)
        check_scales(where, "tokenize.scales", self.scales)
        if not self.formats:
            raise where.error("tokenize.formats", self.formats, "expected at least one format")

    def labelled(self, finetune: Any) -> TokenizeConfig:
        """These settings for a labelled archive: the fine-tuning section's frame rate and
        training views (every scale x crop x flip, paper App. C.1) replace this section's."""
        return dataclasses.replace(self, fps=finetune.fps, scales=list(finetune.view_scales),
                                   crops=list(finetune.view_crops), hflip=finetune.view_hflip)
