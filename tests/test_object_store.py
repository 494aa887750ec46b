"""Archives on object stores: a real S3 API on loopback (moto's server) and fsspec's memory://.

The S3 tests tokenize real videos into a bucket, verify it, stream pre-training batches and
fine-tuning items from it (through DataLoader worker processes too) and compare everything with
the same work on local disk.
"""

import dataclasses
import logging
import socket

import fsspec
import numpy as np
import pytest
import torch
from conftest import make_test_video, write_token_archive
from torch.utils.data import DataLoader

from vimpac.archive import Archive, ArchiveError, ChecksumError, read_tokens, verify
from vimpac.cli import cli
from vimpac.common import storage
from vimpac.common.storage import StorageError, location, redact
from vimpac.common.workers import worker_options
from vimpac.config import PretrainConfig, TokenizeConfig
from vimpac.finetune.data import TrainClips, clip_workers
from vimpac.pretrain.data import ClipStream, StreamSpec
from vimpac.pretrain.train import run_pretrain
from vimpac.tokenize.job import run_tokenize

SECRET = "vimpac-test-secret-3f9a1c"      # must never appear in logs or errors
BUCKET = "vimpac-test"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 with one bucket; credentials from the environment."""
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"AWS_ACCESS_KEY_ID": "vimpac-test-key", "AWS_SECRET_ACCESS_KEY": SECRET,
                           "AWS_DEFAULT_REGION": "us-east-1",
                           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
            mp.setenv(key, value)
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SHARED_CREDENTIALS_FILE"):
            mp.delenv(key, raising=False)
        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem().mkdir(BUCKET)
        yield f"s3://{BUCKET}"
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    sources = ["testsrc2", "mandelbrot", "rgbtestsrc", "smptebars", "testsrc"]
    for i, src in enumerate(sources):
        make_test_video(folder / f"clip{i}.mp4", seconds=1.0 + 0.5 * i, source=src)
    return folder


TOK = TokenizeConfig(fps=4.0, shorter_side=32, size=32, videos_per_shard=2, decode_workers=1,
                     batch_frames=16, device="cpu")
PRE = PretrainConfig(model="tiny", frames=3, grid=4, batch_size=4, micro_batch=4, steps=2,
                     num_workers=0, checkpoint_every=1, log_every=1, proj_hidden=32,
                     shuffle_buffer=4, seed=1, shuffle="shard")   # the same order wherever


def test_tokenize_into_s3_then_pretrain_from_it_equals_local(s3, videos, tiny_tokenizer,
                                                             tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    url = f"{s3}/archives/run1"
    remote = run_tokenize([str(videos)], tiny_tokenizer, url, TOK)
    local = run_tokenize([str(videos)], tiny_tokenizer, tmp_path / "local", TOK)
    assert remote.ok == local.ok == 5 and not remote.failures
    assert run_tokenize([str(videos)], tiny_tokenizer, url, TOK).nothing_to_do
    assert verify(url).ok and verify(url).shards_checked == 3

    on_s3, on_disk = Archive(url), Archive(tmp_path / "local")
    assert on_s3.shards.keys() == on_disk.shards.keys()
    assert {k: s.files for k, s in on_s3.shards.items()} == \
        {k: s.files for k, s in on_disk.shards.items()}          # same bytes, same checksums
    for key in on_disk.records:
        for fmt in ("zarr", "webdataset"):
            assert np.array_equal(read_tokens(url, key, fmt=fmt),
                                  read_tokens(tmp_path / "local", key, fmt=fmt))

    def batches(archive, fmt, shuffle, n=4):
        spec = StreamSpec(frames=3, grid=4, batch_size=2, pad_id=65, seed=2, fmt=fmt,
                          shuffle_buffer=4, shuffle=shuffle)
        stream = iter(ClipStream([archive], spec))
        return [next(stream)["tokens"] for _ in range(n)]

    for fmt in ("zarr", "webdataset"):
        for shuffle in ("shard", "global"):       # auto picks shard on S3, global on disk
            for a, b in zip(batches(url, fmt, shuffle), batches(tmp_path / "local", fmt, shuffle),
                            strict=True):
                assert torch.equal(a, b)

    runs = [run_pretrain([arch], PRE, tmp_path / name)
            for arch, name in ((url, "from-s3"), (tmp_path / "local", "from-disk"))]
    a, b = (torch.load(r.pretrained, weights_only=True)["backbone"] for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert runs[0].last_metrics["loss"] == runs[1].last_metrics["loss"]
    assert SECRET not in caplog.text


def test_dataloader_workers_stream_from_s3(s3, tmp_path):
    """Worker processes (started from a forkserver, as every loader of an object store) reopen
    the store."""
    labels, splits = [i % 3 for i in range(8)], [["train"]] * 8
    url = write_token_archive(f"{s3}/archives/labelled", videos=8, labels=labels, splits=splits,
                              per_shard=3)
    here = write_token_archive(tmp_path / "labelled", videos=8, labels=labels, splits=splits,
                               per_shard=3)

    spec = StreamSpec(frames=4, grid=8, batch_size=2, pad_id=65, seed=0, shuffle_buffer=4,
                      shuffle="shard")                    # auto picks global on a local disk

    def stream(archive):
        loader = DataLoader(ClipStream([archive], spec), batch_size=None, num_workers=1,
                            **worker_options(1))
        it = iter(loader)
        return [next(it)["tokens"] for _ in range(3)]

    assert all(torch.equal(a, b) for a, b in zip(stream(url), stream(here), strict=True))

    def items(archive):
        data = TrainClips(archive, "train", frames=4, grid=8, views=None, pad_id=65, seed=0)
        options = clip_workers(data.archive, 1)
        assert options["multiprocessing_context"] == ("forkserver" if archive == url else None)
        loader = DataLoader(data, batch_size=4, num_workers=1, **options)
        return list(loader)

    for (ta, la), (tb, lb) in zip(items(url), items(here), strict=True):
        assert torch.equal(ta, tb) and torch.equal(la, lb)


def test_missing_object_and_unreachable_store_name_the_object(s3, monkeypatch, caplog):
    import s3fs

    url = write_token_archive(f"{s3}/archives/broken", videos=4, per_shard=2)
    archive = Archive(url)
    name = archive.shard_names()[1]
    s3fs.S3FileSystem().rm(f"{BUCKET}/archives/broken/wds/{name}.tar")
    with pytest.raises(ChecksumError, match=f"{url}/wds/{name}.tar: missing shard file"):
        archive.read_shard(name, "s1_center", "webdataset")
    assert f"{url}/wds/{name}.tar: missing shard file" in verify(url).problems[0]

    with socket.socket() as sock:                 # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{dead}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setattr(storage, "RETRY", storage.RetryPolicy(attempts=2, base_delay_s=0.01))
    s3fs.S3FileSystem.clear_instance_cache()
    caplog.set_level(logging.DEBUG)
    try:
        with pytest.raises(StorageError) as err:
            Archive(url)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    assert str(err.value).startswith(f"{url}: cannot check after 2 attempts: Could not connect")
    assert "retrying" in caplog.text
    assert SECRET not in str(err.value) and SECRET not in caplog.text


# ---------------------------------------------------------------------- memory:// (no server)

@pytest.fixture
def memory_root(request):
    root = f"memory://vimpac-{request.node.name}"
    yield root
    fsspec.filesystem("memory").rm(root.removeprefix("memory://"), recursive=True)


class Flaky:
    """Wraps a file system method to fail ``failures`` times with a connection error first."""

    def __init__(self, fn, failures):
        self.fn, self.failures, self.calls = fn, failures, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionResetError("connection reset by peer")
        return self.fn(*args, **kwargs)


def test_transient_errors_are_retried_with_backoff(memory_root, monkeypatch, caplog):
    write_token_archive(memory_root, videos=4, per_shard=2)
    monkeypatch.setattr(storage, "RETRY", storage.RetryPolicy(attempts=3, base_delay_s=0.01))
    fs = fsspec.filesystem("memory")
    flaky = Flaky(fs.cat_file, failures=2)
    monkeypatch.setattr(fs, "cat_file", flaky)
    with caplog.at_level(logging.WARNING):
        archive = Archive(memory_root)             # two failures, then the manifest reads
    assert len(archive.entries) == 4 and caplog.text.count("retrying") == 2
    flaky.calls, flaky.failures = 0, 3
    with pytest.raises(ArchiveError, match=f"{memory_root}/manifests/worker-00000-of-00001.json"
                                           ": cannot read manifest: cannot read after 3 "
                                           "attempts: connection reset"):
        Archive(memory_root)


def test_permanent_errors_are_not_retried(memory_root, monkeypatch):
    write_token_archive(memory_root, videos=2, per_shard=2)
    fs = fsspec.filesystem("memory")
    calls = []

    def denied(*args, **kwargs):
        calls.append(args)
        raise PermissionError("access denied")

    monkeypatch.setattr(fs, "cat_file", denied)
    with pytest.raises(Exception, match="manifests/worker-00000-of-00001.json.*access denied"):
        Archive(memory_root)
    assert len(calls) == 1


def test_cache_dir_keeps_fetched_shards(memory_root, tmp_path, monkeypatch):
    write_token_archive(memory_root, videos=6, per_shard=3)
    monkeypatch.setenv("VIMPAC_SHARD_CACHE", str(tmp_path / "cache"))
    spec = StreamSpec(frames=3, grid=8, batch_size=2, pad_id=65, shuffle_buffer=4)
    first = next(iter(ClipStream([memory_root], spec)))["tokens"]
    cached = sorted(p for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert cached                                   # named by checksum
    fs = fsspec.filesystem("memory")
    counting = Flaky(fs.cat_file, failures=0)
    monkeypatch.setattr(fs, "cat_file", counting)
    again = next(iter(ClipStream([memory_root], spec)))["tokens"]
    assert torch.equal(first, again)
    reads = counting.calls
    assert reads <= 1                               # only the manifest, no shard objects
    cached[0].write_bytes(b"rotten")                # a corrupt cache entry is fetched again
    assert torch.equal(next(iter(ClipStream([memory_root], spec)))["tokens"], first)


def test_interrupted_remote_write_is_invisible_and_removed(memory_root, videos,
                                                          tiny_tokenizer):
    fs = fsspec.filesystem("memory")
    path = memory_root.removeprefix("memory://")
    cfg = dataclasses.replace(TOK, formats=["webdataset"])
    run_tokenize([str(videos)], tiny_tokenizer, memory_root, cfg)
    fs.pipe_file(f"{path}/wds/shard-w00000-000099.tar", b"half an upload")   # no manifest
    assert "shard-w00000-000099" not in Archive(memory_root).shards
    assert verify(memory_root).ok
    run_tokenize([str(videos)], tiny_tokenizer, memory_root, cfg)            # rerun: cleans up
    assert not fs.exists(f"{path}/wds/shard-w00000-000099.tar")


def test_cli_verify_and_inspect_accept_urls(memory_root, tmp_path, cli_runner):
    write_token_archive(memory_root, videos=4, per_shard=2)
    result = cli_runner.invoke(cli, ["verify", memory_root])
    assert result.exit_code == 0, result.output
    assert "2 shards" in result.output and "ok" in result.output
    png = tmp_path / "inspect.png"
    result = cli_runner.invoke(cli, ["inspect", memory_root, "--png", str(png), "--videos", "2"])
    assert result.exit_code == 0, result.output
    assert png.stat().st_size > 0
    result = cli_runner.invoke(cli, ["verify", "memory://no-such-archive"])
    assert result.exit_code == 2 and "memory://no-such-archive: no such archive" in result.output


def test_locations_and_redaction(tmp_path):
    assert location(tmp_path).is_local and location(f"file://{tmp_path}").is_local
    assert not location("memory://x/y").is_local
    assert redact("s3://key:secret@bucket/prefix") == "s3://bucket/prefix"
    assert location("memory://user:pw@x/y").url("a/b") == "memory://x/y/a/b"
    with pytest.raises(StorageError, match="nosuchproto://x: cannot open nosuchproto:// URLs"):
        location("nosuchproto://x")


def test_two_tokenize_workers_write_one_remote_archive(memory_root, videos, tiny_tokenizer,
                                                       tmp_path):
    """Scale-out into a bucket: each worker writes its own shards and manifest part."""
    for worker in (0, 1):
        run_tokenize([str(videos)], tiny_tokenizer, memory_root, TOK, worker_index=worker,
                     num_workers=2)
    local = tmp_path / "local"
    run_tokenize([str(videos)], tiny_tokenizer, local, TOK)
    remote = Archive(memory_root)
    assert len(remote.parts) == 2 and remote.complete
    assert sorted(remote.records) == sorted(Archive(local).records)
    for key in remote.records:
        assert np.array_equal(read_tokens(memory_root, key), read_tokens(local, key))
    assert verify(memory_root).ok


def test_a_second_writer_of_one_worker_slot_on_s3_is_refused(s3):
    """The lease is created with a conditional PUT (If-None-Match: *), so two writers racing for
    one slot cannot both win; once released, the slot is free."""
    from vimpac.archive import ArchiveSettings, ArchiveWriter, make_views

    settings = ArchiveSettings("fp", 16, (4, 4), 2.0, 32, 32, make_views([1.0], ["center"], False),
                               ["zarr"])
    url = f"{s3}/archives/leased"
    root = location(url)
    assert root.exclusive_create
    assert root.create_bytes("probe", b"1") and not root.create_bytes("probe", b"2")
    assert root.read_bytes("probe") == b"1"
    first = ArchiveWriter(url, settings)
    with pytest.raises(ArchiveError, match=r"locks/worker-00000\.json: worker 0 .* being written"):
        ArchiveWriter(url, settings)
    first.close()
    ArchiveWriter(url, settings).close()
    assert not root.exists("locks/worker-00000.json")
