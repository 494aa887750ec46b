"""The tokenizer seam: the TOKENIZERS table, folders of either tokenizer, clip-shaped encoding,
archives bitwise equal to the previous job's, and a tokenizer that compresses time."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from conftest import make_test_video

from vimpac.archive import Archive, ArchiveError, load_part, verify
from vimpac.common.storage import location
from vimpac.common.video import DecodeSpec, decode_video
from vimpac.config import TokenizeConfig
from vimpac.tokenize.base import fingerprint_of
from vimpac.tokenize.dalle import DalleConfig, DalleTokenizer
from vimpac.tokenize.job import run_tokenize
from vimpac.tokenize.tokenizer import (
    TOKENIZERS,
    encode_clips,
    encode_frames,
    load_tokenizer,
    save_tokenizer,
)
from vimpac.tokenize.vqvae import VQConfig, VQTokenizer

REPO = Path(__file__).resolve().parent.parent
# The last commit whose tokenize job batched frames of different videos together (before the
# tokenizer seam): archives of a stride-1 tokenizer must not change by a single byte since.
BEFORE_SEAM = "725529f471ef655dcf3fcf3c221d9a414b15f950"
CFG = dict(fps=4.0, shorter_side=32, size=32, decode_workers=0, videos_per_shard=2,
           chunk_frames=4, batch_frames=8, crops=["top", "bottom"], hflip=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("seam-videos")
    make_test_video(root / "a.mp4", seconds=1.0)
    make_test_video(root / "b.webm", seconds=1.5, codec="libvpx-vp9", size=(48, 64))
    make_test_video(root / "c.avi", seconds=2.0, codec="mpeg4", source="mandelbrot",
                    size=(80, 60))
    make_test_video(root / "d.mp4", seconds=0.5, fps=25, size=(33, 21))
    (root / "broken.mp4").write_text("not a video\n")
    return root


def tree_bytes(root: Path) -> dict[str, str]:
    """sha256 of every file of an archive by relative path (lock files left out)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "locks" not in p.parts}


# ------------------------------------------------------------------------------ the table

def test_the_table_names_each_tokenizer_by_the_kind_its_folder_stores(tmp_path):
    assert TOKENIZERS == {"vqvae": VQTokenizer, "dalle": DalleTokenizer}
    for model in (VQTokenizer(VQConfig(codebook_size=32, channels=8, code_dim=8)),
                  DalleTokenizer(DalleConfig(codebook_size=32, channels=8,
                                             blocks_per_group=1))):
        save_tokenizer(model, tmp_path / model.name)
        meta = json.loads((tmp_path / model.name / "config.json").read_text())
        assert meta["config"]["kind"] == model.name
        loaded = load_tokenizer(tmp_path / model.name)
        assert type(loaded) is type(model) and loaded.fingerprint() == model.fingerprint()


def test_an_unknown_tokenizer_kind_is_refused_naming_the_config(tiny_tokenizer, tmp_path):
    folder = Path(shutil.copytree(tiny_tokenizer, tmp_path / "tok"))
    meta = json.loads((folder / "config.json").read_text())
    meta["config"]["kind"] = "vqgan"
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"config\.json: config\.kind='vqgan'.*vqvae, dalle"):
        load_tokenizer(folder)
    meta["config"] = {**meta["config"], "kind": "vqvae", "codebook_size": "many"}
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"config\.json: tokenizer config codebook_size='many'"):
        load_tokenizer(folder)


def test_a_dalle_folder_written_before_dalle_had_its_own_config_keeps_its_fingerprint(tmp_path):
    torch.manual_seed(0)
    model = DalleTokenizer(DalleConfig(codebook_size=64, channels=8, blocks_per_group=1))
    # config.json as every earlier version wrote it: the VQ-VAE's keys at their defaults too
    old = {"kind": "dalle", "codebook_size": 64, "channels": 8, "code_dim": 32,
           "normalize_codes": True, "commitment": 0.25, "ema_decay": 0.99,
           "blocks_per_group": 1, "image_size": 256, "downsample": 8}
    old_fingerprint = fingerprint_of(old, model)
    save_tokenizer(model, tmp_path / "tok")
    meta = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert meta["config"] == old and model.fingerprint() == old_fingerprint
    meta["config"]["code_dim"] = 16
    (tmp_path / "tok" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"config\.json: tokenizer config code_dim=16"):
        load_tokenizer(tmp_path / "tok")


