"""The pre-training data order: random clip reads, mixing by weight, global shuffle, elastic resume.

Samples are compared by their global position, their video and the bytes of their tokens, so
"the same sequence" below means the same video and the same clips at every position.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_token_archive

from vimpac.archive import Archive, ArchiveError
from vimpac.archive.formats import wds
from vimpac.common.checkpoint import load_checkpoint
from vimpac.common.config import ConfigError
from vimpac.common.workers import worker_options
from vimpac.config import PretrainConfig, SourceConfig, load_pipeline
from vimpac.pretrain.clips import gather_pairs
from vimpac.pretrain.data import ClipStream, StreamSpec
from vimpac.pretrain.mixing import BLOCK, Interleave, Source, SourceError, hashed, shuffle_quality
from vimpac.pretrain.train import PretrainError, run_pretrain

PAD = 65
FORMATS = ("zarr", "webdataset")


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {"a": write_token_archive(root / "a", videos=30, frames=(2, 14), per_shard=4),
            "b": write_token_archive(root / "b", videos=12, frames=(3, 9), per_shard=5, seed=1),
            "c": write_token_archive(root / "c", videos=7, frames=(4, 6), per_shard=3, seed=2)}


def spec(**kw) -> StreamSpec:
    return StreamSpec(**{**dict(frames=3, grid=8, batch_size=2, pad_id=PAD, seed=5,
                                shuffle_buffer=4, window=8), **kw})


def samples(batches) -> dict[int, tuple[int, bytes]]:
    """position -> (video, token bytes) of batches, refusing a position seen twice."""
    out: dict[int, tuple[int, bytes]] = {}
    for batch in batches:
        for pos, video, tokens in zip(batch["position"].tolist(), batch["video"].tolist(),
                                      batch["tokens"], strict=True):
            assert pos not in out, f"position {pos} delivered twice"
            out[pos] = (video, tokens.numpy().tobytes())
    return out


def take(it, n: int) -> list:
    return [next(it) for _ in range(n)]


def run(stream_of, world: int, workers: int, micro_batches: int) -> dict[int, tuple[int, bytes]]:
    """What ``world`` processes with ``workers`` DataLoader workers each deliver in their first
    ``micro_batches`` micro-batches together (a worker's batches interleaved as DataLoader
    takes them)."""
    got = {}
    for rank in range(world):
        stream = stream_of(rank, world)
        its = [stream.batches(w, max(1, workers)) for w in range(max(1, workers))]
        batches = [next(its[j % len(its)]) for j in range(micro_batches // world)]
        got.update(samples(batches))
    return got


# ------------------------------------------------------------------------------- random reads

@pytest.mark.parametrize("fmt", FORMATS)
def test_random_clip_reads_equal_slices_of_the_whole_shard(archives, fmt):
    archive = Archive(archives["a"])
    view = archive.settings.view_names[0]
    for name in archive.shard_names():
        flat, offsets = archive.open_shard(name, fmt).read_all(view)
        reader = archive.open_shard(name, fmt)
        for i in range(len(offsets) - 1):
            video = flat[offsets[i]:offsets[i + 1]]
            for start, stop in ((0, None), (1, 4), (3, 9), (len(video) - 1, len(video) + 5),
                                (len(video) + 2, len(video) + 4)):
                np.testing.assert_array_equal(reader.read(i, view, start, stop),
                                              video[start:stop])


def test_a_reopened_unchanged_tar_is_not_walked_again_but_a_rewritten_one_is(tmp_path,
                                                                            monkeypatch):
    root = write_token_archive(tmp_path / "a", videos=4, per_shard=4, formats=("webdataset",))
    archive = Archive(root)
    (name,) = archive.shard_names()
    calls = []
    real = wds.TarBytes.read
    monkeypatch.setattr(wds.TarBytes, "read", lambda self, *a: calls.append(a) or real(self, *a))
    archive.open_shard(name)
    walked = len(calls)
    assert walked >= 4 * 3                                # headers and each video's .json
    archive.open_shard(name)
    assert len(calls) == walked                           # the checked index was kept
    tar = root / "wds" / f"{name}.tar"
    tar.write_bytes(tar.read_bytes())                     # same bytes, a new file
    Archive(root).open_shard(name, verify=False)
    assert len(calls) == 2 * walked


@pytest.mark.parametrize("fmt", FORMATS)
def test_global_samples_follow_the_clip_rules_on_the_whole_shard(archives, fmt):
    stream = ClipStream([archives["a"], archives["b"]], spec(fmt=fmt, grid=6))
    reader = stream.global_reader
    positions = np.arange(40, 70)
    pairs, uids = reader.read(positions)
    draws = reader.clip_draws(uids, [hashed(k, positions) for k in reader.keys])
    for j, uid in enumerate(uids.tolist()):
        ref = stream.catalog.shards[int(stream.catalog.shard_of(np.array([uid]))[0])]
        arch = stream.archives[ref.archive]
        flat, offsets = arch.open_shard(ref.name, fmt).read_all(stream.view)
        one = dataclasses.replace(draws, s1=draws.s1[j:j + 1], s2=draws.s2[j:j + 1],
                                  y=draws.y[j:j + 1], x=draws.x[j:j + 1])
        want = gather_pairs(flat, offsets, np.array([uid - ref.first]), one, stream.spec)
        np.testing.assert_array_equal(pairs[j], want[0])
    assert (pairs == PAD).any()                           # short videos are padded


@pytest.mark.parametrize("shuffle", ["global", "shard"])
def test_zarr_and_webdataset_give_the_same_sequence(archives, shuffle):
    a = run(lambda r, w: ClipStream([archives["a"]], spec(fmt="zarr", shuffle=shuffle), r, w),
            1, 0, 20)
    b = run(lambda r, w: ClipStream([archives["a"]], spec(fmt="webdataset", shuffle=shuffle),
                                    r, w), 1, 0, 20)
    assert a == b


# ----------------------------------------------------------------------------- global order

def test_one_epoch_of_the_global_order_visits_every_video_of_every_archive_once(archives):
    paths = [archives["a"], archives["b"], archives["c"]]
    stream = ClipStream(paths, spec(batch_size=7))       # 49 videos: seven batches per epoch
    got = samples(take(stream.batches(), 14))
    first, second = ([got[p][0] for p in range(e * 49, (e + 1) * 49)] for e in (0, 1))
    assert sorted(first) == sorted(second) == list(range(49))
    assert first != second                                # each epoch its own permutation
    assert stream.source_epochs(49 + 10) == pytest.approx({n: 59 / 49 for n in "abc"})


@pytest.mark.parametrize("shuffle", ["global", "shard"])
def test_the_global_sequence_is_the_same_under_1_2_3_ranks_and_0_1_2_workers(archives,
                                                                              shuffle):
    paths = [archives["a"], archives["b"]]

    def stream_of(rank, world):          # streams=4: the shard-buffer order of a 4-reader run
        return ClipStream(paths, spec(shuffle=shuffle), rank, world, streams=4)

    reference = run(stream_of, 1, 0, 36)
    assert sorted(reference) == list(range(72))
    for world in (1, 2, 3):
        for workers in (0, 1, 2):
            assert run(stream_of, world, workers, 36) == reference, (world, workers)


@pytest.mark.parametrize(("shuffle", "micro"), [("global", 2), ("shard", 2), ("global", 3),
                                                ("shard", 3)])
def test_resuming_2_ranks_into_3_continues_the_sequence_exactly(archives, shuffle, micro):
    paths = [Source(str(archives["a"]), 0.7), Source(str(archives["b"]), 0.3, True)]
    reference = run(lambda r, w: ClipStream(paths, spec(shuffle=shuffle), r, w, streams=2),
                    1, 0, 60)
    before = run(lambda r, w: ClipStream(paths, spec(shuffle=shuffle), r, w, streams=2),
                 2, 0, 24)                                 # 4 updates of 12 samples
    start = 24 * 2
    state = ClipStream(paths, spec(shuffle=shuffle), 0, 2, streams=2).state(start)
    after = run(lambda r, w: ClipStream(paths, spec(shuffle=shuffle, batch_size=micro), r, w,
                                        start=start, streams=state["streams"],
                                        block=state["block"], mode=state["mode"]),
                3, 2, (120 - start) // micro)              # micro-batches of 2, or now of 3
    assert sorted(before) == list(range(start))
    assert sorted(after) == list(range(start, 120))       # nothing repeated, nothing skipped
    assert {**before, **after} == reference


def test_a_dataloader_with_worker_processes_delivers_the_in_process_sequence(archives):
    from torch.utils.data import DataLoader

    stream = ClipStream([archives["a"]], spec(), rank=1, world=2, start=8)
    loader = DataLoader(stream, batch_size=None, num_workers=2,
                        **worker_options(2))
    got = samples(take(iter(loader), 6))
    workers = [stream.batches(0, 2), stream.batches(1, 2)]      # taken in turn, as DataLoader does
    assert got == samples(next(workers[j % 2]) for j in range(6))
    assert sorted(got) == [p for u in range(4, 16) if u % 2 for p in (2 * u, 2 * u + 1)]


def test_shuffle_quality_is_better_in_global_mode_than_with_a_shard_buffer(tmp_path):
    root = write_token_archive(tmp_path / "q", videos=128, per_shard=16, frames=(3, 5))
    quality = {}
    for shuffle in ("global", "shard"):
        stream = ClipStream([root], spec(batch_size=16, shuffle=shuffle, shuffle_buffer=32,
                                         window=128))
        uids = np.concatenate([b["video"].numpy() for b in take(stream.batches(), 32)])
        quality[shuffle] = shuffle_quality(stream.shard_of(uids), 16)
    assert quality["global"] < 1.25 < 1.5 < quality["shard"], quality


def test_shuffle_quality_is_one_for_a_random_order_and_large_for_shards_in_turn():
    rng = np.random.default_rng(0)
    shards = np.repeat(np.arange(16), 64)
    assert shuffle_quality(rng.permutation(shards), 32) == pytest.approx(1.0, abs=0.1)
    assert shuffle_quality(shards, 32) > 10


# ------------------------------------------------------------------------------------- mixing

def shares(pool: np.ndarray, pools: int) -> np.ndarray:
    return np.bincount(pool, minlength=pools) / len(pool)


def test_mixing_shares_hold_in_any_window_overall_and_per_rank():
    weights = np.array([0.6, 0.3, 0.1])
    mix = Interleave(weights, seed=3, shuffled=True)
    n = 120 * BLOCK
    pool, _ = mix.draws(np.arange(n))
    for start in range(0, n, 7 * BLOCK):                  # whole blocks: the exact quotas
        window = pool[start:start + 4 * BLOCK]
        assert np.abs(np.bincount(window, minlength=3) - len(window) * weights).max() <= 2
    rng = np.random.default_rng(0)
    for size in (64, 1000, 20000):                        # any window, overall and per rank
        tolerance = 4 * np.sqrt(weights * (1 - weights) / size) + 2 / size
        for world, micro in ((1, 1), (2, 4), (3, 8), (8, 2)):
            rank = int(rng.integers(world))
            mine = pool.reshape(-1, micro)[rank::world].ravel()
            start = int(rng.integers(len(mine) - size))
            assert (np.abs(shares(mine[start:start + size], 3) - weights) <= tolerance).all()


def test_unshuffled_interleave_keeps_every_window_within_two_samples():
    weights = np.array([0.5, 0.25, 0.125, 0.125])
    mix = Interleave(weights, seed=0, shuffled=False)
    pool, k = mix.draws(np.arange(3 * BLOCK))
    for size in (8, 100, 1000):
        counts = np.stack([np.convolve(pool == p, np.ones(size), "valid") for p in range(4)])
        assert np.abs(counts - size * weights[:, None]).max() <= 2
    for p in range(4):                                    # each pool's draws come in order
        assert (k[pool == p] == np.arange((pool == p).sum())).all()


def test_draw_counts_match_the_draws_at_any_position():
    for shuffled in (True, False):
        mix = Interleave([0.2, 0.5, 0.3], seed=1, shuffled=shuffled)
        pool, k = mix.draws(np.arange(3 * BLOCK + 77))
        for n in (0, 1, BLOCK - 1, BLOCK, 2 * BLOCK + 5, 3 * BLOCK + 77):
            assert mix.counts(n).tolist() == np.bincount(pool[:n], minlength=3).tolist()
        whole, drawn = pool[:3 * BLOCK], k[:3 * BLOCK]
        for p in range(3):                                # whole blocks use every draw once
            assert sorted(drawn[whole == p].tolist()) == list(range((whole == p).sum()))


def test_weighted_sources_are_drawn_by_weight_each_epoch_a_permutation(archives):
    sources = [Source(str(archives["a"]), 3.0), Source(str(archives["c"]), 1.0),
               Source(str(archives["b"]), 1.0, replacement=True)]
    stream = ClipStream(sources, spec(batch_size=5))
    got = samples(take(stream.batches(), 120))
    reader = stream.global_reader
    assert [got[p][0] for p in range(600)] == reader.uids(np.arange(600))[1].tolist()
    pool, uid = reader.uids(np.arange(BLOCK))             # one block: the exact quotas
    counts = np.bincount(pool, minlength=3)
    assert np.abs(counts / BLOCK - [0.6, 0.2, 0.2]).max() <= 1 / BLOCK
    _, k = stream.interleave.draws(np.arange(BLOCK))
    first = np.array([p.first for p in stream.pools])
    for p, size in ((0, 30), (1, 7)):                     # without replacement: whole epochs
        mine, draws = uid[pool == p] - first[p], k[pool == p]
        for epoch in range(counts[p] // size):
            assert sorted(mine[draws // size == epoch].tolist()) == list(range(size))
    replaced = uid[pool == 2][np.argsort(k[pool == 2])] - first[2]
    assert len(set(replaced[:12].tolist())) < 12          # with replacement: repeats
    assert np.bincount(replaced, minlength=12).min() > 0.5 * counts[2] / 12
    assert stream.source_epochs(BLOCK) == pytest.approx(
        {"a": counts[0] / 30, "c": counts[1] / 7, "b": counts[2] / 12})


def test_sources_must_all_have_weights_or_none_and_never_repeat(archives):
    a, b = str(archives["a"]), str(archives["b"])
    for bad, message in (([Source(a, 1.0), Source(b)], r"sources\[1\].*give every source"),
                         ([Source(a), Source(b, replacement=True)], "replacement needs"),
                         ([Source(a), Source(a + "/")], r"same archive as pretrain.sources\[0\]"),
                         ([Source(a, 1.0), Source(b, 1e-9)], "too small to be drawn")):
        with pytest.raises(SourceError, match=message):
            ClipStream(bad, spec())


def test_pretrain_sources_are_typed_and_errors_name_the_entry():
    cfg = load_pipeline("demo", overrides=[
        "pretrain.sources=[{path: /data/ht, weight: 0.6}, {path: s3://b/k400, weight: 0.4, "
        "replacement: true}]", "pretrain.shuffle=shard"])
    assert cfg.pretrain.sources == [SourceConfig("/data/ht", 0.6),
                                    SourceConfig("s3://b/k400", 0.4, True)]
    for text, message in (("[{path: /a, weight: -1}]", r"sources\[0\].weight = -1.0"),
                          ("[{path: /a, wieght: 1}]", r"sources\[0\].wieght: unknown key"),
                          ("[{path: /a, weight: 1}, {path: /b}]", "every source, or none"),
                          ("/a", "expected a list of mappings")):
        with pytest.raises(ConfigError, match=message):
            load_pipeline("demo", overrides=[f"pretrain.sources={text}"])


# ------------------------------------------------------------------------- corrupt shards

def test_a_corrupt_shard_in_global_mode_is_replaced_by_the_next_readable_one(archives, tmp_path,
                                                                           caplog):
    root = Path(shutil.copytree(archives["a"], tmp_path / "a"))
    bad = Archive(root).shard_names()[2]
    tar = root / "wds" / f"{bad}.tar"
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF
    tar.write_bytes(bytes(data))
    stop = ClipStream([root], spec(fmt="webdataset"))
    with pytest.raises(ArchiveError, match=bad):
        samples(take(stop.batches(), 15))
    skip = ClipStream([root], spec(fmt="webdataset", on_corrupt="skip"))
    with caplog.at_level(logging.WARNING, logger="vimpac.pretrain.data"):
        got = samples(take(skip.batches(), 15))
    assert sorted(got) == list(range(30))                 # every position still filled
    shards = skip.shard_of(np.array([v for v, _ in got.values()]))
    assert 2 not in shards.tolist() and (shards == 3).sum() > 1    # the next shard stands in
    assert sum("skipping corrupt shard" in r.message and bad in r.message
               for r in caplog.records) == 1


# --------------------------------------------------------------------------------- training

TINY = PretrainConfig(model="tiny", frames=5, grid=8, batch_size=8, micro_batch=2, steps=4,
                      num_workers=0, checkpoint_every=2, log_every=1, proj_hidden=32,
                      read_window=8)


def backbone(result) -> dict[str, torch.Tensor]:
    return torch.load(result.pretrained, weights_only=True)["backbone"]


def test_resume_with_other_dataloader_workers_is_bitwise_identical(archives, tmp_path):
    whole = run_pretrain([archives["a"]], TINY, tmp_path / "whole")
    run_pretrain([archives["a"]], TINY, tmp_path / "parts", stop_after=2)
    resumed = run_pretrain([archives["a"]], dataclasses.replace(TINY, num_workers=2),
                           tmp_path / "parts")
    a, b = backbone(whole), backbone(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = load_checkpoint(tmp_path / "parts" / "checkpoints" / "step-000000004.pt")["data"]
    assert state["samples"] == 4 * 8 and state["mode"] == "global" and state["block"] == 2
    assert state["source_epochs"] == {"a": 32 / 30}


def test_pretrain_reads_pretrain_sources_and_refuses_archives_given_twice(archives, tmp_path):
    cfg = dataclasses.replace(TINY, steps=2, sources=[
        SourceConfig(str(archives["a"]), 0.75), SourceConfig(str(archives["b"]), 0.25)])
    result = run_pretrain([], cfg, tmp_path / "mixed")
    assert result.step == 2
    lines = (tmp_path / "mixed" / "metrics.jsonl").read_text().splitlines()
    assert '"epochs/a"' in lines[-1] and '"epochs/b"' in lines[-1]
    with pytest.raises(PretrainError, match="archives given twice"):
        run_pretrain([archives["c"]], cfg, tmp_path / "twice")
    run_pretrain([archives["a"]], TINY, tmp_path / "plain", stop_after=1)
    with pytest.raises(SourceError, match=r"source 0 \(b\) has videos 12, the run was started "
                                          "with 30"):
        run_pretrain([archives["b"]], TINY, tmp_path / "plain")


@pytest.mark.slow
def test_training_resumed_on_3_processes_trains_on_exactly_the_uninterrupted_samples(tmp_path):
    """torchrun (gloo): 2 processes stop halfway, 3 processes finish; every update sees the
    samples of an uninterrupted 2-process run, and the first resumed step's loss is equal."""
    from benchmarks.resume_equivalence import (
        CONFIG,
        DRIVER,
        finish,
        losses,
        samples_by_step,
        torchrun,
    )

    archive = write_token_archive(tmp_path / "arch", videos=40, per_shard=8, frames=(4, 16),
                                  codebook=64)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    cfg = {**CONFIG, "steps": 4, "contrastive_weight": 0.0}
    finish(torchrun(archive, tmp_path / "whole", cfg, 2, driver=driver), "uninterrupted")
    finish(torchrun(archive, tmp_path / "elastic", cfg, 2, 2, driver=driver), "first half")
    finish(torchrun(archive, tmp_path / "elastic", cfg, 3, driver=driver), "resume on 3")
    whole, elastic = (samples_by_step(tmp_path / run, 12) for run in ("whole", "elastic"))
    assert whole == elastic and all(len(whole[s]) == 12 for s in range(1, 5))
    a, b = losses(tmp_path / "whole"), losses(tmp_path / "elastic")
    assert [a[s] for s in (1, 2)] == [b[s] for s in (1, 2)]
    assert abs(a[3] - b[3]) <= 1e-6 * abs(a[3])          # same weights, data, masks, dropout
    assert abs(a[4] - b[4]) <= 1e-4 * abs(a[4])          # gradients summed in another order


def test_pretrain_without_archives_or_sources_is_a_one_line_error(tmp_path):
    from click.testing import CliRunner

    from vimpac.cli import cli

    result = CliRunner().invoke(cli, ["pretrain", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "no archives: give them on the command line or in pretrain.sources" in result.output


@pytest.mark.parametrize(("key", "value"), [("mode", "random"), ("samples", -8), ("block", 0),
                                            ("sources", "a")])
def test_a_checkpoint_with_a_bad_data_position_is_refused_naming_the_key(archives, tmp_path, key,
                                                                         value):
    from vimpac.common.checkpoint import save_checkpoint

    run_pretrain([archives["a"]], TINY, tmp_path / "run", stop_after=2)
    path = tmp_path / "run" / "checkpoints" / "step-000000002.pt"
    state = load_checkpoint(path)
    state["data"][key] = value
    save_checkpoint(path, state)
    with pytest.raises(PretrainError, match=f"step-000000002.pt: data.{key} = "):
        run_pretrain([archives["a"]], TINY, tmp_path / "run")
