"""VQ-VAE tokenizer: encode/decode contract, fingerprint, save/load, codebook, training, resume."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from vimpac.common.checkpoint import CheckpointError
from vimpac.tokenize import base
from vimpac.tokenize import train_tokenizer as tt
from vimpac.tokenize.tokenizer import encode_frames, load_tokenizer, save_tokenizer
from vimpac.tokenize.train_tokenizer import TokenizerTrainSpec, train_tokenizer_on_frames
from vimpac.tokenize.vqvae import VectorQuantizer, VQConfig, VQTokenizer

TINY = VQConfig(codebook_size=64, channels=8, code_dim=8, image_size=32)


def make_model(seed: int = 0, config: VQConfig = TINY) -> VQTokenizer:
    torch.manual_seed(seed)
    return VQTokenizer(config).eval()


def moving_squares(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """uint8 [n,size,size,3]: a coloured square moving over a two-colour gradient."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    frames = np.zeros((n, size, size, 3), np.uint8)
    for i in range(n):
        bg = rng.integers(0, 256, (2, 3))
        frames[i] = (bg[0] * (xx / size)[..., None] + bg[1] * (yy / size)[..., None]) / 2
        s, (y, x) = size // 4, rng.integers(0, size - size // 4, 2)
        frames[i, y:y + s, x:x + s] = rng.integers(0, 256, 3)
    return frames


def test_encode_decode_shapes_dtypes_and_range():
    model = make_model()
    frames = torch.from_numpy(moving_squares(3, size=32))[:, :, :24]  # [3,32,24,3]
    ids = model.encode(frames)
    assert ids.shape == (3, 4, 3) and ids.dtype == torch.int64
    assert 0 <= int(ids.min()) and int(ids.max()) < model.codebook_size
    pixels = model.decode(ids)
    assert pixels.shape == (3, 32, 24, 3) and pixels.dtype == torch.uint8
    assert model.downsample == 8


@pytest.mark.parametrize("bad", [np.zeros((2, 30, 32, 3), np.uint8),
                                 np.zeros((2, 32, 32, 3), np.float32),
                                 np.zeros((2, 32, 32), np.uint8)])
def test_encode_rejects_bad_frames(bad):
    with pytest.raises(ValueError, match="frame"):
        make_model().encode(torch.from_numpy(bad))


def test_decode_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        make_model().decode(torch.full((1, 2, 2), 64))


def test_encode_frames_is_deterministic_uint16_and_matches_encode():
    model = make_model()
    frames = moving_squares(7)
    a = encode_frames(model, frames, batch_size=3)
    b = encode_frames(model, frames, batch_size=3)
    assert a.dtype == np.uint16 and a.shape == (7, 4, 4)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, model.encode(torch.from_numpy(frames)).numpy())
    assert encode_frames(model, frames[:0]).shape == (0, 4, 4)


def test_config_validation_names_key_and_value():
    with pytest.raises(ValueError, match="codebook_size=70000"):
        VQConfig(codebook_size=70000)
    with pytest.raises(ValueError, match="kind='vqgan'"):
        VQConfig(kind="vqgan")
    with pytest.raises(ValueError, match=r"cfg\.json.*\['bogus'\]"):
        VQConfig.from_dict({**TINY.to_dict(), "bogus": 1}, source="cfg.json")


