"""The batch tokenize job: videos -> VQ tokens -> a sharded token archive (:mod:`vimpac.archive`).

Decoding runs in ffmpeg processes (:mod:`vimpac.tokenize.decode_pool`: one ffmpeg run per video
decodes all its views) while this process encodes clips of each video's consecutive frames, many
videos per batch (:class:`_Encoder`), so decode and encode overlap and a tokenizer may compress
time. Finished videos are written to shards in a fixed order (the worker's sorted video
list), so a resumed run produces the same shards, bitwise, as an uninterrupted one. Scale-out:
N independent workers each take the videos whose key hashes to their index and write their own
shards and manifest part; no coordination server is involved.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vimpac.archive import (
    ArchiveSettings,
    ArchiveWriter,
    ManifestPart,
    VideoRecord,
    View,
    make_views,
)
from vimpac.common.config import config_to_yaml
from vimpac.common.names import normalise_key
from vimpac.common.progress import NULL_PROGRESS, Progress
from vimpac.common.storage import location
from vimpac.common.video import DecodeSpec
from vimpac.data.inputs import Inputs, InputVideo, collect_inputs
from vimpac.tokenize.config import TokenizeConfig
from vimpac.tokenize.decode_pool import DecodePool, Message

log = logging.getLogger(__name__)

def worker_of(key: str, num_workers: int) -> int:
    """Which of ``num_workers`` workers owns a video: stable under appends and reruns."""
    digest = hashlib.sha1(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % num_workers


def worker_from_env() -> tuple[int, int]:
    """(rank, world size) from torchrun / Slurm array variables, else (0, 1)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if "SLURM_ARRAY_TASK_ID" in os.environ and "SLURM_ARRAY_TASK_COUNT" in os.environ:
        first = int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        return (int(os.environ["SLURM_ARRAY_TASK_ID"]) - first,
                int(os.environ["SLURM_ARRAY_TASK_COUNT"]))
    return 0, 1


# --------------------------------------------------------------------------------------------- job

@dataclass
class JobSummary:
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    frames: int = 0
    tokens: int = 0
    bytes: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)   # (path, reason)
    shards_written: int = 0
    nothing_to_do: bool = False

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


def decode_specs(cfg: TokenizeConfig, views: list[View], temporal_stride: int = 1
                 ) -> list[DecodeSpec]:
    """One decode per view. ``cfg.fps`` is the token frame rate: a tokenizer that takes
    ``temporal_stride`` frames per token frame gets frames decoded that many times faster."""
    return [DecodeSpec(fps=cfg.fps * temporal_stride,
                       shorter_side=round(cfg.shorter_side * v.scale), size=cfg.size,
                       crop=v.crop, hflip=v.hflip) for v in views]


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


_MAX_IN_FLIGHT = 64   # videos submitted but not yet written, while the encoder batch fills


