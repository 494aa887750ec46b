"""CUDA paths: GPU tokenization, bf16 pre-training with fused attention and resume, fine-tuning.

Skipped where torch sees no CUDA device (CI); on a GPU machine run ``pytest -m gpu``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_test_video, write_token_archive
from test_finetune import CFG, SMALL, make_archive
from test_pretrain import TINY

from vimpac.common.video import DecodeSpec, decode_video
from vimpac.finetune.train import run_finetune
from vimpac.pretrain.model import PRESETS, VimpacBackbone
from vimpac.pretrain.train import run_pretrain
from vimpac.tokenize.tokenizer import encode_frames, load_tokenizer

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_gpu_tokenization_matches_cpu(tmp_path, tiny_tokenizer):
    video = make_test_video(tmp_path / "v.mp4", seconds=2.0, size=(64, 48))
    frames = decode_video(video, DecodeSpec(fps=4.0, shorter_side=32, size=32))
    model = load_tokenizer(tiny_tokenizer)
    on_cpu = encode_frames(model, frames, batch_size=4, device="cpu")
    on_gpu = encode_frames(model, frames, batch_size=4, device="cuda")
    again = encode_frames(model, frames, batch_size=4, device="cuda")
    assert on_gpu.shape == on_cpu.shape and on_gpu.dtype == np.uint16
    assert np.array_equal(on_gpu, again)                      # deterministic on the GPU
    # bf16 autocast may flip a code whose two nearest entries are near-ties; the rest agree
    assert (on_gpu == on_cpu).mean() >= 0.9


def test_fused_attention_kernels_run_the_backbone():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = VimpacBackbone(PRESETS["tiny"]).cuda().eval()
    tokens = torch.randint(0, PRESETS["tiny"].codebook_size, (2, 5, 8, 8), device="cuda")
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]), \
            torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
        fused = model(tokens)
    with torch.no_grad():
        plain = model(tokens)
    for a, b in zip(fused, plain, strict=True):
        assert torch.isfinite(a).all()
        assert torch.allclose(a.float(), b.float(), atol=0.1, rtol=0.05)


def test_bf16_pretraining_on_cuda_resumes(tmp_path):
    archive = write_token_archive(tmp_path / "arch", videos=24, grid=8, frames=(2, 14),
                                  codebook=64, per_shard=5)
    whole = run_pretrain([archive], TINY, tmp_path / "whole")
    run_pretrain([archive], TINY, tmp_path / "parts", stop_after=3)
    resumed = run_pretrain([archive], TINY, tmp_path / "parts")
    assert whole.step == resumed.step == TINY.steps
    a = torch.load(whole.pretrained, weights_only=True)["backbone"]
    b = torch.load(resumed.pretrained, weights_only=True)["backbone"]
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert all(torch.isfinite(v.float()).all() for v in a.values())
    assert diff < 1e-2, f"resumed run drifted from the uninterrupted one by {diff}"


def test_finetune_on_cuda_learns(tmp_path):
    archive = make_archive(tmp_path / "labelled")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(PRESETS, "gpu-test", SMALL)
        summary = run_finetune(archive, CFG, tmp_path / "ft", model_preset="gpu-test",
                               device="cuda")
    assert summary["complete"] and summary["best_val_top1"] >= 0.75
