"""Dataset readers against tiny copies of each release layout, written byte-exact in tmp_path."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from vimpac.data.datasets import (
    DATASETS,
    DatasetError,
    DatasetIndex,
    load_dataset,
    parse_dataset_arg,
    read_diving48,
    read_hmdb51,
    read_kinetics400,
    read_list,
    read_ssv2,
    read_ucf101,
    standard_splits,
)


def write(path: Path, content: str | bytes) -> Path:
    """Write bytes exactly (str is encoded as UTF-8 with no newline translation)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def touch(path: Path) -> None:
    write(path, b"")


def crlf(*lines: str) -> str:
    return "".join(f"{line}\r\n" for line in lines)


def by_key(index: DatasetIndex) -> dict:
    return {item.key: item for item in index.items}


# ---------------------------------------------------------------------------------------------
# UCF101: classInd 1-based, trainlist "path N", testlist path only, CRLF, 3 splits by group.

UCF_CLASSES = ("ApplyEyeMakeup", "BandMarching", "HandstandPushups")
UCF_FILE_CLASS = {"HandstandPushups": "HandStandPushups"}   # the real release's file-name quirk


def ucf_video(cls: str, group: int) -> str:
    return f"{cls}/v_{UCF_FILE_CLASS.get(cls, cls)}_g{group:02d}_c01.avi"


@pytest.fixture
def ucf_root(tmp_path: Path) -> Path:
    root = tmp_path / "ucf101"
    lists = root / "ucfTrainTestlist"
    write(lists / "classInd.txt", crlf(*(f"{i} {c}" for i, c in enumerate(UCF_CLASSES, 1))))
    for k in (1, 2, 3):      # split k tests group k, trains on the other groups
        train = [f"{ucf_video(c, g)} {i}" for i, c in enumerate(UCF_CLASSES, 1)
                 for g in (1, 2, 3) if g != k]
        write(lists / f"trainlist0{k}.txt", crlf(*train))
        write(lists / f"testlist0{k}.txt", crlf(*(ucf_video(c, k) for c in UCF_CLASSES)))
    for c in UCF_CLASSES:
        for g in (1, 2, 3):
            if (c, g) != ("BandMarching", 3):
                touch(root / "UCF-101" / ucf_video(c, g))
    return root


def test_ucf101_classes_labels_keys_and_splits(ucf_root: Path) -> None:
    index = read_ucf101(str(ucf_root))
    assert index.name == "ucf101" and index.classes == list(UCF_CLASSES)
    items = by_key(index)
    assert len(items) == 8
    item = items["HandstandPushups/v_HandStandPushups_g01_c01"]
    assert item.label == 2
    assert item.splits == ("test1", "train2", "train3")
    assert item.path == str(ucf_root / "UCF-101" / ucf_video("HandstandPushups", 1))
    assert items["ApplyEyeMakeup/v_ApplyEyeMakeup_g02_c01"].splits == ("train1", "test2", "train3")
    for k in (1, 2, 3):
        test = index.split(f"test{k}")
        assert {it.key.rsplit("_", 2)[1] for it in test} == {f"g{k:02d}"}
        assert {it.label for it in test} == {0, 1, 2} - ({1} if k == 3 else set())
        assert len(index.split(f"train{k}")) == 6 - (k != 3)


def test_ucf101_missing_video_is_reported_not_fatal(ucf_root: Path) -> None:
    index = read_ucf101(str(ucf_root))
    assert [key for key, _ in index.missing] == ["BandMarching/v_BandMarching_g03_c01"]
    assert "UCF-101/BandMarching/v_BandMarching_g03_c01.avi" in index.missing[0][1]
    summary = index.summary()
    assert summary["missing"] == 1 and summary["classes"] == 3 and summary["videos"] == 8
    assert summary["splits"] == {"train1": 5, "test1": 3, "train2": 5, "test2": 3,
                                 "train3": 6, "test3": 2}
    assert summary["missing_per_split"] == {"train1": 1, "train2": 1, "test3": 1}
    unchecked = read_ucf101(str(ucf_root), check_files=False)
    assert len(unchecked.items) == 9 and unchecked.missing == []


