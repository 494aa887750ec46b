"""The synthetic corpus: real decodable videos, exact dataset layouts, motion-only classes."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from vimpac.common.ffmpeg_exe import ffmpeg_exe
from vimpac.data.synth import (
    DEFAULT_CLASSES,
    MOTIONS,
    SynthSpec,
    _clip_about,
    _plan_clips,
    camel_name,
    render_clip,
    render_clip_with_mask,
    validate_spec,
    write_corpus,
)

TINY = SynthSpec(seed=3, classes=("move_left", "move_right", "rotate_cw"), train_per_class=2,
                 val_per_class=1, width=48, height=48, clip_seconds=1.0, clip_fps=8,
                 uncurated_videos=3, uncurated_seconds=(2.0, 3.0))
SSV2_LABELS = "ssv2/labels/something-something-v2-"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "corpus"
    return out, write_corpus(out, TINY)


def probe(path: Path) -> tuple[int, str]:
    """(decoded video frame count, ffmpeg's stream description) of a file."""
    res = subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path), "-map", "0:v",
                          "-f", "null", "-"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"{path}: {res.stderr[-500:]}"
    frames = re.findall(r"frame=\s*(\d+)", res.stderr)
    return int(frames[-1]), res.stderr


def decode(path: Path, width: int, height: int) -> np.ndarray:
    """All frames of a video as uint8 [n, height, width, 3]."""
    res = subprocess.run([ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-i",
                          str(path), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                         capture_output=True, timeout=60, check=True)
    return np.frombuffer(res.stdout, np.uint8).reshape(-1, height, width, 3)


def crlf_lines(path: Path) -> list[str]:
    """Lines of a text file that must use Windows line endings throughout."""
    raw = path.read_bytes()
    assert raw.endswith(b"\r\n") and raw.count(b"\n") == raw.count(b"\r\n"), path
    return raw.decode().split("\r\n")[:-1]


# ------------------------------------------------------------------------------ videos on disk

def test_every_video_decodes_with_expected_frames(corpus):
    out, summary = corpus
    videos = sorted(p for p in out.rglob("*") if p.suffix in (".mp4", ".webm", ".avi"))
    labelled = [p for p in videos if p.parts[len(out.parts)] != "uncurated"]
    n_clips = len(TINY.classes) * (TINY.train_per_class + TINY.val_per_class)
    assert len(labelled) == 3 * n_clips + len(TINY.classes) * TINY.val_per_class  # + SSV2 test
    assert not list(out.rglob("*.part"))
    for path in labelled:
        frames, info = probe(path)
        assert frames == TINY.clip_frames == 8, path
        assert f"{TINY.width}x{TINY.height}" in info
    codecs = {".mp4": "h264", ".webm": "vp9", ".avi": "mpeg4"}
    for path in labelled:
        assert f"Video: {codecs[path.suffix]}" in probe(path)[1]


def test_uncurated_videos_match_their_shot_list(corpus):
    out, summary = corpus
    shots = json.loads((out / "uncurated" / "shots.json").read_text())
    assert [s["path"] for s in shots] == summary["layouts"]["uncurated"]["videos"]
    assert [Path(s["path"]).suffix for s in shots] == [".mp4", ".webm", ".avi"]
    assert [s["audio"] for s in shots] == [True, False, True]
    for video in shots:
        frames, info = probe(out / video["path"])
        # decoding at constant frame rate gives exactly the written frames (no timestamp gaps)
        assert len(decode(out / video["path"], video["width"], video["height"])) == frames
        assert frames == video["frames"]
        assert 2.0 * video["fps"] - 1 <= frames <= 3.0 * video["fps"] + 1
        assert f"{video['width']}x{video['height']}" in info
        assert ("Audio:" in info) == video["audio"]
        starts = [s["start"] for s in video["shots"]]
        assert starts[0] == 0 and starts == sorted(starts) and starts[-1] < frames
        assert all(s["motion"] in MOTIONS for s in video["shots"])


def test_video_content_is_the_rendered_clip(corpus):
    out, _ = corpus
    job = _plan_clips(TINY)[0]
    want = render_clip(job.cls, np.random.default_rng(job.seed_key(TINY.seed)), TINY.clip_frames,
                       TINY.height, TINY.width)
    for rel in job.paths:  # the same clip in every layout, within lossy-codec error
        got = decode(out / rel, TINY.width, TINY.height)
        assert got.shape == want.shape
        assert np.abs(got.astype(int) - want).mean() < 12, rel


# ------------------------------------------------------------------------------ label layouts

def test_list_layout(corpus):
    out, summary = corpus
    root = out / "list"
    assert (root / "classes.txt").read_text().splitlines() == list(TINY.classes)
    for split, per_class in (("train", TINY.train_per_class), ("val", TINY.val_per_class)):
        rows = [line.split(" ") for line in (root / f"{split}.txt").read_text().splitlines()]
        labels = [int(label) for _, label in rows]
        assert sorted(labels) == sorted(list(range(len(TINY.classes))) * per_class)
        for rel, label in rows:
            assert (root / rel).is_file() and camel_name(TINY.classes[int(label)]) in rel
    assert summary["layouts"]["list"]["train"] == "list/train.txt"


def test_ssv2_layout(corpus):
    out, summary = corpus
    labels = json.loads((out / f"{SSV2_LABELS}labels.json").read_text())
    assert labels == {MOTIONS[c][0].replace("[", "").replace("]", ""): str(i)
                      for i, c in enumerate(TINY.classes)}
    assert labels["Moving something from right to left"] == "0"
    seen = []
    for split, per_class in (("train", TINY.train_per_class), ("validation", TINY.val_per_class)):
        entries = json.loads((out / f"{SSV2_LABELS}{split}.json").read_text())
        classes = []
        for e in entries:
            assert set(e) == {"id", "label", "template", "placeholders"}
            assert e["id"].isdigit() and "[something]" in e["template"]
            assert e["label"] == e["template"].replace("[something]", e["placeholders"][0])
            classes.append(int(labels[e["template"].replace("[", "").replace("]", "")]))
            assert (out / "ssv2/20bn-something-something-v2" / f"{e['id']}.webm").is_file()
        assert sorted(classes) == sorted(list(range(len(TINY.classes))) * per_class)
        seen += [e["id"] for e in entries]
    test = json.loads((out / f"{SSV2_LABELS}test.json").read_text())
    assert all(set(e) == {"id"} for e in test) and len(test) == 3 * TINY.val_per_class
    seen += [e["id"] for e in test]
    assert len(set(seen)) == len(seen)
    assert {p.stem for p in (out / "ssv2/20bn-something-something-v2").iterdir()} == set(seen)
    assert summary["layouts"]["ssv2"]["validation"] == f"{SSV2_LABELS}validation.json"


def test_ucf101_layout(corpus):
    out, _ = corpus
    lists, videos = out / "ucf101/ucfTrainTestlist", out / "ucf101/UCF-101"
    names = [camel_name(c) for c in TINY.classes]
    assert crlf_lines(lists / "classInd.txt") == [f"{i + 1} {n}" for i, n in enumerate(names)]
    on_disk = {p.relative_to(videos).as_posix() for p in videos.rglob("*.avi")}
    pattern = re.compile(r"^([A-Za-z]+)/v_\1_g(\d\d)_c(\d\d)\.avi$")
    test_groups = []
    for k in (1, 2, 3):
        train = [line.split(" ") for line in crlf_lines(lists / f"trainlist0{k}.txt")]
        test = crlf_lines(lists / f"testlist0{k}.txt")
        assert all(" " not in line for line in test)
        for rel, label in train:
            assert names[int(label) - 1] == pattern.match(rel).group(1)  # 1-based label
        assert {rel for rel, _ in train} | set(test) == on_disk  # a partition of the videos
        assert not {rel for rel, _ in train} & set(test)
        groups = {pattern.match(rel).group(2) for rel, _ in train}
        test_groups.append({pattern.match(rel).group(2) for rel in test})
        assert not groups & test_groups[-1]  # train/test split by group ("actor")
        if k == 1:  # split 1 follows the spec's train/val counts
            assert len(train) == len(names) * TINY.train_per_class
            assert len(test) == len(names) * TINY.val_per_class
    assert len({frozenset(g) for g in test_groups}) == 3


def test_ucf101_default_groups_look_like_ucf():
    jobs = _plan_clips(SynthSpec(uncurated_videos=0))
    groups = {j.ucf_group for j in jobs if j.split == "val"}
    assert groups == {1, 2}  # 4 val clips, 2 per group: split 1 tests groups 1-2
    assert {j.ucf_group for j in jobs if j.split == "train"} == set(range(3, 9))


# ------------------------------------------------------------------------------ determinism, reruns

def test_render_is_deterministic_by_seed():
    a = render_clip("rotate_ccw", np.random.default_rng(7), 6, 32, 40)
    b = render_clip("rotate_ccw", np.random.default_rng(7), 6, 32, 40)
    c = render_clip("rotate_ccw", np.random.default_rng(8), 6, 32, 40)
    assert a.shape == (6, 32, 40, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_same_spec_gives_identical_label_files(corpus, tmp_path):
    out, _ = corpus
    spec = dataclasses.replace(TINY, uncurated_videos=0)
    write_corpus(tmp_path, spec)
    for rel in ["list/train.txt", "list/val.txt", f"{SSV2_LABELS}train.json",
                f"{SSV2_LABELS}validation.json", f"{SSV2_LABELS}test.json",
                "ucf101/ucfTrainTestlist/trainlist02.txt"]:
        assert (tmp_path / rel).read_bytes() == (out / rel).read_bytes(), rel


def test_rerun_is_a_no_op_and_resume_fills_gaps(corpus):
    out, summary = corpus
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert write_corpus(out, TINY) == summary
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == files
    # an interrupted run (incomplete corpus.json, a missing video) resumes where it stopped
    missing = out / _plan_clips(TINY)[1].paths[0]
    missing.unlink()
    meta = json.loads((out / "corpus.json").read_text())
    (out / "corpus.json").write_text(json.dumps({**meta, "complete": False}))
    assert write_corpus(out, TINY) == summary
    assert missing.is_file() and probe(missing)[0] == TINY.clip_frames
    kept = [p for p in files if p != missing and p.suffix in (".mp4", ".webm", ".avi")]
    assert all(p.stat().st_mtime_ns == files[p] for p in kept)


def test_refuses_other_spec_and_foreign_folders(corpus, tmp_path):
    out, _ = corpus
    with pytest.raises(ValueError, match=r"corpus\.json.*seed"):
        write_corpus(out, dataclasses.replace(TINY, seed=4))
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        write_corpus(tmp_path, TINY)


@pytest.mark.parametrize(("field", "value"), [("classes", ("move_left", "jump")), ("width", 47),
                                              ("layouts", ("kinetics",)), ("val_per_class", 0)])
def test_invalid_spec_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"SynthSpec.{field}"):
        validate_spec(dataclasses.replace(TINY, **{field: value}))


def test_ssv2_placeholders_describe_the_rendered_object():
    job = _plan_clips(TINY)[0]
    full = render_clip_with_mask(job.cls, np.random.default_rng(job.seed_key(TINY.seed)),
                                 TINY.clip_frames, TINY.height, TINY.width)[3]
    assert _clip_about(TINY, job) == full


# ------------------------------------------------------------------------------ motion semantics

def centroids(mask: np.ndarray) -> np.ndarray:
    """Object centroid (x, y) per frame of a bool mask [n, H, W]: [n, 2]."""
    ys, xs = np.mgrid[0:mask.shape[1], 0:mask.shape[2]]
    area = mask.sum((1, 2))
    return np.stack([(mask * xs).sum((1, 2)) / area, (mask * ys).sum((1, 2)) / area], 1)


@pytest.mark.parametrize(("cls", "axis", "sign"), [("move_left", 0, -1), ("move_right", 0, 1),
                                                   ("move_up", 1, -1), ("move_down", 1, 1)])
def test_translation_classes_move_the_object_several_token_cells(cls, axis, sign):
    for seed in range(6):
        _, mask, _, _ = render_clip_with_mask(cls, np.random.default_rng(seed), 24, 96, 96)
        c = centroids(mask)[:, axis]
        assert sign * (c[-1] - c[0]) > 2.5 * 8  # > 2.5 cells of an 8x downsampled token map
        steps = np.diff(c[::3])  # sampled at 4 fps
        assert np.all(sign * steps > 0)


@pytest.mark.parametrize(("cls", "grows"), [("approach", True), ("recede", False)])
def test_scale_classes_change_object_size(cls, grows):
    for seed in range(6):
        _, mask, _, _ = render_clip_with_mask(cls, np.random.default_rng(seed), 24, 96, 96)
        area = mask.sum((1, 2)).astype(float)
        ratio = area[-1] / area[0] if grows else area[0] / area[-1]
        assert ratio > 2.0


def rotate_mask(mask: np.ndarray, cx: float, cy: float, angle: float) -> np.ndarray:
    """mask [H, W] turned by `angle` rad about (cx, cy), clockwise on screen for angle > 0."""
    ys, xs = np.mgrid[0:mask.shape[0], 0:mask.shape[1]].astype(float)
    c, s = np.cos(angle), np.sin(angle)  # inverse map: rotate output coords by -angle
    sx = cx + c * (xs - cx) + s * (ys - cy)
    sy = cy - s * (xs - cx) + c * (ys - cy)
    ix, iy = np.rint(sx).astype(int), np.rint(sy).astype(int)
    ok = (ix >= 0) & (ix < mask.shape[1]) & (iy >= 0) & (iy < mask.shape[0])
    return ok & mask[iy.clip(0, mask.shape[0] - 1), ix.clip(0, mask.shape[1] - 1)]


@pytest.mark.parametrize(("cls", "sign"), [("rotate_cw", 1), ("rotate_ccw", -1)])
def test_rotation_classes_turn_the_outline_the_right_way(cls, sign):
    for seed in range(6):
        _, mask, track, _ = render_clip_with_mask(cls, np.random.default_rng(seed), 24, 96, 96)
        assert np.ptp(track.cx) == 0 and np.ptp(track.cy) == 0  # turns in place
        cx, cy = float(track.cx[0]), float(track.cy[0])
        deltas = np.radians(np.arange(-60, 61, 3))
        ious = []
        for d in deltas:
            turned = rotate_mask(mask[0], cx, cy, d)
            ious.append((turned & mask[3]).sum() / (turned | mask[3]).sum())
        best = deltas[int(np.argmax(ious))]
        assert sign * best > np.radians(9), (seed, np.degrees(best))
        assert max(ious) > 0.8
        assert sign * (track.angle[-1] - track.angle[0]) > 0.5 * np.pi


@pytest.mark.parametrize("pair", [("move_left", "move_right"), ("move_up", "move_down"),
                                  ("approach", "recede"), ("rotate_cw", "rotate_ccw")])
def test_paired_classes_differ_only_in_time_direction(pair):
    a, b = (render_clip(c, np.random.default_rng(11), 10, 40, 56) for c in pair)
    assert np.array_equal(a, b[::-1])  # same appearance, reversed motion


def test_default_classes_are_motion_classes():
    assert set(DEFAULT_CLASSES) >= {"move_left", "move_right", "move_up", "move_down", "approach",
                                    "recede", "rotate_cw", "rotate_ccw"}
    assert len({MOTIONS[c][0] for c in DEFAULT_CLASSES}) == len(DEFAULT_CLASSES)


def test_scene_controls_background_travel_and_drift():
    from vimpac.data.synth import Scene

    plain = Scene(background_contrast=(0.0, 0.0), travel=(0.7, 0.7), camera_drift=0.0)
    frames, mask, track, _ = render_clip_with_mask("move_right", np.random.default_rng(3), 12,
                                                   64, 64, plain)
    assert np.all(track.bg_dx == 0) and np.all(track.bg_dy == 0)
    assert track.cx[-1] - track.cx[0] == pytest.approx(0.7 * 64, abs=1e-3)
    background = frames[0][~mask[0]].reshape(-1, 3).astype(int)
    far = np.abs(background - np.median(background, axis=0)).max(axis=1) <= 1
    assert far.mean() > 0.9                              # flat apart from the object's edge
    with pytest.raises(ValueError, match=r"SynthSpec.travel=\(0.8, 0.2\)"):
        validate_spec(SynthSpec(travel=(0.8, 0.2)))
