import os

import pytest
import torch

# Tests use tiny models: one intra-op thread is faster than two on a 2-core machine (no
# oversubscription when decode workers, DataLoader workers or torchrun peers run beside them).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


def pytest_report_header(config):
    """Which ffmpeg the run uses (the one users get: VIMPAC_FFMPEG, else PATH, else bundled)."""
    from vimpac.common.ffmpeg_exe import FFmpegError, ffmpeg_build

    try:
        build = ffmpeg_build()
    except FFmpegError as exc:
        return f"ffmpeg: {exc}"
    return f"ffmpeg: {build.version} at {build.path} (from {build.source})"


@pytest.fixture
def cli_runner():
    from click.testing import CliRunner

    return CliRunner()


def make_test_video(path, *, seconds=1.0, fps=12, size=(64, 48), codec="libx264",
                    source="testsrc2", audio=False):
    """Encode a small real video with vimpac's ffmpeg (lavfi source), return its path."""
    import subprocess

    from vimpac.common.ffmpeg_exe import ffmpeg_exe

    w, h = size
    cmd = [ffmpeg_exe(), "-hide_banner", "-v", "error", "-y", "-f", "lavfi", "-i",
           f"{source}=size={w}x{h}:rate={fps}", "-t", str(seconds)]
    if audio:
        cmd += ["-f", "lavfi", "-i", f"sine=duration={seconds}", "-shortest"]
    cmd += ["-c:v", codec, "-pix_fmt", "yuv420p"]
    if codec == "libx264":
        cmd += ["-preset", "ultrafast"]
    if codec == "libvpx-vp9":
        cmd += ["-deadline", "realtime", "-cpu-used", "8"]
    subprocess.run(cmd + [str(path)], check=True, timeout=60)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """An untrained (random) 64-code VQ-VAE saved to disk: enough to exercise the pipeline."""
    import torch

    from vimpac.tokenize.tokenizer import save_tokenizer
    from vimpac.tokenize.vqvae import VQConfig, VQTokenizer

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tokenizer") / "tok"
    save_tokenizer(VQTokenizer(VQConfig(codebook_size=64, channels=16, image_size=32)), path)
    return path


def write_token_archive(root, *, videos=12, frames=(3, 12), grid=8, codebook=64, per_shard=4,
                        seed=0, labels=None, splits=None, views=None, fingerprint="test-tok",
                        formats=("zarr", "webdataset")):
    """A token archive of random ids written straight through the archive writer."""
    import numpy as np

    from vimpac.archive import ArchiveSettings, VideoRecord, make_views, write_archive

    views = views or make_views([1.0], ["center"], False)
    settings = ArchiveSettings(fingerprint, codebook, (grid, grid), 4.0, grid * 8, grid * 8,
                               views, list(formats))
    rng = np.random.default_rng(seed)

    def videos_():
        for i in range(videos):
            n = int(rng.integers(frames[0], frames[1] + 1))
            tokens = {v.name: rng.integers(0, codebook, (n, grid, grid)).astype(np.uint16)
                      for v in views}
            yield VideoRecord(f"v{i:04d}", f"/src/v{i}.mp4", 1, 0.0,
                              label=-1 if labels is None else int(labels[i]),
                              splits=[] if splits is None else list(splits[i])), tokens

    write_archive(root, settings, videos_(), videos_per_shard=per_shard, chunk_frames=4)
    return root


# ------------------------------------------------------------------ tampering with archives

def resign(root):
    """Recompute every shard checksum in the archive's manifests from the files now on disk, as
    a buggy tool or an attacker with write access would after rewriting shards."""
    import json

    from vimpac.common.fileio import sha256_file

    for manifest in (root / "manifests").glob("*.json"):
        data = json.loads(manifest.read_text())
        for shard in data["shards"]:
            for fmt, files in shard["files"].items():
                entries = {"/".join(rel.split("/")[:2]) for rel in files}   # zarr/<shard>.zarr
                paths = [p for e in entries for p in ([root / e] if (root / e).is_file() else
                                                      sorted((root / e).rglob("*")))]
                shard["files"][fmt] = {p.relative_to(root).as_posix(): sha256_file(p)
                                       for p in paths if p.is_file()}
        manifest.write_text(json.dumps(data))


def tar_members(path):
    """{name: bytes} of the regular files of a tar."""
    import tarfile

    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def write_tar(path, members):
    """A plain USTAR tar of ``members`` ({name: bytes}) at ``path``."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())


@pytest.fixture
def one_thread():
    """Two shared cores: one intra-op thread is far faster than two fighting other processes."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