def test_fingerprint_stable_through_save_load_and_sensitive_to_weights(tmp_path):
    model = make_model()
    fp = model.fingerprint()
    assert len(fp) == 64 and fp == make_model().fingerprint()
    save_tokenizer(model, tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert not loaded.training
    assert loaded.fingerprint() == fp
    frames = moving_squares(4)
    np.testing.assert_array_equal(encode_frames(loaded, frames), encode_frames(model, frames))
    with torch.no_grad():
        loaded.decoder.layers[0].bias[0] += 1e-6
    assert loaded.fingerprint() != fp
    assert make_model(seed=1).fingerprint() != fp
    other = dataclasses.replace(TINY, image_size=64)
    assert make_model(config=other).fingerprint() != fp


def test_saved_files_are_safetensors_and_json(tmp_path):
    model = make_model()
    save_tokenizer(model, tmp_path / "tok")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]
    meta = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert meta["config"]["codebook_size"] == 64 and meta["fingerprint"] == model.fingerprint()
    with safe_open(str(tmp_path / "tok" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(model.state_dict())


def test_save_is_atomic_and_replaces_existing(tmp_path, monkeypatch):
    out = tmp_path / "tok"
    save_tokenizer(make_model(seed=0), out)
    first = load_tokenizer(out).fingerprint()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(base, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_tokenizer(make_model(seed=1), out)
    assert load_tokenizer(out).fingerprint() == first  # old tokenizer intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # no temp dirs left
    monkeypatch.undo()
    second = make_model(seed=1)
    save_tokenizer(second, out)
    assert load_tokenizer(out).fingerprint() == second.fingerprint()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]


def test_load_rejects_mismatched_fingerprint_and_missing_files(tmp_path):
    save_tokenizer(make_model(), tmp_path / "tok")
    cfg = tmp_path / "tok" / "config.json"
    meta = json.loads(cfg.read_text())
    cfg.write_text(json.dumps({**meta, "fingerprint": "0" * 64}))
    with pytest.raises(ValueError, match="fingerprint"):
        load_tokenizer(tmp_path / "tok")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_tokenizer(tmp_path / "nowhere")


def clustered_latents(n: int = 512, seed: int = 0) -> torch.Tensor:
    """[n,2] points around 8 centres on a circle of radius 3."""
    g = torch.Generator().manual_seed(seed)
    angles = torch.arange(8) * (2 * torch.pi / 8)
    centres = 3 * torch.stack([angles.cos(), angles.sin()], 1)
    return centres[torch.randint(8, (n,), generator=g)] + 0.1 * torch.randn(n, 2, generator=g)


def as_map(latents: torch.Tensor) -> torch.Tensor:
    """[M,2] -> [1,2,1,M] so the quantizer sees an image-shaped latent."""
    return latents.t()[None, :, None, :]


def test_kmeans_init_covers_clusters():
    q = VectorQuantizer(8, 2, normalize=False, decay=0.9, commitment=0.25)
    q.init_codebook(clustered_latents(), torch.Generator().manual_seed(0), iters=20)
    assert bool(q.initialized)
    ids = q.lookup(as_map(clustered_latents(seed=1)))
    assert len(ids.unique()) >= 7


def test_dead_code_restart_reactivates_unused_codes():
    torch.manual_seed(0)
    q = VectorQuantizer(16, 2, normalize=False, decay=0.9, commitment=0.25).train()
    far = torch.full((16, 2), 100.0)
    far[0] = 0.0  # only code 0 is near the data: all others are dead
    q._set_codes(torch.arange(16), far, count=1.0)
    q.initialized.fill_(True)
    g = torch.Generator().manual_seed(0)
    data = clustered_latents()
    used_before = q(as_map(data)).ids.unique().numel()
    restarted = 0
    for _ in range(5):
        out = q(as_map(data))
        restarted += q.restart_dead_codes(out.latents, g, dead_after=3)
    used_after = q(as_map(data)).ids.unique().numel()
    assert used_before == 1 and restarted >= 15 and used_after >= 8


def test_ema_update_pulls_codes_to_assigned_mean():
    q = VectorQuantizer(2, 2, normalize=False, decay=0.5, commitment=0.25).train()
    q._set_codes(torch.arange(2), torch.tensor([[0.0, 0.0], [10.0, 10.0]]), count=1.0)
    q.initialized.fill_(True)
    data = torch.tensor([[1.0, 1.0]] * 4 + [[9.0, 9.0]] * 4)
    for _ in range(20):
        q(as_map(data))
    torch.testing.assert_close(q.codebook, torch.tensor([[1.0, 1.0], [9.0, 9.0]]), atol=1e-3,
                               rtol=0)


def test_code_statistics_and_psnr():
    stats = tt.code_statistics(np.arange(16).repeat(3), 32)
    assert stats["code_usage"] == 0.5 and stats["perplexity"] == pytest.approx(16.0)
    a = np.full((2, 8, 8, 3), 100, np.uint8)
    b = a.copy()
    b[..., 0] += 10  # MSE 100/3 over all values
    assert tt.psnr(a, b) == pytest.approx(10 * np.log10(255**2 / (100 / 3)))


def test_split_holdout_by_whole_videos():
    videos = [np.full((4, 8, 8, 3), i, np.uint8) for i in range(5)] + [np.zeros((0, 8, 8, 3))]
    train, held = tt.split_holdout(videos, 0.2, seed=0)
    assert len(train) == 16 and len(held) == 4
    assert len(np.unique(held[:, 0, 0, 0])) == 1
    assert not set(np.unique(held)) & set(np.unique(train))
    one_train, one_held = tt.split_holdout(videos[:1], 0.25, seed=0)
    assert len(one_train) == 3 and len(one_held) == 1
    with pytest.raises(ValueError, match="no frames"):
        tt.split_holdout(videos[5:], 0.2, seed=0)


SPEC = TokenizerTrainSpec(codebook_size=32, channels=8, code_dim=8, image_size=32, steps=12,
                          batch_size=8, lr=3e-3, warmup_steps=2, init_frames=32,
                          dead_code_steps=4, checkpoint_every=6, eval_batch_size=16)


def test_training_reduces_loss_and_writes_outputs(tmp_path):
    frames = moving_squares(48)
    metrics = train_tokenizer_on_frames(frames[:40], frames[40:], SPEC, tmp_path)
    assert metrics["steps"] == 12 and metrics["final_loss"] < metrics["first_loss"]
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    for key in ("psnr", "perplexity", "code_usage"):
        assert metrics[key] > 0
    model = load_tokenizer(tmp_path / "tokenizer")
    assert model.fingerprint() == metrics["fingerprint"]
    png = Image.open(tmp_path / "reconstructions.png")
    assert png.size == (8 * 32 * 2, 2 * 32 * 2)  # 8 frames wide, originals over reconstructions
    ckpt = torch.load(tmp_path / "checkpoints" / "step-000000012.pt", weights_only=True)
    assert ckpt["step"] == 12


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, monkeypatch):
    frames = moving_squares(40)
    spec = dataclasses.replace(SPEC, steps=8, checkpoint_every=4)
    full = train_tokenizer_on_frames(frames[:32], frames[32:], spec, tmp_path / "full")

    real_step = tt.train_step

    def crash_after_checkpoint(state, x):
        if state.step == 5:  # checkpoint was written at step 4
            raise KeyboardInterrupt
        return real_step(state, x)

    monkeypatch.setattr(tt, "train_step", crash_after_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train_tokenizer_on_frames(frames[:32], frames[32:], spec, tmp_path / "resumed")
    (saved,) = (tmp_path / "resumed" / "checkpoints").glob("step-*.pt")
    assert saved.name == "step-000000004.pt"
    monkeypatch.undo()
    resumed = train_tokenizer_on_frames(frames[:32], frames[32:], spec, tmp_path / "resumed")
    assert resumed["fingerprint"] == full["fingerprint"]
    assert resumed["final_loss"] == full["final_loss"]


def test_resume_refuses_a_different_spec(tmp_path):
    frames = moving_squares(24)
    spec = dataclasses.replace(SPEC, steps=2)
    train_tokenizer_on_frames(frames[:16], frames[16:], spec, tmp_path)
    with pytest.raises(CheckpointError, match=r"step-000000002\.pt: .*codebook_size 32 -> 16"):
        train_tokenizer_on_frames(frames[:16], frames[16:],
                                  dataclasses.replace(spec, codebook_size=16), tmp_path)


def test_spec_validation():
    with pytest.raises(ValueError, match="holdout=1.5"):
        TokenizerTrainSpec(holdout=1.5)
    with pytest.raises(ValueError, match="image_size=60"):
        TokenizerTrainSpec(image_size=60)
    assert set(tt.TOKENIZER_PRESETS) >= {"tiny", "base"}


def write_test_video(path: Path, source: str, seconds: float = 6.0) -> None:
    """Encode ffmpeg lavfi ``source`` (e.g. testsrc2, mandelbrot) to an H.264 mp4."""
    import subprocess

    from vimpac.common.ffmpeg_exe import ffmpeg_exe

    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i",
                    f"{source}=size=160x120:rate=10", "-t", str(seconds), "-pix_fmt", "yuv420p",
                    "-c:v", "libx264", str(path)], check=True, timeout=120)


