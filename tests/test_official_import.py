"""Importing the authors' released weights: the official model's outputs are reproduced, and a file
that is not such a checkpoint is refused with one line (exit 2).

Fixtures (``tests/fixtures/official-vimpac/{normal,halved}``, see the README there): checkpoints
written by the official code at reduced size, with its outputs on fixed tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from vimpac.archive import ArchiveSettings, make_views
from vimpac.cli import cli
from vimpac.common.checkpoint import CheckpointError
from vimpac.config import FinetuneConfig
from vimpac.finetune.train import build_model
from vimpac.pretrain.export import load_pretrained, load_pretrained_model
from vimpac.pretrain.model import PRESETS
from vimpac.pretrain.official import Inferred, import_official, infer, read_official
from vimpac.tokenize.dalle import DalleConfig, DalleTokenizer
from vimpac.tokenize.tokenizer import save_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "official-vimpac"
MASK = 8196


@pytest.fixture(scope="module")
def dalle_tokenizer_dir(tmp_path_factory) -> Path:
    """A (small, random) tokenizer of the DALL-E kind with its 8192 codes."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tok") / "dalle"
    save_tokenizer(DalleTokenizer(DalleConfig(codebook_size=8192, channels=8,
                                              blocks_per_group=1)), path)
    return path


@pytest.mark.parametrize("layout", ["normal", "halved"])
def test_the_imported_model_reproduces_the_official_outputs(layout, tmp_path):
    record = import_official(FIXTURES / layout / "classifier.pt", tmp_path,
                             tokenizer_fingerprint="dalle-fp")
    model, meta = load_pretrained_model(tmp_path / "pretrained.pt")
    expected = np.load(FIXTURES / layout / "expected.npz")
    tokens = torch.from_numpy(expected["tokens"])
    assert (tokens == MASK).any() and (tokens == model.config.pad_id).any()
    with torch.no_grad():
        out = model(tokens, tokens == MASK)
        _, hidden = model.backbone(tokens)
    got = {"cls": out["cls"], "hidden": hidden, "projection": out["proj"],
           "mlm_logits_at_mask": out["mlm_logits"]}
    for name, value in got.items():
        want = torch.from_numpy(expected[name])
        assert value.shape == want.shape, name
        torch.testing.assert_close(value, want, rtol=0, atol=1e-5, msg=name)
    inferred = record["inferred"]
    assert (inferred["heads"], inferred["heads_rule"]) == (2, "args.txt beside the file")
    assert inferred["attention_dim"] == (32 if layout == "halved" else 64)
    assert inferred["mlp_dim"] == (128 if layout == "halved" else 256)
    assert inferred["proj_layers"] == (3 if layout == "halved" else 2)
    assert (inferred["layout"], inferred["frames"], inferred["grid"]) == ("T,H|W", 5, [8, 8])
    digest = hashlib.sha256((FIXTURES / layout / "classifier.pt").read_bytes()).hexdigest()
    assert meta["provenance"]["sha256"] == record["sha256"] == digest
    assert meta["tokenizer_fingerprint"] == "dalle-fp" and meta["codebook_size"] == 8192
    assert json.loads((tmp_path / "import.json").read_text())["sha256"] == digest


def test_the_released_sizes_are_recognised_with_the_official_head_rule():
    for preset, proj in (("small", (2, 2048)), ("large-half", (3, 4096))):
        config = PRESETS[preset]
        with torch.device("meta"):
            state = official_state(config, *proj)
        inferred = infer(state, f"{preset}.pt")
        assert inferred.preset() == preset and inferred.heads_rule.startswith("hid_dim // 64")
        assert (inferred.proj_layers, inferred.proj_hidden) == proj