def test_ucf101_testlist_class_not_in_classind(ucf_root: Path) -> None:
    path = ucf_root / "ucfTrainTestlist" / "testlist02.txt"
    write(path, crlf(ucf_video("ApplyEyeMakeup", 2), "Surfing/v_Surfing_g02_c01.avi"))
    with pytest.raises(DatasetError, match=r"testlist02\.txt:2: .*'Surfing'") as err:
        read_ucf101(str(ucf_root))
    assert "Surfing/v_Surfing_g02_c01.avi" in str(err.value)


def test_ucf101_malformed_trainlist_line(ucf_root: Path) -> None:
    path = ucf_root / "ucfTrainTestlist" / "trainlist03.txt"
    write(path, crlf(f"{ucf_video('ApplyEyeMakeup', 1)} 1", f"{ucf_video('BandMarching', 1)} x"))
    with pytest.raises(DatasetError, match=r"trainlist03\.txt:2: expected a label in 1\.\.3"):
        read_ucf101(str(ucf_root))


def test_ucf101_wrong_root_names_expected_file(ucf_root: Path) -> None:
    with pytest.raises(DatasetError, match="ucfTrainTestlist/classInd.txt") as err:
        read_ucf101(str(ucf_root.parent))
    assert f"use {ucf_root} as the root" in str(err.value)
    with pytest.raises(DatasetError, match=f"use {ucf_root} as the root"):
        read_ucf101(str(ucf_root / "ucfTrainTestlist"))
    with pytest.raises(DatasetError, match="does not exist"):
        read_ucf101(str(ucf_root / "nope"))


def test_ucf101_bom_blank_lines_and_trailing_space(ucf_root: Path) -> None:
    lists = ucf_root / "ucfTrainTestlist"
    write(lists / "classInd.txt", "\ufeff" + crlf("1 ApplyEyeMakeup  ", "", "2 BandMarching",
                                                  "3 HandstandPushups", ""))
    write(lists / "testlist01.txt", crlf(ucf_video("BandMarching", 1) + " \t", ""))
    index = read_ucf101(str(ucf_root))
    assert index.classes == list(UCF_CLASSES)
    assert [it.key for it in index.split("test1")] == ["BandMarching/v_BandMarching_g01_c01"]


# ---------------------------------------------------------------------------------------------
# HMDB51: one split file per (class, split), "name.avi N " lines, CRLF.

HMDB_CLASSES = ("ride_bike", "brush_hair", "fall_floor")   # written unsorted on purpose
HMDB_CODES = {1: (1, 2, 0), 2: (2, 1, 1), 3: (1, 0, 2), 4: (0, 0, 0)}   # video -> code per split


def hmdb_name(cls: str, n: int) -> str:
    return f"April_09_{cls}_u_nm_np1_ba_goo_{n}.avi"


@pytest.fixture
def hmdb_root(tmp_path: Path) -> Path:
    root = tmp_path / "hmdb51"
    for cls in HMDB_CLASSES:
        for k in (1, 2, 3):
            lines = [f"{hmdb_name(cls, n)} {codes[k - 1]} " for n, codes in HMDB_CODES.items()]
            write(root / "testTrainMulti_7030_splits" / f"{cls}_test_split{k}.txt", crlf(*lines))
        for n in HMDB_CODES:
            if (cls, n) != ("fall_floor", 2):
                touch(root / "hmdb51_org" / cls / hmdb_name(cls, n))
    return root


def test_hmdb51_classes_labels_splits(hmdb_root: Path) -> None:
    index = read_hmdb51(str(hmdb_root))
    assert index.classes == ["brush_hair", "fall_floor", "ride_bike"]
    items = by_key(index)
    assert len(items) == 8          # 3 classes x 3 used videos, one of them missing
    item = items["brush_hair/" + hmdb_name("brush_hair", 1)[:-4]]
    assert item.label == 0 and item.splits == ("train1", "test2")
    assert item.path == str(hmdb_root / "hmdb51_org" / "brush_hair" / hmdb_name("brush_hair", 1))
    assert items["ride_bike/" + hmdb_name("ride_bike", 2)[:-4]].splits == \
        ("test1", "train2", "train3")
    assert not any(key.endswith("_4") for key in items)          # unused in every split
    assert {it.label for it in index.split("train1")} == {0, 1, 2}
    assert len(index.split("train1")) == 6 and len(index.split("test1")) == 2
    assert index.missing[0][0] == "fall_floor/" + hmdb_name("fall_floor", 2)[:-4]
    assert index.summary()["missing_per_split"] == {"test1": 1, "train2": 1, "train3": 1}


