"""One resume mechanism for the three trainers: a changed volatile field is logged and accepted,
a changed result-defining field is refused naming it, for the tokenizer trainer, pre-training and
fine-tuning alike."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_token_archive

from vimpac.common.checkpoint import Checkpointer, CheckpointError
from vimpac.common.config import param
from vimpac.finetune.config import FinetuneConfig
from vimpac.finetune.train import run_finetune
from vimpac.pretrain.config import PretrainConfig
from vimpac.pretrain.train import run_pretrain
from vimpac.tokenize.train_tokenizer import TokenizerTrainSpec, train_tokenizer_on_frames

RESUMED = "resuming with changed run settings"


@dataclasses.dataclass
class Toy:
    lr: float = param(0.1, "a result-defining field")
    workers: int = param(0, "how the job runs", volatile=True)


class Counter:
    def __init__(self) -> None:
        self.value = torch.zeros(1)

    def state_dict(self) -> dict:
        return {"value": self.value.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def test_the_checkpointer_refuses_changed_fields_and_logs_volatile_ones(tmp_path, caplog):
    counter = Counter()
    counter.value += 3
    Checkpointer(tmp_path, Toy(), identity={"data": 10}).save(4, {"counter": counter})
    restored = Counter()
    with caplog.at_level(logging.INFO, logger="vimpac.common.checkpoint"):
        resumed = Checkpointer(tmp_path, Toy(workers=4), identity={"data": 10}).resume(
            {"counter": restored})
    assert resumed.step == 4 and float(restored.value) == 3.0
    assert any(RESUMED in r.message and "workers 0 -> 4" in r.message for r in caplog.records)
    with pytest.raises(CheckpointError, match=r"step-000000004\.pt: .*lr 0\.1 -> 0\.2"):
        Checkpointer(tmp_path, Toy(lr=0.2), identity={"data": 10}).resume({"counter": Counter()})
    with pytest.raises(CheckpointError, match="data 10 -> 11"):
        Checkpointer(tmp_path, Toy(), identity={"data": 11}).resume({"counter": Counter()})
    with pytest.raises(CheckpointError, match="holds no other state"):
        Checkpointer(tmp_path, Toy(), identity={"data": 10}).resume({"other": Counter()})


def test_a_field_newer_than_the_checkpoint_counts_as_unchanged_at_its_default(tmp_path):
    @dataclasses.dataclass
    class Old:
        workers: int = param(0, "how the job runs", volatile=True)

    Checkpointer(tmp_path, Old()).save(1, {"counter": Counter()})
    assert Checkpointer(tmp_path, Toy()).resume({"counter": Counter()}).step == 1
    with pytest.raises(CheckpointError, match="lr 0.1 -> 0.3"):    # new field, not its default
        Checkpointer(tmp_path, Toy(lr=0.3)).resume({"counter": Counter()})


def test_the_tokenizer_trainer_resumes_through_it(tmp_path, caplog):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (24, 32, 32, 3), dtype=np.uint8)
    spec = TokenizerTrainSpec(codebook_size=16, channels=8, code_dim=8, image_size=32, steps=2,
                              batch_size=4, init_frames=16, checkpoint_every=1)
    train_tokenizer_on_frames(frames[:16], frames[16:], spec, tmp_path)
    with caplog.at_level(logging.INFO, logger="vimpac.common.checkpoint"):
        train_tokenizer_on_frames(frames[:16], frames[16:], dataclasses.replace(spec, steps=3),
                                  tmp_path)
    assert any(RESUMED in r.message and "steps 2 -> 3" in r.message for r in caplog.records)
    with pytest.raises(CheckpointError, match="code_dim 8 -> 4"):
        train_tokenizer_on_frames(frames[:16], frames[16:], dataclasses.replace(
            spec, steps=3, code_dim=4), tmp_path)


def test_pretraining_resumes_through_it(tmp_path, caplog):
    archive = write_token_archive(tmp_path / "arch", videos=16, grid=8, frames=(5, 9),
                                  codebook=64, per_shard=4)
    cfg = PretrainConfig(model="tiny", frames=5, grid=8, batch_size=4, micro_batch=4, steps=3,
                         num_workers=0, checkpoint_every=1, log_every=1, proj_hidden=16)
    run_pretrain([archive], cfg, tmp_path / "run", stop_after=1)
    with caplog.at_level(logging.INFO, logger="vimpac.common.checkpoint"):
        result = run_pretrain([archive], dataclasses.replace(cfg, log_every=2, precision="fp32"),
                              tmp_path / "run")
    assert result.step == 3
    assert any(RESUMED in r.message and "log_every 1 -> 2" in r.message for r in caplog.records)
    with pytest.raises(CheckpointError, match="temperature 0.2 -> 0.5"):
        run_pretrain([archive], dataclasses.replace(cfg, steps=4, temperature=0.5),
                     tmp_path / "run")


def test_fine_tuning_resumes_through_it(tmp_path, caplog):
    labels = [i % 2 for i in range(16)]
    splits = [["train"] if i < 12 else ["test"] for i in range(16)]
    archive = write_token_archive(tmp_path / "arch", videos=16, grid=4, frames=(4, 8),
                                  codebook=64, per_shard=8, labels=labels, splits=splits)
    _label_archive(archive)
    cfg = FinetuneConfig(frames=4, grid=4, fps=4.0, epochs=2, batch_size=4, micro_batch=4,
                         num_workers=0, val_fraction=0.0, seed=0)
    kw = {"model_preset": "tiny", "splits": ("train", "test")}
    run_finetune(archive, cfg, tmp_path / "run", stop_after=2, **kw)
    with caplog.at_level(logging.INFO, logger="vimpac.common.checkpoint"):
        summary = run_finetune(archive, dataclasses.replace(cfg, micro_batch=2), tmp_path / "run",
                               **kw)
    assert summary["complete"]
    assert any(RESUMED in r.message and "micro_batch 4 -> 2" in r.message for r in caplog.records)
    with pytest.raises(CheckpointError, match="label_smoothing 0.0 -> 0.1"):
        run_finetune(archive, dataclasses.replace(cfg, label_smoothing=0.1), tmp_path / "run",
                     **kw)


def _label_archive(root: Path) -> None:
    import json

    (manifest,) = (root / "manifests").glob("*.json")
    data = json.loads(manifest.read_text())
    data["settings"]["dataset"] = {"name": "list", "root": str(root), "classes": ["a", "b"]}
    manifest.write_text(json.dumps(data))