def official_state(config, proj_layers: int, proj_hidden: int) -> dict[str, torch.Tensor]:
    """Shapes of an official state dict for ``config`` (values irrelevant)."""
    d, v, a = config.dim, config.vocab_size, config.attention_dim
    pos = "backbone.positional_embedding."
    state = {"backbone.embedding.weight": torch.empty(v, d), "backbone.cls_param": torch.empty(d),
             pos + "cls_pos_embedding": torch.empty(1, d), "backbone.ln_pre.weight": torch.empty(d),
             pos + "temporal_pos_embedding": torch.empty(config.frames, d),
             pos + "height_pos_embedding": torch.empty(config.height, d),
             pos + "width_pos_embedding": torch.empty(config.width, d)}
    for i in range(config.layers):
        block = f"backbone.transformer.resblocks.{i}"
        for j, branches in enumerate((1, 2)):
            for k in range(branches):
                state[f"{block}.attention_blocks.{j}.attentions.{k}.attention.query.weight"] = \
                    torch.empty(a // branches, d)
        state[f"{block}.mlp.c_fc.weight"] = torch.empty(config.mlp_dim, d)
    for i in range(proj_layers):
        rows = 256 if i == proj_layers - 1 else proj_hidden
        state[f"cls_head.mlp.linear_{i}.weight"] = torch.empty(rows, d if i == 0 else proj_hidden)
    return state


def test_an_imported_model_starts_fine_tuning_with_positions_interpolated(tmp_path):
    import_official(FIXTURES / "halved" / "classifier.pt", tmp_path, tokenizer_fingerprint="fp")
    settings = ArchiveSettings("fp", 8192, (16, 16), 2.0, 128, 128, make_views([1.0], ["center"],
                               False), ["zarr"])
    cfg = FinetuneConfig(frames=10, grid=16)
    model = build_model(settings, 7, cfg, str(tmp_path / "pretrained.pt"), "tiny", tmp_path)
    backbone, _ = load_pretrained(tmp_path / "pretrained.pt")
    assert model.backbone.pos_t.shape == (10, 64) and model.backbone.pos_h.shape == (16, 64)
    assert torch.equal(model.backbone.token_embed.weight, backbone.token_embed.weight)
    with pytest.raises(Exception, match="tokenizer"):
        build_model(dataclasses.replace(settings, tokenizer_fingerprint="other"), 7, cfg,
                    str(tmp_path / "pretrained.pt"), "tiny", tmp_path)


def _run(cli_runner, *args):
    return cli_runner.invoke(cli, ["pretrain", "import-official", *map(str, args)])


def test_the_command_imports_and_names_the_file(cli_runner, dalle_tokenizer_dir, tmp_path):
    result = _run(cli_runner, FIXTURES / "normal" / "classifier.pt", "--out", tmp_path / "out",
                  "--tokenizer", dalle_tokenizer_dir)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "pretrained.pt").is_file() and "pretrained.pt" in result.output
    _, meta = load_pretrained(tmp_path / "out" / "pretrained.pt")
    stored = json.loads((dalle_tokenizer_dir / "config.json").read_text())["fingerprint"]
    assert meta["tokenizer_fingerprint"] == stored and meta["has_heads"]


class _RunsCode:
    def __reduce__(self):
        return (print, ("code ran while loading",))