def test_hmdb51_malformed_line_and_wrong_root(hmdb_root: Path) -> None:
    path = hmdb_root / "testTrainMulti_7030_splits" / "fall_floor_test_split2.txt"
    write(path, crlf(f"{hmdb_name('fall_floor', 1)} 1 ", f"{hmdb_name('fall_floor', 2)} 3 "))
    with pytest.raises(DatasetError, match=r"fall_floor_test_split2\.txt:2: expected"):
        read_hmdb51(str(hmdb_root))
    with pytest.raises(DatasetError, match=f"testTrainMulti_7030_splits/.*use {hmdb_root}"):
        read_hmdb51(str(hmdb_root.parent))


# ---------------------------------------------------------------------------------------------
# Something-Something V2: labels JSON with string indices; train/validation with templates.

SSV2_LABELS = {"Moving something from left to right": "1", "Pushing something from right to left":
               "0", "Putting something onto something": "2"}


@pytest.fixture
def ssv2_root(tmp_path: Path) -> Path:
    root = tmp_path / "ssv2"
    labels = root / "labels"
    write(labels / "something-something-v2-labels.json", json.dumps(SSV2_LABELS, indent=4))
    train = [{"id": "78687", "label": "moving pen from left to right",
              "template": "Moving [something] from left to right", "placeholders": ["pen"]},
             {"id": "42326", "label": "putting cup onto plate",
              "template": "Putting [something] onto [something]", "placeholders": ["cup", "plate"]}]
    val = [{"id": "24746", "label": "pushing a box from right to left",
            "template": "Pushing [something] from right to left", "placeholders": ["a box"]}]
    write(labels / "something-something-v2-train.json", json.dumps(train))
    write(labels / "something-something-v2-validation.json", json.dumps(val))
    write(labels / "something-something-v2-test.json", json.dumps([{"id": "1420"}, {"id": "9"}]))
    for vid in ("78687", "42326", "24746", "1420"):
        touch(root / "20bn-something-something-v2" / f"{vid}.webm")
    return root


def test_ssv2_classes_labels_and_test_ids(ssv2_root: Path) -> None:
    index = read_ssv2(str(ssv2_root))
    assert index.classes == ["Pushing something from right to left",
                             "Moving something from left to right",
                             "Putting something onto something"]
    items = by_key(index)
    assert items["78687"].label == 1 and items["78687"].splits == ("train",)
    assert items["42326"].label == 2
    assert items["24746"].label == 0 and items["24746"].splits == ("val",)
    assert items["1420"].label == -1 and items["1420"].splits == ("test",)
    assert items["1420"].path == str(ssv2_root / "20bn-something-something-v2" / "1420.webm")
    assert index.missing and index.missing[0][0] == "9"
    assert index.summary()["splits"] == {"train": 2, "val": 1, "test": 1}
    assert index.summary()["unlabeled"] == 1


def test_ssv2_reencoded_copy_is_found(ssv2_root: Path) -> None:
    videos = ssv2_root / "20bn-something-something-v2"
    (videos / "78687.webm").rename(videos / "78687.mp4")
    assert by_key(read_ssv2(str(ssv2_root)))["78687"].path == str(videos / "78687.mp4")


def test_ssv2_unknown_template_and_wrong_root(ssv2_root: Path) -> None:
    bad = [{"id": "5", "template": "Spinning [something]", "label": "", "placeholders": []}]
    write(ssv2_root / "labels" / "something-something-v2-validation.json", json.dumps(bad))
    with pytest.raises(DatasetError, match=r"validation\.json: entry 0 \(id 5\).*Spinning"):
        read_ssv2(str(ssv2_root))
    with pytest.raises(DatasetError, match="labels/something-something-v2-labels.json"):
        read_ssv2(str(ssv2_root / "labels"))
    write(ssv2_root / "labels" / "something-something-v2-train.json", '[{"id": "1",')
    with pytest.raises(DatasetError, match=r"train\.json:1: invalid JSON"):
        read_ssv2(str(ssv2_root))