class _Encoder:
    """Encodes the frames of many videos in large batches, in clips of one video's frames.

    Each (video, view) stream of frames is cut into clips of the tokenizer's ``clip_frames``
    consecutive frames; clips of many videos are encoded together, about ``batch_frames`` frames
    per call. A video's last, partial clip is padded by repeating its last frame (:meth:`end`);
    :meth:`take` then keeps ceil(frames / temporal stride) token frames, so padding never adds a
    token frame of its own, and returns the true frame count beside them.
    """

    def __init__(self, model: Any, batch_frames: int, device: str) -> None:
        self.model, self.device = model, device
        self.clip, self.stride_t = model.clip_frames, model.stride[0]
        self.batch_clips = max(1, batch_frames // self.clip)
        self.pending: list[tuple[int, int, np.ndarray]] = []    # (video, view, clips [n, L, ...])
        self.pending_clips = 0
        self.partial: dict[tuple[int, int], np.ndarray] = {}    # frames short of a whole clip
        self.received: dict[tuple[int, int], int] = {}          # frames in, per (video, view)
        self.out: dict[tuple[int, int], list[np.ndarray]] = {}

    @property
    def pending_frames(self) -> int:
        return self.pending_clips * self.clip

    def add(self, video: int, view: int, frames: np.ndarray) -> None:
        key = (video, view)
        self.received[key] = self.received.get(key, 0) + len(frames)
        if key in self.partial:
            frames = np.concatenate([self.partial.pop(key), frames])
        whole = len(frames) - len(frames) % self.clip
        if whole < len(frames):
            self.partial[key] = frames[whole:]
        if whole:
            self._queue(video, view, frames[:whole].reshape(-1, self.clip, *frames.shape[1:]))

    def end(self, video: int, views: int) -> None:
        """All frames of ``video`` are in: queue each view's partial clip, padded."""
        for view in range(views):
            rest = self.partial.pop((video, view), None)
            if rest is not None:
                pad = np.repeat(rest[-1:], self.clip - len(rest), axis=0)
                self._queue(video, view, np.concatenate([rest, pad])[None])

    def _queue(self, video: int, view: int, clips: np.ndarray) -> None:
        self.pending.append((video, view, clips))
        self.pending_clips += len(clips)
        if self.pending_clips >= self.batch_clips:
            self.flush()

    def flush(self) -> None:
        from vimpac.tokenize.tokenizer import encode_clips

        if not self.pending:
            return
        clips = np.concatenate([c for _, _, c in self.pending], axis=0)
        ids = encode_clips(self.model, clips, batch_size=self.batch_clips, device=self.device)
        start = 0
        for video, view, chunk in self.pending:
            tokens = ids[start:start + len(chunk)]                  # [n, L/t, h, w]
            self.out.setdefault((video, view), []).append(tokens.reshape(-1, *ids.shape[2:]))
            start += len(chunk)
        self.pending, self.pending_clips = [], 0

    def has_pending(self, video: int) -> bool:
        """Whether frames of ``video`` still wait for the encoder."""
        return any(p[0] == video for p in self.pending) or \
            any(key[0] == video for key in self.partial)

    def take(self, video: int, views: int) -> list[tuple[np.ndarray, int]]:
        """Per view: (uint16 tokens [ceil(frames / t), h, w], frames decoded)."""
        self.end(video, views)
        if self.has_pending(video):
            self.flush()
        taken = []
        for v in range(views):
            frames = self.received.pop((video, v), 0)
            tokens = np.concatenate(self.out.pop((video, v), []) or
                                    [np.zeros((0, 1, 1), np.uint16)])
            taken.append((tokens[:-(-frames // self.stride_t)], frames))
        return taken

    def drop(self, video: int, views: int) -> None:
        self.pending = [p for p in self.pending if p[0] != video]
        self.pending_clips = sum(len(p[2]) for p in self.pending)
        for v in range(views):
            for table in (self.partial, self.received, self.out):
                table.pop((video, v), None)


def token_grid(cfg: TokenizeConfig, model: Any) -> tuple[int, int]:
    """(H, W) tokens per frame of a ``cfg.size`` crop under the tokenizer's spatial stride."""
    _, sh, sw = model.stride
    if cfg.size % sh or cfg.size % sw:
        raise ValueError(f"tokenize.size = {cfg.size}: not a multiple of tokenizer "
                         f"{model.name!r}'s spatial stride {sh}x{sw}")
    return cfg.size // sh, cfg.size // sw


class TokenizeJob:
    """One worker's share of a tokenize run; see :func:`run_tokenize`."""

    def __init__(self, inputs: Inputs, tokenizer_dir: str | Path, out: str | Path,
                 cfg: TokenizeConfig, worker_index: int = 0, num_workers: int = 1,
                 progress: Progress = NULL_PROGRESS) -> None:
        from vimpac.tokenize.tokenizer import load_tokenizer

        if not 0 <= worker_index < num_workers:
            raise ValueError(f"worker index {worker_index} is outside 0..{num_workers - 1}")
        self.inputs, self.out, self.cfg = inputs, location(out), cfg
        self.worker_index, self.num_workers, self.progress = worker_index, num_workers, progress
        self.device = resolve_device(cfg.device)
        self.model = load_tokenizer(tokenizer_dir, device=self.device)
        self.views = make_views(cfg.scales, cfg.crops, cfg.hflip)
        self.settings = ArchiveSettings(
            tokenizer_fingerprint=self.model.fingerprint(),
            codebook_size=self.model.codebook_size, grid=token_grid(cfg, self.model),
            fps=cfg.fps, shorter_side=cfg.shorter_side, size=cfg.size, views=self.views,
            formats=list(cfg.formats), tokenizer_kind=self.model.name,
            dataset=inputs.dataset, temporal_stride=self.model.stride[0])
        self.writer: ArchiveWriter | None = None
        self.summary = JobSummary()

    def _open_writer(self) -> ArchiveWriter:
        cfg = self.cfg
        return ArchiveWriter(self.out, self.settings, worker=self.worker_index,
                             num_workers=self.num_workers, videos_per_shard=cfg.videos_per_shard,
                             chunk_frames=cfg.chunk_frames, zstd_level=cfg.zstd_level)

    @property
    def part(self) -> ManifestPart:
        """The worker's manifest part (what it has recorded so far)."""
        assert self.writer is not None, "the job's writer is open only while it runs"
        return self.writer.part

    # -- planning
    def pending(self) -> list[InputVideo]:
        """This worker's videos that still need tokenizing, in the fixed shard order."""
        todo = []
        for video in sorted(self.inputs.videos, key=lambda v: v.key):
            if worker_of(video.key, self.num_workers) != self.worker_index:
                continue
            record = self.part.videos.get(video.key)
            if record is None:
                todo.append(video)
                continue
            size, mtime = _stat(video.path)
            if record.status == "ok" or record.same_source(size, mtime):
                if record.status == "ok" and not record.same_source(size, mtime):
                    log.warning("%s changed since it was tokenized; keeping the archived tokens "
                                "(tokenize into a new archive to refresh it)", video.path)
                self.summary.skipped += 1
                continue
            todo.append(video)                   # failed before and changed since: retry
        return todo

    # -- running
    def run(self) -> JobSummary:
        start = time.perf_counter()
        with self._open_writer() as self.writer:
            todo = self.pending()
            self._record_rejected()
            if not todo:
                self.summary.nothing_to_do = True
                self._finish()
                return self.summary
            self._write_config()
            self._tokenize(todo)
            self._finish()
        self.summary.seconds = time.perf_counter() - start
        self.summary.shards_written = self.writer.shards_written
        self.summary.bytes = dict(self.writer.bytes_written)
        return self.summary

    def _record_rejected(self) -> None:
        """Inputs refused before decoding (missing files, symlinks out of the tree) go into the
        manifest as failed records too, each owned by one worker."""
        for path, reason in self.inputs.rejected:
            key = "!rejected/" + normalise_key(path)
            if worker_of(key, self.num_workers) != self.worker_index:
                continue
            self.writer.fail(VideoRecord(key=key, source=path, size=-1, mtime=0.0,
                                         reason=reason))
            self.summary.failures.append((path, reason))

    def _write_config(self) -> None:
        text = config_to_yaml({"tokenize": self.cfg.__dict__, "worker": self.worker_index,
                               "num_workers": self.num_workers,
                               "tokenizer_fingerprint": self.settings.tokenizer_fingerprint})
        self.out.write_bytes(f"config/tokenize-w{self.worker_index:05d}.yaml", text.encode())

    def _tokenize(self, todo: list[InputVideo]) -> None:
        """Decode in the pool, encode here in batches of ``batch_frames``, write in order.

        Videos are finalized (written) in input order, but only once their frames are encoded:
        a finished video waits while the encoder's batch is still filling from the videos behind
        it, so short videos share full batches instead of each forcing a small one. The window of
        videos in flight grows while the batch is not full (up to ``_MAX_IN_FLIGHT``).
        """
        task = self.progress.task("tokenize", total=len(todo), unit="videos")
        specs = decode_specs(self.cfg, self.views, self.settings.temporal_stride)
        encoder = _Encoder(self.model, self.cfg.batch_frames, self.device)
        lookahead = max(2, 2 * self.cfg.decode_workers)
        done: dict[int, tuple[str, str]] = {}
        next_submit = next_finalize = 0
        t0 = time.perf_counter()
        chunk = max(1, min(self.cfg.batch_frames, 256) // len(specs))   # frames x views per chunk
        with DecodePool(self.cfg.decode_workers, chunk_frames=chunk,
                        timeout_s=self.cfg.decode_timeout_s) as pool:
            while next_finalize < len(todo):
                while next_submit < len(todo) and (
                        next_submit < next_finalize + lookahead
                        or (encoder.pending_frames < self.cfg.batch_frames
                            and next_submit < next_finalize + _MAX_IN_FLIGHT)):
                    pool.submit((next_submit, todo[next_submit].path, specs))
                    next_submit += 1
                if len(done) < next_submit - next_finalize:      # messages still to come
                    message = pool.get(timeout=5.0)
                    if message is not None:
                        self._handle(message, encoder, done)
                while next_finalize in done and (
                        not encoder.has_pending(next_finalize)
                        or encoder.pending_frames >= self.cfg.batch_frames
                        or len(done) == next_submit - next_finalize):
                    status, reason = done.pop(next_finalize)
                    self._finalize(todo[next_finalize], status, reason, encoder, next_finalize)
                    next_finalize += 1
                    elapsed = time.perf_counter() - t0
                    task.advance(1, frames_s=self.summary.frames / max(elapsed, 1e-9),
                                 failed=self.summary.failed)
        task.close()

    def _handle(self, message: Message, encoder: _Encoder,
                done: dict[int, tuple[str, str]]) -> None:
        kind, index, payload = message
        if kind == "frames":                     # payload: uint8 [n, views, S, S, 3]
            for view in range(payload.shape[1]):
                encoder.add(index, view, payload[:, view])
        elif kind == "done":
            done[index] = ("ok", "")
            encoder.end(index, len(self.views))
        else:
            done[index] = ("failed", str(payload))
            encoder.drop(index, len(self.views))

    def _finalize(self, video: InputVideo, status: str, reason: str, encoder: _Encoder,
                  index: int) -> None:
        size, mtime = _stat(video.path)
        record = VideoRecord(key=video.key, source=os.path.abspath(video.path), size=size,
                             mtime=mtime, label=video.label, splits=list(video.splits))
        taken = encoder.take(index, len(self.views)) if status == "ok" else []
        tokens = [t for t, _ in taken]
        if status == "ok":
            frames = {len(t) for t in tokens}
            if min(frames) == 0:
                status, reason = "failed", "no frames decoded"
            elif len(frames) > 1:
                n = min(frames)
                log.warning("%s: views decoded to %s frames; keeping the first %d",
                            video.path, sorted(frames), n)
                tokens = [t[:n] for t in tokens]
        if status != "ok":
            record.reason = reason
            self.writer.fail(record)
            self.summary.failed += 1
            self.summary.failures.append((video.path, reason))
            log.warning("%s: %s", video.path, reason)
            return
        decoded = min(n for _, n in taken)
        if self.settings.temporal_stride > 1:
            record.decoded_frames = decoded
        self.writer.add(record, {v.name: t for v, t in zip(self.views, tokens, strict=True)})
        self.summary.ok += 1
        self.summary.frames += decoded * len(self.views)
        self.summary.tokens += record.frames * len(self.views) * int(np.prod(self.settings.grid))

    def _finish(self) -> None:
        mine = [v for v in self.inputs.videos
                if worker_of(v.key, self.num_workers) == self.worker_index]
        self.writer.commit()
        self.part.complete = all(v.key in self.part.videos for v in mine)
        reported = {path for path, _ in self.summary.failures}   # earlier runs' failures too
        for v in mine:
            rec = self.part.videos.get(v.key)
            if rec is not None and rec.status != "ok" and v.path not in reported:
                self.summary.failures.append((v.path, rec.reason))


def _stat(path: str) -> tuple[int, float]:
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime
    except OSError:
        return -1, 0.0


def run_tokenize(inputs: list[str] | Inputs, tokenizer_dir: str | Path, out: str | Path,
                 cfg: TokenizeConfig, *, worker_index: int | None = None,
                 num_workers: int | None = None,
                 progress: Progress = NULL_PROGRESS) -> JobSummary:
    """Tokenize ``inputs`` into the archive folder ``out`` (resumable, idempotent).

    Worker index and count default to torchrun's RANK / WORLD_SIZE (or a Slurm array's), else a
    single worker.
    """
    env_index, env_count = worker_from_env()
    worker_index = env_index if worker_index is None else worker_index
    num_workers = env_count if num_workers is None else num_workers
    found = inputs if isinstance(inputs, Inputs) else collect_inputs(inputs)
    job = TokenizeJob(found, tokenizer_dir, out, cfg, worker_index, num_workers, progress)
    return job.run()