def test_sample_frames_decodes_and_skips_broken_videos(tmp_path):
    pytest.importorskip("vimpac.common.video")
    good = [tmp_path / "a.mp4", tmp_path / "b.mp4"]
    write_test_video(good[0], "testsrc2", 3)
    write_test_video(good[1], "mandelbrot", 3)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    spec = dataclasses.replace(SPEC, fps=2.0, frames_per_video=4, holdout=0.5)
    train, held = tt.sample_frames([str(good[0]), str(broken), str(good[1])], spec)
    assert train.shape == (4, 32, 32, 3) and held.shape == (4, 32, 32, 3)
    assert train.dtype == np.uint8


@pytest.mark.slow
def test_tiny_tokenizer_on_synthetic_corpus_keeps_most_codes_in_use(tmp_path):
    """The demo's claim: a few CPU minutes of training keep over half of the codes in use."""
    synth = pytest.importorskip("vimpac.data.synth")
    synth.write_corpus(tmp_path / "corpus", synth.SynthSpec(layouts=("list",)))
    paths = sorted(str(p) for p in (tmp_path / "corpus").rglob("*")
                   if p.suffix in (".mp4", ".webm", ".avi"))
    spec = dataclasses.replace(TokenizerTrainSpec(), codebook_size=512, steps=600)
    metrics = tt.train_tokenizer(paths, spec, tmp_path / "out")
    assert metrics["num_heldout_frames"] >= 50, metrics
    assert metrics["code_usage"] > 0.5, metrics
    assert metrics["psnr"] > 20, metrics