# ---------------------------------------------------------------------------------------------
# Diving48: V2 train/test JSON, vocab of 4 attributes per class, rgb/{vid_name}.mp4.

DIVING_VOCAB = [["Back", "15som", "05Twis", "FREE"], ["Back", "15som", "15Twis", "FREE"],
                ["Forward", "25som", "NoTwis", "PIKE"]]


@pytest.fixture
def diving_root(tmp_path: Path) -> Path:
    root = tmp_path / "Diving48"
    write(root / "Diving48_vocab.json", json.dumps(DIVING_VOCAB))
    train = [{"vid_name": "-mmq0PT-u8k_00155", "label": 0, "start_frame": 0, "end_frame": 76},
             {"vid_name": "-mmq0PT-u8k_00156", "label": 2, "start_frame": 0, "end_frame": 61},
             {"vid_name": "-mmq0PT-u8k_00155", "label": 0, "start_frame": 0, "end_frame": 76}]
    test = [{"vid_name": "_8Vy3dlHg2w_00000", "label": 1, "start_frame": 0, "end_frame": 85}]
    write(root / "Diving48_V2_train.json", json.dumps(train))
    write(root / "Diving48_V2_test.json", json.dumps(test))
    for vid in ("-mmq0PT-u8k_00155", "_8Vy3dlHg2w_00000"):
        touch(root / "rgb" / f"{vid}.mp4")
    return root


