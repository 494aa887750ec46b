"""Train our per-frame VQ-VAE tokenizer on frames sampled from videos.

The story (:func:`train_tokenizer`): sample frames (train / held-out videos), build the model,
resume from the newest ``checkpoints/step-*.pt`` if present, else seed the codebook by k-means on
encoder outputs; then loop over steps (reconstruction MSE + commitment loss, EMA codebook,
dead-code restarts), checkpointing atomically every ``checkpoint_every`` steps; finally save the
tokenizer, evaluate it on held-out frames (PSNR, perplexity, code usage) and draw originals over
reconstructions.

All randomness comes from one ``torch.Generator`` seeded by ``spec.seed`` and saved in the
checkpoint, so on CPU a resumed run ends with exactly the weights of an uninterrupted one.
Checkpoints go through :class:`vimpac.common.checkpoint.Checkpointer`, like the other trainers': a
resume with a changed spec field is refused naming it, except the volatile ones (``steps``,
``checkpoint_every``, ``eval_batch_size``, ``num_threads``), whose change is logged.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vimpac.common.checkpoint import Checkpointer
from vimpac.common.fileio import atomic_write_json
from vimpac.common.progress import NULL_PROGRESS, Progress
from vimpac.common.video import DecodeSpec, VideoError, decode_video
from vimpac.tokenize.tokenizer import encode_frames, save_tokenizer
from vimpac.tokenize.vqvae import VQConfig, VQTokenizer, eval_mode

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
TOKENIZER_DIR = "tokenizer"
METRICS_FILE = "metrics.json"
RECONSTRUCTIONS_FILE = "reconstructions.png"


@dataclass
class TokenizerTrainSpec:
    """Everything :func:`train_tokenizer` needs; defaults are the ``tiny`` CPU demo."""

    codebook_size: int = 1024  # number of codes K (<= 65535)
    channels: int = 32  # base conv width of encoder and decoder
    code_dim: int = 32  # codebook vector dimension
    normalize_codes: bool = True  # l2-normalised (cosine) code lookup
    commitment: float = 0.25  # commitment loss weight beta
    ema_decay: float = 0.99  # EMA decay of codebook statistics
    image_size: int = 64  # frames are decoded to size x size (shorter side, centre crop)
    fps: float = 4.0  # frame sampling rate when decoding videos (paper tokens: 2)
    frames_per_video: int = 64  # at most this many frames per video (evenly spaced)
    holdout: float = 0.1  # fraction of videos held out for evaluation (at least one video)
    # optimizer steps in total (volatile: a resumed run may continue to more)
    steps: int = field(default=1000, metadata={"volatile": True})
    batch_size: int = 16  # frames per step
    lr: float = 2e-3  # peak Adam learning rate (linear warm-up, cosine decay to 10%)
    warmup_steps: int = 20  # linear learning-rate warm-up
    init_frames: int = 256  # frames whose encoder outputs seed the codebook (k-means)
    kmeans_iters: int = 10  # Lloyd iterations of the k-means initialisation
    dead_code_steps: int = 50  # a code unused for this many steps is re-seeded
    hflip: bool = True  # random horizontal flips of training frames
    # steps between atomic checkpoints (0: only at the end)
    checkpoint_every: int = field(default=200, metadata={"volatile": True})
    eval_batch_size: int = field(default=64, metadata={"volatile": True})  # frames per batch
    # torch.set_num_threads for training (0: leave torch's setting)
    num_threads: int = field(default=0, metadata={"volatile": True})
    seed: int = 0  # seeds model init, batch order, flips, k-means and code restarts

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "frames_per_video", "init_frames", "dead_code_steps",
                    "eval_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"TokenizerTrainSpec.{key}={getattr(self, key)}: must be >= 1")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"TokenizerTrainSpec.holdout={self.holdout}: must be in [0, 1)")
        if self.fps <= 0 or self.lr <= 0:
            raise ValueError(f"TokenizerTrainSpec fps={self.fps}, lr={self.lr}: must be > 0")
        self.model_config()  # validates codebook_size, channels, image_size ...

    def model_config(self) -> VQConfig:
        return VQConfig(kind="vqvae", codebook_size=self.codebook_size, channels=self.channels,
                        code_dim=self.code_dim, normalize_codes=self.normalize_codes,
                        commitment=self.commitment, ema_decay=self.ema_decay,
                        image_size=self.image_size)


TOKENIZER_PRESETS: dict[str, TokenizerTrainSpec] = {
    "tiny": TokenizerTrainSpec(),
    "base": TokenizerTrainSpec(codebook_size=8192, channels=128, image_size=128, fps=2.0,
                               steps=20000, batch_size=64, lr=1e-3, frames_per_video=256,
                               init_frames=4096, dead_code_steps=100, checkpoint_every=1000),
}

# --------------------------------------------------------------------------- frames


def sample_frames(video_paths: list[str], spec: TokenizerTrainSpec, *,
                  progress: Progress = NULL_PROGRESS) -> tuple[np.ndarray, np.ndarray]:
    """Decode videos into (train, held-out) uint8 frames [N,S,S,3], S = spec.image_size.

    Held-out frames come from whole videos (a seeded choice of ``holdout`` of them, at least one
    when there are two or more and holdout > 0); with a single video its last frames are held out.
    Files that fail to decode (VideoError) are logged and skipped.
    """
    decode_spec = DecodeSpec(fps=spec.fps, shorter_side=spec.image_size, size=spec.image_size,
                             crop="center", hflip=False)
    per_video: list[np.ndarray] = []
    task = progress.task("decode frames", total=len(video_paths), unit="video")
    for path in video_paths:
        try:
            frames = decode_video(path, decode_spec)
        except VideoError as exc:
            log.warning("skipping video: %s", exc)
            frames = np.zeros((0, spec.image_size, spec.image_size, 3), np.uint8)
        per_video.append(_evenly_spaced(frames, spec.frames_per_video))
        task.advance(1, frames=len(per_video[-1]))
    task.close()
    return split_holdout(per_video, spec.holdout, spec.seed, source=video_paths)


def _evenly_spaced(frames: np.ndarray, limit: int) -> np.ndarray:
    if len(frames) <= limit:
        return frames
    return frames[np.linspace(0, len(frames) - 1, limit).round().astype(int)]


def split_holdout(per_video: list[np.ndarray], holdout: float, seed: int,
                  source: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Split per-video frame arrays into (train, held-out) [N,H,W,3] by whole videos."""
    usable = [i for i, f in enumerate(per_video) if len(f)]
    if not usable:
        raise ValueError(f"no frames could be decoded from {source or 'the given videos'}")
    shape = per_video[usable[0]].shape[1:]
    empty = np.zeros((0, *shape), np.uint8)
    if holdout <= 0:
        return np.concatenate([per_video[i] for i in usable]), empty
    if len(usable) == 1:
        frames = per_video[usable[0]]
        cut = len(frames) - max(1, round(holdout * len(frames)))
        if cut < 1:
            raise ValueError(f"{source}: one video with {len(frames)} frame(s) cannot be split "
                             "into train and held-out frames")
        return frames[:cut], frames[cut:]
    n_hold = min(len(usable) - 1, max(1, round(holdout * len(usable))))
    order = np.random.default_rng(seed).permutation(len(usable))
    held = {usable[i] for i in order[:n_hold]}
    train = np.concatenate([per_video[i] for i in usable if i not in held])
    return train, np.concatenate([per_video[i] for i in usable if i in held])