def test_both_tokenizers_encode_clips_to_the_grid_their_stride_gives():
    torch.manual_seed(0)
    clips = torch.randint(0, 256, (2, 3, 32, 24, 3), dtype=torch.uint8)
    for model in TOKENIZERS["vqvae"](VQConfig(codebook_size=32, channels=8, code_dim=8)), \
            TOKENIZERS["dalle"](DalleConfig(codebook_size=32, channels=8, blocks_per_group=1)):
        model.eval()
        assert model.stride == (1, 8, 8) and model.clip_frames == 1
        ids = model.encode(clips)
        assert ids.shape == (2, 3, 4, 3) and ids.dtype == torch.int64
        assert torch.equal(ids[1, 2], model.encode(clips[1, 2:3])[0])
        np.testing.assert_array_equal(encode_clips(model, clips.numpy(), batch_size=1),
                                      ids.numpy().astype(np.uint16))
    assert model.can_decode is False and TOKENIZERS["vqvae"].can_decode is True


def test_the_vqvae_decodes_clips_back_to_clips():
    model = VQTokenizer(VQConfig(codebook_size=32, channels=8, code_dim=8)).eval()
    ids = torch.randint(0, 32, (2, 3, 4, 5))
    pixels = model.decode(ids)
    assert pixels.shape == (2, 3, 32, 40, 3) and pixels.dtype == torch.uint8
    assert torch.equal(pixels[1], model.decode(ids[1]))


def test_tokenizer_modules_import_each_other_without_a_cycle():
    """The table imports every tokenizer module; none imports the table (not even lazily)."""
    folder = REPO / "vimpac" / "tokenize"
    graph = {}
    for path in folder.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        graph[path.stem] = {n.rsplit(".", 1)[1] for n in names
                            if n.startswith("vimpac.tokenize.")}

    def reaches(start: str, goal: str, seen: frozenset = frozenset()) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n}))
                   for n in graph.get(start, ()))

    assert not [m for m in graph if reaches(m, m)]
    assert {"vqvae", "dalle", "base"} <= graph["tokenizer"]


# ---------------------------------------------------------------------- bitwise, before/after

def _old_vimpac(tmp_path: Path) -> Path:
    """The package as of BEFORE_SEAM, extracted from git into ``tmp_path/old``."""
    if shutil.which("git") is None:
        pytest.skip("needs git to check out the job before the seam")
    probe = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{BEFORE_SEAM}^{{commit}}"],
                           capture_output=True)
    if probe.returncode:
        pytest.skip(f"commit {BEFORE_SEAM[:12]} is not in this checkout's history")
    old = tmp_path / "old"
    old.mkdir()
    tar = subprocess.run(["git", "-C", str(REPO), "archive", BEFORE_SEAM, "vimpac"],
                         capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(old)], input=tar, check=True)
    return old


OLD_JOB = """
import json, sys
import vimpac.tokenize.dalle_import   # only the old tree has it: proves which code runs
from vimpac.common.config import TokenizeConfig
from vimpac.tokenize.job import run_tokenize
cfg, inputs, tok, out = sys.argv[1:]
s = run_tokenize(json.loads(inputs), tok, out, TokenizeConfig(**json.loads(cfg)))
print(s.ok, s.failed)
"""