def _bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what the one-line error must say)."""
    source = FIXTURES / "normal" / "classifier.pt"
    state = read_official(source)
    files: dict[str, tuple[Path, str]] = {}

    def save(name: str, obj, match: str) -> None:
        path = folder / name / "classifier.pt"
        path.parent.mkdir(parents=True)
        torch.save(obj, path)
        shutil.copyfile(FIXTURES / "normal" / "args.txt", path.with_name("args.txt"))  # 2 heads
        files[name] = (path, match)

    save("foreign", {"conv.weight": torch.zeros(3, 3)}, "no backbone.embedding.weight")
    save("not-a-state-dict", [torch.zeros(1)], "state dict of tensors")
    wrong = dict(state)
    wrong["backbone.transformer.resblocks.1.mlp.c_fc.weight"] = torch.zeros(200, 64)
    save("wrong-shape", wrong, "resblocks.1|layers.1.mlp.fc1")
    untied = dict(state)
    untied["mlm_head.decoder.weight"] = torch.zeros_like(state["mlm_head.decoder.weight"])
    save("untied", untied, "not tied")
    save("runs-code", {"backbone.embedding.weight": _RunsCode()}, "not a loadable")
    truncated = folder / "truncated" / "classifier.pt"
    truncated.parent.mkdir(parents=True)
    truncated.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    files["truncated"] = (truncated, "not a loadable")
    contradicting = folder / "args" / "classifier.pt"
    contradicting.parent.mkdir(parents=True)
    shutil.copyfile(source, contradicting)
    (contradicting.parent / "args.txt").write_text("{'hid_dim': 512, 'layers': 2}\n")
    files["args-txt"] = (contradicting, "hid_dim = 512")
    return files


@pytest.mark.parametrize("name", ["foreign", "not-a-state-dict", "wrong-shape", "untied",
                                  "runs-code", "truncated", "args-txt"])
def test_a_file_that_is_not_an_official_checkpoint_is_refused_in_one_line(
        name, cli_runner, dalle_tokenizer_dir, tmp_path, capsys):
    path, match = _bad_files(tmp_path)[name]
    result = _run(cli_runner, path, "--out", tmp_path / "out", "--tokenizer", dalle_tokenizer_dir)
    assert result.exit_code == 2, result.output
    line = " ".join(result.output.split())
    assert "error:" in line and "Traceback" not in result.output
    assert any(part in line for part in match.split("|")), line
    assert str(path.name) in line
    assert "code ran" not in result.output + capsys.readouterr().out
    assert not (tmp_path / "out" / "pretrained.pt").exists()


def test_a_tokenizer_other_than_dalle_is_refused(cli_runner, tiny_tokenizer, tmp_path):
    result = _run(cli_runner, FIXTURES / "normal" / "classifier.pt", "--out", tmp_path / "out",
                  "--tokenizer", tiny_tokenizer)
    assert result.exit_code == 2 and "DALL-E" in result.output


def test_inferred_record_is_plain_data():
    state = read_official(FIXTURES / "halved" / "classifier.pt")
    inferred = infer(state, "x", heads=2)
    assert isinstance(inferred, Inferred) and json.loads(json.dumps(inferred.record()))
    with pytest.raises(CheckpointError, match="--heads"):
        infer(state, "x", heads=3)


def test_the_from_official_recipe_fine_tunes_the_imported_weights_end_to_end(
        tmp_path, dalle_tokenizer_dir):
    """``ucf101-from-official`` on a small list dataset: the pretrain stage imports the official
    fixture under the pipeline's DALL-E tokenizer, fine-tuning starts from it, evaluation tests
    ``final.pt`` (tiny sizes; the recipe's own settings are the paper's)."""
    from conftest import make_test_video

    from vimpac.common.config import PACKAGED_CONFIG
    from vimpac.config import load_pipeline
    from vimpac.pipeline import run_pipeline

    root = tmp_path / "data"
    (root / "videos").mkdir(parents=True)
    for i in range(6):
        make_test_video(root / "videos" / f"c{i}.mp4", seconds=2.5, fps=4, size=(64, 64),
                        source="testsrc2" if i % 2 else "mandelbrot")
    (root / "classes.txt").write_text("a\nb\n")
    (root / "train.txt").write_text("".join(f"videos/c{i}.mp4 {i % 2}\n" for i in range(4)))
    (root / "val.txt").write_text("".join(f"videos/c{i}.mp4 {i % 2}\n" for i in (4, 5)))
    official = FIXTURES / "normal" / "classifier.pt"
    cfg = load_pipeline("ucf101-from-official", PACKAGED_CONFIG, [
        f"data.finetune_dataset=list:{root}", "tokenizer.source=path",
        f"tokenizer.path={dalle_tokenizer_dir}", f"pretrain.official_checkpoint={official}",
        "tokenize.shorter_side=64", "tokenize.size=64", "tokenize.decode_workers=0",
        "tokenize.batch_frames=16", "finetune.frames=5", "finetune.grid=8", "finetune.epochs=2",
        "finetune.batch_size=4", "finetune.micro_batch=4", "finetune.num_workers=0",
        "finetune.val_fraction=0", "finetune.view_scales=[1.0]", "finetune.view_crops=[center]",
        "finetune.view_hflip=false", "evaluate.test_clips=2", "evaluate.test_crops=[center]"])
    outcomes = {o.name: o for o in run_pipeline(cfg, tmp_path / "runs")}
    assert "tokens-pretrain" not in outcomes
    imported = outcomes["pretrain"]
    assert imported.result["sha256"] == hashlib.sha256(official.read_bytes()).hexdigest()
    _, meta = load_pretrained(imported.path / "pretrained.pt")
    stored = json.loads((dalle_tokenizer_dir / "config.json").read_text())["fingerprint"]
    assert meta["tokenizer_fingerprint"] == stored
    assert outcomes["finetune"].result["complete"]
    evaluated = outcomes["evaluate"].result
    assert evaluated["checkpoint_kind"] == "final" and evaluated["videos"] == 2
    assert evaluated["split"] == "val"
    probed = outcomes["probes"].result             # the frozen imported backbone, not final.pt
    assert probed["checkpoint"] == str(imported.path / "pretrained.pt")
    assert set(probed["time_reversal"]["backbones"]) == {"pre-trained", "random init"}
    assert "## Time reversal (a diagnostic)" in (outcomes["report"].path / "report.md").read_text()
    report = (outcomes["report"].path / "report.md").read_text()
    assert "final.pt: the last update" in report and "imported weights" in report


def test_mangled_official_state_dicts_are_imported_or_refused_never_crash():
    """Dropped, renamed, reshaped or extra tensors: a fitting model, or a CheckpointError."""
    import random

    from vimpac.pretrain.official import convert

    base = read_official(FIXTURES / "halved" / "classifier.pt")
    rng = random.Random(0)
    outcomes = {"imported": 0, "refused": 0}
    for _ in range(150):
        state = dict(base)
        for _ in range(rng.randint(1, 3)):
            key = rng.choice(sorted(state))
            op = rng.choice(["drop", "reshape", "flatten", "rename", "extra"])
            if op == "drop":
                state.pop(key)
            elif op == "reshape" and state[key].dim():
                state[key] = torch.zeros(*[max(1, s + rng.choice([-1, 1]))
                                           for s in state[key].shape])
            elif op == "flatten":
                state[key] = torch.zeros(3)
            elif op == "rename":
                state[key.replace("0", "7", 1)] = state.pop(key)
            elif op == "extra":
                state["backbone.extra.weight"] = torch.zeros(2)
        try:
            convert(state, "mangled.pt", heads=2)
            outcomes["imported"] += 1
        except CheckpointError as exc:
            assert "mangled.pt" in str(exc) and "\n" not in str(exc)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 100
