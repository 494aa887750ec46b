"""Pre-training: the clip stream, exact resume, multi-process gloo, refusing bad archives."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_token_archive
from torch.utils.data import DataLoader

from vimpac.archive import ArchiveError
from vimpac.common.checkpoint import CheckpointError
from vimpac.common.distributed import DistInfo
from vimpac.common.workers import worker_options, worker_start_method
from vimpac.config import PretrainConfig
from vimpac.pretrain.data import ClipStream, Source, StreamSpec, sample_clip_pairs
from vimpac.pretrain.train import Plan, PretrainError, build_loader, run_pretrain

PAD = 65


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return write_token_archive(tmp_path_factory.mktemp("a") / "arch", videos=24, grid=8,
                               frames=(2, 14), codebook=64, per_shard=5)


def spec(**kw):
    return StreamSpec(**{**dict(frames=5, grid=8, batch_size=4, pad_id=PAD, seed=3,
                                shuffle_buffer=8), **kw})


def take(loader, n):
    it = iter(loader)
    out = [next(it)["tokens"] for _ in range(n)]
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:       # stop DataLoader workers now, not in a later garbage collection
        shutdown()
    return out


def test_stream_shapes_pad_and_determinism(archive):
    batches = take(ClipStream([archive], spec()), 6)
    assert batches[0].shape == (4, 2, 5, 8, 8) and batches[0].dtype == torch.int64
    assert any((b == PAD).any() for b in batches)          # short videos are right-padded
    again = take(ClipStream([archive], spec()), 6)
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))
    other = take(ClipStream([archive], spec(seed=4)), 6)
    assert not all(torch.equal(a, b) for a, b in zip(batches, other, strict=True))


def test_zarr_and_webdataset_streams_are_identical(archive):
    a = take(ClipStream([archive], spec(fmt="zarr")), 8)
    b = take(ClipStream([archive], spec(fmt="webdataset")), 8)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_position_gives_the_same_batches(archive, workers):
    def loader(start):
        ds = ClipStream([archive], spec(), start=start * 4)
        return DataLoader(ds, batch_size=None, num_workers=workers,
                          **worker_options(workers))
    full = take(loader(0), 12)                               # crosses an epoch boundary
    resumed = take(loader(5), 7)
    assert all(torch.equal(a, b) for a, b in zip(full[5:], resumed, strict=True))


def test_loader_workers_start_from_a_forkserver_never_spawned():
    """A spawned worker can die of SIGABRT in its interpreter shutdown (vimpac.common.workers)."""
    assert worker_start_method(0) is None                          # in-process: no workers
    assert worker_start_method(2) == "forkserver"
    assert worker_start_method(2, fork_safe=True) is None          # the platform's fork
    assert worker_options(0) == {"multiprocessing_context": None, "worker_init_fn": None}


class EnvironmentOf(torch.utils.data.IterableDataset):
    """The values of some environment variables where the dataset is iterated."""

    def __init__(self, names):
        self.names = names

    def __iter__(self):
        return iter([os.environ.get(name) for name in self.names])


def test_forkserver_workers_see_the_environment_of_the_moment_their_loader_starts(
        monkeypatch):
    started = DataLoader(range(2), batch_size=1, num_workers=1, **worker_options(1))
    assert [int(x) for x in started] == [0, 1]          # the forkserver runs from here on
    monkeypatch.setenv("VIMPAC_TEST_SET_LATER", "set after the forkserver started")
    monkeypatch.delenv("HOME", raising=False)
    loader = DataLoader(EnvironmentOf(["VIMPAC_TEST_SET_LATER", "HOME"]), batch_size=None,
                        num_workers=1, **worker_options(1))
    assert list(loader) == ["set after the forkserver started", None]


def test_the_pretraining_loader_starts_its_workers_from_a_forkserver(archive):
    cfg = dataclasses.replace(PretrainConfig(), num_workers=2, frames=5, grid=8, micro_batch=4,
                              batch_size=4)
    loader = build_loader([Source(str(archive))], cfg, Plan.build(cfg, 1),
                          DistInfo(0, 1, 0, torch.device("cpu")), PAD, 2.0, {"samples": 0})
    assert loader.num_workers == 2
    assert loader.multiprocessing_context.get_start_method() == "forkserver"


def test_ranks_see_disjoint_videos(archive):
    seen = []
    for rank in (0, 1):
        ds = ClipStream([archive], spec(batch_size=1, shuffle_buffer=1), rank=rank, world=2)
        it = ds.batches()
        seen.append({next(it)["tokens"][0, 0].numpy().tobytes() for _ in range(6)})
    assert not seen[0] & seen[1]


def starts_of(length, frames, max_distance, draws, rng):
    """Clip starts drawn by sample_clip_pairs for one video whose frame f holds the value f."""
    flat = np.broadcast_to(np.arange(length, dtype=np.uint16)[:, None, None], (length, 4, 4))
    pairs = sample_clip_pairs(np.ascontiguousarray(flat), np.array([0, length]),
                              np.zeros(draws, dtype=np.int64), rng,
                              spec(frames=frames, grid=4, max_distance=max_distance))
    return pairs[:, :, 0, 0, 0].astype(int)                           # [draws, 2]


def test_clip_sampling_rules():
    rng = np.random.default_rng(0)
    starts = starts_of(20, 5, 0, 2000, rng)
    assert set(starts.ravel()) == set(range(16))                      # uniform over all starts
    near = starts_of(100, 5, 3, 500, rng)
    assert np.abs(near[:, 0] - near[:, 1]).max() <= 3
    video = np.arange(3 * 12 * 12, dtype=np.uint16).reshape(3, 12, 12)
    (pair,) = sample_clip_pairs(video, np.array([0, 3]), np.array([0]), rng, spec(grid=8))
    assert pair.shape == (2, 5, 8, 8) and (pair[:, 3:] == PAD).all()   # crop 12->8, pad 3->5


def test_refuses_mixed_tokenizers_and_small_vocab(tmp_path, archive):
    other = write_token_archive(tmp_path / "other", fingerprint="another-tokenizer")
    with pytest.raises(ArchiveError, match="other: tokenizer another-toke differs from .*arch"):
        ClipStream([archive, other], spec())
    big = write_token_archive(tmp_path / "big", codebook=1000)
    cfg = PretrainConfig(model="tiny", frames=5, grid=8, batch_size=4, micro_batch=4, steps=1,
                         num_workers=0, init_from=str(tmp_path / "missing.pt"))
    with pytest.raises(Exception, match="missing.pt"):
        run_pretrain([big], cfg, tmp_path / "out")
    with pytest.raises(PretrainError, match="multiple of"):
        run_pretrain([archive], dataclasses.replace(cfg, micro_batch=3, init_from=""),
                     tmp_path / "out2")


TINY = PretrainConfig(model="tiny", frames=5, grid=8, batch_size=8, micro_batch=4, steps=6,
                      num_workers=0, checkpoint_every=2, log_every=1, proj_hidden=32, lr=1e-3,
                      shuffle_buffer=8)


def test_stop_and_resume_equals_uninterrupted(archive, tmp_path):
    whole = run_pretrain([archive], TINY, tmp_path / "whole")
    run_pretrain([archive], TINY, tmp_path / "parts", stop_after=3)
    resumed = run_pretrain([archive], TINY, tmp_path / "parts")
    assert whole.step == resumed.step == 6
    a = torch.load(whole.pretrained, weights_only=True)["backbone"]
    b = torch.load(resumed.pretrained, weights_only=True)["backbone"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = (tmp_path / "parts" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6                                    # no duplicated metric lines
    logged = [json.loads(line) for line in lines]
    assert all(0.0 <= m.get("mlm_acc_moving", 0.0) <= 1.0 for m in logged)
    assert any("mlm_acc_moving" in m for m in logged)


def test_resume_with_other_settings_is_refused(archive, tmp_path):
    run_pretrain([archive], TINY, tmp_path / "run", stop_after=2)
    with pytest.raises(CheckpointError, match="lr 0.001 -> 0.01"):
        run_pretrain([archive], dataclasses.replace(TINY, lr=1e-2), tmp_path / "run")


def test_two_process_gloo_run(archive, tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(
        "import sys\n"
        "from vimpac.pretrain.config import PretrainConfig\n"
        "from vimpac.pretrain.train import run_pretrain\n"
        "cfg = PretrainConfig(model='tiny', frames=5, grid=8, batch_size=8, micro_batch=2,\n"
        "                     steps=2, num_workers=0, proj_hidden=32, shuffle_buffer=4)\n"
        "r = run_pretrain([sys.argv[1]], cfg, sys.argv[2])\n"
        "sys.stdout.write(f'STEP {r.step}\\n')\n")     # one write: the ranks share one pipe
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(script), str(archive), str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("STEP 2") == 2
    assert Path(tmp_path / "o" / "pretrained.pt").exists()


@pytest.mark.parametrize("chunk_frames", [1, 4, 7, 64])
def test_whole_shard_fast_read_equals_zarr(tmp_path, chunk_frames):
    """read_all decodes the writer's layout itself; it must give exactly what zarr gives."""
    import zarr

    from vimpac.archive import FORMATS, Archive
    from vimpac.archive.formats import ShardSource
    from vimpac.archive.formats.zarr import ZarrShard

    root = write_token_archive(tmp_path / "a", videos=5, frames=(1, 13), per_shard=5)
    archive = Archive(root)
    name = archive.shard_names()[0]
    path = root / "zarr" / f"{name}.zarr"
    layout = dataclasses.replace(archive.layout(name, FORMATS["zarr"]),
                                 views=("s1_center", "other", "plain"))

    def open_shard() -> ZarrShard:      # the manifest of this test lists the two extra views
        return ZarrShard(ShardSource(str(path), lambda key: (path / key).read_bytes(),
                                     local=path), layout)

    group = zarr.open_group(str(path), mode="a")
    data = np.asarray(group["tokens/s1_center"][:])
    rewritten = group.create_array("tokens/other", shape=data.shape, dtype="uint16",
                                   chunks=(chunk_frames, 8, 8),
                                   shards=(chunk_frames * -(-len(data) // chunk_frames), 8, 8))
    rewritten[:] = data
    shard = open_shard()
    assert shard._offsets_direct() is not None and shard._group is None   # zarr never opened
    assert np.array_equal(shard.offsets, np.asarray(group["offsets"][:]))
    assert shard._read_all_direct("other") is not None
    assert np.array_equal(shard.read_all("other")[0], data)
    plain = group.create_array("tokens/plain", shape=data.shape, dtype="uint16",
                               chunks=(3, 8, 8))             # no sharding: zarr reads it
    plain[:] = data
    assert open_shard()._read_all_direct("plain") is None
    assert np.array_equal(open_shard().read_all("plain")[0], data)