def to_model_input(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [N,H,W,3] -> float32 [N,3,H,W] in [-1,1] (the VQ-VAE's input space)."""
    return frames.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def sample_batch(frames: torch.Tensor, spec: TokenizerTrainSpec,
                 generator: torch.Generator) -> torch.Tensor:
    """Random batch (with replacement) of [B,3,S,S] inputs, randomly h-flipped if spec.hflip."""
    idx = torch.randint(len(frames), (spec.batch_size,), generator=generator)
    x = to_model_input(frames[idx]).contiguous(memory_format=torch.channels_last)
    if spec.hflip:
        flip = torch.rand(spec.batch_size, generator=generator) < 0.5
        x[flip] = x[flip].flip(-1)
    return x


# --------------------------------------------------------------------------- training state


class TrainState:
    """Model, optimizer, RNG and step: everything a checkpoint restores."""

    def __init__(self, spec: TokenizerTrainSpec) -> None:
        self.spec = spec
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            self.model = VQTokenizer(spec.model_config())
        # channels_last: about 2x faster conv training on CPU (and the layout cuDNN prefers)
        self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=spec.lr)
        self.generator = torch.Generator().manual_seed(spec.seed)
        self.step = 0
        self.losses: list[float] = []  # reconstruction MSE per step
        self.restarted = 0  # dead codes re-seeded so far

    def parts(self) -> dict[str, Any]:
        """What a checkpoint holds state dicts of."""
        return {"model": self.model, "optimizer": self.optimizer,
                "generator": _GeneratorState(self.generator)}

    def save(self, ckpt: Checkpointer) -> None:
        ckpt.save(self.step, self.parts(), {"losses": self.losses, "restarted": self.restarted})

    def resume(self, ckpt: Checkpointer) -> bool:
        resumed = ckpt.resume(self.parts())
        if resumed is None:
            return False
        self.step, self.losses = resumed.step, [float(x) for x in resumed.state["losses"]]
        self.restarted = int(resumed.state["restarted"])
        return True


class _GeneratorState:
    """A torch.Generator seen as a checkpoint part."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def state_dict(self) -> torch.Tensor:
        return self.generator.get_state()

    def load_state_dict(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


# --------------------------------------------------------------------------- steps


def lr_at(step: int, spec: TokenizerTrainSpec) -> float:
    """Linear warm-up to spec.lr, then cosine decay to 10% of it at spec.steps."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    progress = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def init_codebook(state: TrainState, frames: torch.Tensor) -> None:
    """Seed the codebook by k-means on encoder outputs of up to spec.init_frames random frames."""
    spec, model = state.spec, state.model
    assert model.quantizer is not None
    n = min(len(frames), spec.init_frames)
    idx = torch.randperm(len(frames), generator=state.generator)[:n]
    latents = [model.quantizer.flatten(model.encoder(to_model_input(frames[chunk])))
               for chunk in idx.split(spec.eval_batch_size)]
    model.quantizer.init_codebook(torch.cat(latents), state.generator, iters=spec.kmeans_iters)


def train_step(state: TrainState, x: torch.Tensor) -> float:
    """One optimizer step on a [B,3,S,S] batch; returns the reconstruction MSE."""
    model, spec = state.model, state.spec
    assert model.quantizer is not None
    for group in state.optimizer.param_groups:
        group["lr"] = lr_at(state.step, spec)
    recon, quant = model(x)
    recon_loss = F.mse_loss(recon, x)
    state.optimizer.zero_grad(set_to_none=True)
    (recon_loss + quant.commit_loss).backward()
    state.optimizer.step()
    state.restarted += model.quantizer.restart_dead_codes(quant.latents, state.generator,
                                                          spec.dead_code_steps)
    state.step += 1
    state.losses.append(recon_loss.detach().item())
    return state.losses[-1]


def train_loop(state: TrainState, frames: torch.Tensor, ckpt: Checkpointer,
               progress: Progress = NULL_PROGRESS) -> None:
    """Run steps state.step .. spec.steps, checkpointing every spec.checkpoint_every steps."""
    spec = state.spec
    state.model.train()
    task = progress.task("train tokenizer", total=spec.steps, unit="step")
    task.update(completed=state.step)
    while state.step < spec.steps:
        loss = train_step(state, sample_batch(frames, spec, state.generator))
        task.advance(1, loss=f"{loss:.4f}")
        if spec.checkpoint_every and state.step % spec.checkpoint_every == 0:
            state.save(ckpt)
            log.info("step %d: recon mse %.4f, codes restarted %d", state.step, loss,
                     state.restarted)
    task.close()
    state.save(ckpt)
    state.model.eval()


# --------------------------------------------------------------------------- evaluation


def psnr(original: np.ndarray, reconstruction: np.ndarray) -> float:
    """Mean over frames of per-frame PSNR (dB, peak 255) between uint8 [N,H,W,3] arrays."""
    diff = original.astype(np.float64) - reconstruction.astype(np.float64)
    mse = np.maximum((diff**2).reshape(len(diff), -1).mean(1), 1e-10)
    return float(np.mean(10 * np.log10(255.0**2 / mse)))


def code_statistics(ids: np.ndarray, codebook_size: int) -> dict[str, float]:
    """Perplexity exp(entropy) of the code histogram; fraction of codes used at least once."""
    counts = np.bincount(ids.reshape(-1).astype(np.int64), minlength=codebook_size)
    p = counts[counts > 0] / counts.sum()
    return {"perplexity": float(np.exp(-(p * np.log(p)).sum())),
            "code_usage": float((counts > 0).mean())}


def reconstruct(model: VQTokenizer, frames: np.ndarray, batch_size: int = 64
                ) -> tuple[np.ndarray, np.ndarray]:
    """uint8 frames [N,H,W,3] -> (uint16 ids [N,h,w], uint8 reconstructions [N,H,W,3])."""
    ids = encode_frames(model, frames, batch_size=batch_size)
    with eval_mode(model):
        recon = [model.decode(torch.from_numpy(chunk.astype(np.int64))).cpu().numpy()
                 for chunk in np.array_split(ids, max(1, math.ceil(len(ids) / batch_size)))]
    return ids, np.concatenate(recon)


def evaluate_tokenizer(model: VQTokenizer, frames: np.ndarray, batch_size: int = 64
                       ) -> dict[str, float]:
    """Held-out quality: ``psnr`` (dB), code ``perplexity`` and ``code_usage`` (fraction of K).

    Code usage is bounded by the number of tokens: it needs at least K tokens to reach 1.0.
    """
    if len(frames) == 0:
        raise ValueError("evaluate_tokenizer: no frames to evaluate on")
    ids, recon = reconstruct(model, frames, batch_size)
    return {"psnr": psnr(frames, recon), **code_statistics(ids, model.codebook_size),
            "num_frames": len(frames), "num_tokens": int(ids.size)}


def write_reconstructions(model: VQTokenizer, frames: np.ndarray, path: Path, count: int = 8,
                          scale: int = 2) -> None:
    """PNG grid: ``count`` evenly spaced originals (top row) above their reconstructions."""
    chosen = frames[np.linspace(0, len(frames) - 1, min(count, len(frames))).astype(int)]
    _, recon = reconstruct(model, chosen)
    grid = np.concatenate([np.concatenate(list(chosen), axis=1),
                           np.concatenate(list(recon), axis=1)], axis=0)
    image = Image.fromarray(grid)
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    image.save(tmp)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- the job


def train_tokenizer(video_paths: list[str], spec: TokenizerTrainSpec, out_dir: str | os.PathLike,
                    *, progress: Progress = NULL_PROGRESS) -> dict[str, Any]:
    """Train on frames of ``video_paths``; write tokenizer/, metrics.json, reconstructions.png.

    Resumes from ``out_dir/checkpoints`` when it holds a checkpoint. Returns the metrics dict.
    """
    train, held = sample_frames(video_paths, spec, progress=progress)
    return train_tokenizer_on_frames(train, held, spec, out_dir, progress=progress)


def train_tokenizer_on_frames(train: np.ndarray, held: np.ndarray, spec: TokenizerTrainSpec,
                              out_dir: str | os.PathLike, *,
                              progress: Progress = NULL_PROGRESS) -> dict[str, Any]:
    """:func:`train_tokenizer` on already decoded uint8 frames [N,S,S,3] (train, held-out)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if spec.num_threads:
        torch.set_num_threads(spec.num_threads)
    frames = torch.from_numpy(np.ascontiguousarray(train))
    state = TrainState(spec)
    ckpt = Checkpointer(out / CHECKPOINT_DIR, spec, keep=1)
    if state.resume(ckpt):
        log.info("resumed tokenizer training at step %d", state.step)
    else:
        init_codebook(state, frames)
    started = time.perf_counter()
    train_loop(state, frames, ckpt, progress)
    seconds = time.perf_counter() - started
    save_tokenizer(state.model, out / TOKENIZER_DIR)
    eval_frames = held if len(held) else train
    metrics = {**evaluate_tokenizer(state.model, eval_frames, spec.eval_batch_size),
               **_training_summary(state, seconds, len(train), len(held))}
    write_reconstructions(state.model, eval_frames, out / RECONSTRUCTIONS_FILE)
    atomic_write_json(out / METRICS_FILE, metrics)
    atomic_write_json(out / "train_spec.json", dataclasses.asdict(spec))   # resolved settings
    log.info("tokenizer: psnr %.2f dB, usage %.3f, perplexity %.1f", metrics["psnr"],
             metrics["code_usage"], metrics["perplexity"])
    return metrics


def _training_summary(state: TrainState, seconds: float, n_train: int, n_held: int
                      ) -> dict[str, Any]:
    losses = state.losses
    return {"evaluated_on": "held_out" if n_held else "train", "steps": state.step,
            "train_seconds_this_run": round(seconds, 2),
            "first_loss": float(np.mean(losses[:10])) if losses else None,
            "final_loss": float(np.mean(losses[-10:])) if losses else None,
            "codes_restarted": state.restarted, "num_train_frames": n_train,
            "num_heldout_frames": n_held, "codebook_size": state.spec.codebook_size,
            "fingerprint": state.model.fingerprint()}