def test_diving48_reader(diving_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        index = read_diving48(str(diving_root))
    assert index.classes == ["Back_15som_05Twis_FREE", "Back_15som_15Twis_FREE",
                             "Forward_25som_NoTwis_PIKE"]
    items = by_key(index)
    assert set(items) == {"-mmq0PT-u8k_00155", "_8Vy3dlHg2w_00000"}
    assert items["_8Vy3dlHg2w_00000"].label == 1 and items["_8Vy3dlHg2w_00000"].splits == ("test",)
    assert index.missing[0][0] == "-mmq0PT-u8k_00156"
    assert "duplicate" in caplog.text or "more than once" in caplog.text
    write(diving_root / "Diving48_V2_test.json", json.dumps([{"vid_name": "x", "label": 48}]))
    with pytest.raises(DatasetError, match=r"Diving48_V2_test\.json: entry 0"):
        read_diving48(str(diving_root))
    with pytest.raises(DatasetError, match="Diving48_vocab.json"):
        read_diving48(str(diving_root / "rgb"))


# ---------------------------------------------------------------------------------------------
# Kinetics-400: annotations/*.csv, {split}/{id}_{start:06d}_{end:06d}.mp4, many clips missing.

K400_TRAIN = (
    "label,youtube_id,time_start,time_end,split\n"
    "abseiling,--07WQ2iBlw,1,11,train\n"
    '"passing American football (in game), with ball",-0lmzzK-vqw,14.0,24.0,train\n'
    "abseiling,-3B32lodo2M,59,69,train\n"
    "\n"
)
K400_VAL = "label,youtube_id,time_start,time_end,split\r\nzumba,0B7lSaP4ahU,30,40,val\r\n"
K400_TEST = "youtube_id,time_start,time_end,split\n--ZeIvpmvbY,7,17,test\n"


@pytest.fixture
def k400_root(tmp_path: Path) -> Path:
    root = tmp_path / "kinetics400"
    write(root / "annotations" / "train.csv", K400_TRAIN)
    write(root / "annotations" / "val.csv", "\ufeff" + K400_VAL)
    write(root / "annotations" / "test.csv", K400_TEST)
    touch(root / "train" / "--07WQ2iBlw_000001_000011.mp4")
    touch(root / "train" / "-0lmzzK-vqw_000014_000024.mp4")
    touch(root / "val" / "zumba" / "0B7lSaP4ahU_000030_000040.mp4")   # downloader class folders
    return root


def test_kinetics400_reader(k400_root: Path) -> None:
    index = read_kinetics400(str(k400_root))
    assert index.classes == ["abseiling", "passing American football (in game), with ball", "zumba"]
    items = by_key(index)
    assert set(items) == {"train/--07WQ2iBlw_000001_000011", "train/-0lmzzK-vqw_000014_000024",
                          "val/0B7lSaP4ahU_000030_000040"}
    assert items["train/-0lmzzK-vqw_000014_000024"].label == 1
    assert items["val/0B7lSaP4ahU_000030_000040"].splits == ("val",)
    assert items["val/0B7lSaP4ahU_000030_000040"].path == \
        str(k400_root / "val" / "zumba" / "0B7lSaP4ahU_000030_000040.mp4")
    assert sorted(k for k, _ in index.missing) == ["test/--ZeIvpmvbY_000007_000017",
                                                   "train/-3B32lodo2M_000059_000069"]
    assert index.summary()["missing_per_split"] == {"train": 1, "test": 1}
    unchecked = read_kinetics400(str(k400_root), check_files=False)
    test_item = unchecked.split("test")[0]
    assert test_item.label == -1
    assert test_item.path == str(k400_root / "test" / "--ZeIvpmvbY_000007_000017.mp4")


def test_kinetics400_errors(k400_root: Path) -> None:
    with pytest.raises(DatasetError, match="annotations/train.csv"):
        read_kinetics400(str(k400_root / "train"))
    write(k400_root / "annotations" / "val.csv", K400_VAL + "zumba,abc,x,40,val\r\n")
    with pytest.raises(DatasetError, match=r"val\.csv:3: expected .*'zumba,abc,x,40,val'"):
        read_kinetics400(str(k400_root))


# ---------------------------------------------------------------------------------------------
# Generic lists: "relative/path.ext label", space or comma separated, 0-based labels.


@pytest.fixture
def list_root(tmp_path: Path) -> Path:
    root = tmp_path / "mylist"
    write(root / "classes.txt", "cat\ndog\n")
    write(root / "train.txt", "videos/a.mp4 0\nvideos/b.mp4 1\nvideos/a.mp4 0\n\n")
    write(root / "val.txt", "path,label\r\nvideos/my clip.mp4 , 1\r\n")
    for name in ("a.mp4", "b.mp4", "my clip.mp4"):
        touch(root / "videos" / name)
    return root


def test_list_folder(list_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        index = load_dataset("list", str(list_root))
    assert index.classes == ["cat", "dog"]
    assert [(it.key, it.label, it.splits) for it in index.items] == [
        ("videos/a", 0, ("train",)), ("videos/b", 1, ("train",)), ("videos/my clip", 1, ("val",))]
    assert index.items[2].path == str(list_root / "videos" / "my clip.mp4")
    assert "videos/a" in caplog.text and "more than once" in caplog.text


def test_list_single_file_and_errors(list_root: Path) -> None:
    (list_root / "classes.txt").unlink()
    single = read_list(str(list_root / "train.txt"))
    assert single.classes == ["0", "1"] and single.split_tags == ["train"]
    write(list_root / "val.txt", "videos/a.mp4 0\nvideos/b.mp4 dog\n")
    with pytest.raises(DatasetError, match=r"val\.txt:2: .*'videos/b\.mp4 dog'"):
        read_list(str(list_root))
    with pytest.raises(DatasetError, match="train.txt, val.txt or test.txt"):
        read_list(str(list_root / "videos"))


# ---------------------------------------------------------------------------------------------
# Arguments and dispatch


@pytest.mark.parametrize("arg, expected", [
    ("ucf101:/data/ucf", ("ucf101", "/data/ucf")),
    ("ssv2:relative/dir", ("ssv2", "relative/dir")),
    ("UCF101:/data/ucf", ("ucf101", "/data/ucf")),
    ("sthv2:/d", ("ssv2", "/d")),
    ("k400:/mnt/a:b", ("kinetics400", "/mnt/a:b")),
    ("list:/x/train.txt", ("list", "/x/train.txt")),
    ("/data/videos", None),
    ("/data/ucf101:old/videos", None),
    ("video:1.mp4", None),
    ("data/clip.mp4", None),
])
def test_parse_dataset_arg(arg: str, expected: tuple[str, str] | None) -> None:
    assert parse_dataset_arg(arg) == expected


def test_parse_dataset_arg_empty_root_and_dispatch(ucf_root: Path) -> None:
    with pytest.raises(DatasetError, match="no root"):
        parse_dataset_arg("hmdb51:")
    assert load_dataset(f"ucf101:{ucf_root}").classes == list(UCF_CLASSES)
    with pytest.raises(DatasetError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet", str(ucf_root))
    assert set(DATASETS) == {"ssv2", "ucf101", "hmdb51", "diving48", "kinetics400", "list"}
    assert standard_splits("ucf101", 2) == ("train2", "test2")
    assert standard_splits("ssv2") == ("train", "val")
    with pytest.raises(DatasetError, match="no split 'test4'"):
        read_ucf101(str(ucf_root)).split("test4")


def test_missing_video_folder_is_a_layout_error(ucf_root: Path) -> None:
    (ucf_root / "UCF-101").rename(ucf_root / "videos")
    with pytest.raises(DatasetError, match="video folder UCF-101/"):
        read_ucf101(str(ucf_root))
    assert len(read_ucf101(str(ucf_root), check_files=False).items) == 9


def test_list_absolute_and_parent_paths_and_case(tmp_path: Path, list_root: Path) -> None:
    outside = tmp_path / "elsewhere" / "Clip.MP4"
    touch(outside)
    write(list_root / "test.txt", f"{outside} 1\n../elsewhere/clip.mp4 0\nVIDEOS/A.mp4\n")
    index = read_list(str(list_root / "test.txt"))
    assert [(it.path, it.label) for it in index.items] == [
        (str(outside), 1), (str(outside), 0), (str(list_root / "videos" / "a.mp4"), -1)]
    assert index.split_tags == ["test"]


# ---------------------------------------------------------------------------------------------
# The synthetic corpus generator writes ssv2/, ucf101/ and list/ layouts that these readers read.


def test_synthetic_corpus_layouts_read_back(tmp_path: Path) -> None:
    synth = pytest.importorskip("vimpac.data.synth")
    spec = synth.SynthSpec(classes=("move_left", "move_right"), train_per_class=2, val_per_class=1,
                           width=32, height=32, clip_seconds=0.5, clip_fps=4, uncurated_videos=0)
    summary = synth.write_corpus(tmp_path / "corpus", spec)
    n_train, n_val = 2 * 2, 2 * 1

    ssv2 = load_dataset("ssv2", str(tmp_path / "corpus" / "ssv2"))
    assert ssv2.classes == [t.replace("[", "").replace("]", "") for t in summary["templates"]]
    assert ssv2.missing == [] and ssv2.summary()["splits"] == {"train": n_train, "val": n_val,
                                                                "test": n_val}
    assert {it.label for it in ssv2.split("train")} == {0, 1}
    assert {it.label for it in ssv2.split("test")} == {-1}

    ucf = load_dataset("ucf101", str(tmp_path / "corpus" / "ucf101"))
    assert ucf.classes == summary["ucf101_names"] and ucf.missing == []
    assert len(ucf.items) == n_train + n_val
    for k, groups in enumerate(summary["layouts"]["ucf101"]["test_groups"], start=1):
        test = ucf.split(f"test{k}")
        assert len(test) + len(ucf.split(f"train{k}")) == n_train + n_val
        assert {int(it.key.rsplit("_g", 1)[1][:2]) for it in test} == set(groups)
    for item in ucf.items:
        assert item.key.split("/")[0] == ucf.classes[item.label]

    lst = load_dataset("list", str(tmp_path / "corpus" / "list"))
    assert lst.classes == list(spec.classes) and lst.missing == []
    assert len(lst.split("train")) == n_train and len(lst.split("val")) == n_val
    for item in lst.items:
        assert item.key.split("/")[1] == synth.camel_name(lst.classes[item.label])