def test_a_stride_1_tokenizer_writes_the_previous_jobs_archive_bit_for_bit(
        corpus, tiny_tokenizer, tmp_path):
    """The job before the seam (checked out from git, run in its own interpreter) and the job
    now tokenize the same videos with the same tokenizer into identical files: every shard of
    both formats, the manifest and the recorded config.

    Both runs decode with their own tree's video code; a difference after a deliberate change to
    decoding (not to tokenizing) means archives changed for the same inputs: check that it is
    wanted, then pin BEFORE_SEAM to a commit after the seam. (Inputs that fail are left out: their
    failure reasons are the video code's words, not archive content the seam writes.)"""
    inputs = sorted(str(p) for p in corpus.iterdir() if p.name != "broken.mp4")
    env = {**os.environ, "PYTHONPATH": str(_old_vimpac(tmp_path)), "OMP_NUM_THREADS": "1"}
    old = subprocess.run([sys.executable, "-c", OLD_JOB, json.dumps(CFG), json.dumps(inputs),
                          str(tiny_tokenizer), str(tmp_path / "before")], env=env,
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert old.returncode == 0, old.stderr[-2000:]
    assert old.stdout.split() == ["4", "0"]
    summary = run_tokenize(inputs, tiny_tokenizer, tmp_path / "after", TokenizeConfig(**CFG))
    assert (summary.ok, summary.failed) == (4, 0)
    before, after = tree_bytes(tmp_path / "before"), tree_bytes(tmp_path / "after")
    assert sum(p.startswith(("zarr/", "wds/")) for p in after) >= 4
    assert before == after
    assert Archive(tmp_path / "before").settings.temporal_stride == 1


# ------------------------------------------------------------------- a tokenizer over time

class PairMean(torch.nn.Module):
    """A toy tokenizer that compresses time: the mean grey level of 2 frames x 8 x 8 pixels,
    quantised to 64 levels. Clips of 4 frames, so a video's last clip is often partial."""

    name: ClassVar[str] = "pair-mean"
    can_decode: ClassVar[bool] = False
    clip_frames: ClassVar[int] = 4
    codebook_size = 64
    stride = (2, 8, 8)

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("levels", torch.tensor(64.0))

    def config_dict(self) -> dict[str, Any]:
        return {"kind": self.name}

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str) -> PairMean:
        return cls()

    def fingerprint(self) -> str:
        return fingerprint_of(self.config_dict(), self)

    def encode(self, clips: torch.Tensor) -> torch.Tensor:
        """uint8 [B,T,H,W,3] -> int64 [B,T/2,H/8,W/8]."""
        b, t, h, w, _ = clips.shape
        x = clips.float().mean(-1).reshape(b, t // 2, 2, h // 8, 8, w // 8, 8)
        return (x.mean(dim=(2, 4, 6)) * self.levels / 256).long()

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("pair-mean has no decoder")


def expected_pair_mean(frames: np.ndarray) -> np.ndarray:
    """What the job should store for one view: pad to whole 4-frame clips with the last frame,
    encode, keep ceil(n / 2) token frames."""
    n = len(frames)
    padded = np.concatenate([frames, np.repeat(frames[-1:], -n % 4, axis=0)])
    ids = PairMean().encode(torch.from_numpy(padded).reshape(-1, 4, *frames.shape[1:]))
    return ids.reshape(-1, *ids.shape[2:]).numpy().astype(np.uint16)[:-(-n // 2)]


def test_a_tokenizer_that_compresses_time_is_one_table_entry(
        corpus, tmp_path, monkeypatch):
    monkeypatch.setitem(TOKENIZERS, PairMean.name, PairMean)
    save_tokenizer(PairMean(), tmp_path / "tok")
    cfg = TokenizeConfig(**{**CFG, "fps": 2.5, "crops": ["center"], "hflip": False})
    summary = run_tokenize([str(corpus)], tmp_path / "tok", tmp_path / "arch", cfg)
    assert (summary.ok, summary.failed) == (4, 1)
    archive = Archive(tmp_path / "arch")
    s = archive.settings
    assert (s.temporal_stride, s.fps, s.decode_fps, s.grid) == (2, 2.5, 5.0, (4, 4))
    assert s.tokenizer_kind == "pair-mean"
    spec = DecodeSpec(fps=s.decode_fps, shorter_side=32, size=32)
    decoded = {}
    for entry in archive.entries:
        frames = decode_video(archive.records[entry.key].source, spec)
        decoded[entry.key] = len(frames)
        assert archive.records[entry.key].decoded_frames == len(frames)
        np.testing.assert_array_equal(archive.read_video(entry.key), expected_pair_mean(frames))
    assert any(n % 4 for n in decoded.values()), "some video should end in a partial clip"
    assert any(n % 2 for n in decoded.values()), "some token frame should hold padding"
    assert summary.frames == sum(decoded.values())
    assert verify(tmp_path / "arch", deep=True).ok


def test_per_frame_helpers_refuse_a_tokenizer_that_compresses_time():
    with pytest.raises(ValueError, match="temporal stride 2"):
        encode_frames(PairMean(), np.zeros((4, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match=r"not a multiple of tokenizer 'pair-mean'"):
        encode_clips(PairMean(), np.zeros((1, 3, 16, 16, 3), np.uint8))


def test_decoded_frames_that_do_not_fill_the_token_frames_are_refused(corpus, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setitem(TOKENIZERS, PairMean.name, PairMean)
    save_tokenizer(PairMean(), tmp_path / "tok")
    run_tokenize([str(corpus / "a.mp4")], tmp_path / "tok", tmp_path / "arch",
                 TokenizeConfig(**{**CFG, "crops": ["center"], "hflip": False}))
    manifest = tmp_path / "arch" / "manifests" / "worker-00000-of-00001.json"
    data = json.loads(manifest.read_text())
    (video,) = data["videos"]
    video["decoded_frames"] = 2 * video["frames"] + 1
    manifest.write_text(json.dumps(data))
    with pytest.raises(ArchiveError, match=r"videos\[0\]\.decoded_frames: expected"):
        load_part(location(tmp_path / "arch"), "manifests/worker-00000-of-00001.json")


def test_a_file_that_is_no_dalle_encoder_is_one_error_line_naming_it(cli_runner, tmp_path):
    from vimpac.cli import cli

    bad = tmp_path / "encoder.pkl"
    bad.write_bytes(b"\x80\x05 not a pickle at all")
    result = cli_runner.invoke(cli, ["tokenizer", "import-dalle", str(bad), "--out",
                                     str(tmp_path / "tok")])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "encoder.pkl: not a pickled DALL-E encoder" in lines[0]
    assert not (tmp_path / "tok").exists()
