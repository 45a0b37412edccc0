"""scripts/prepare_coco.py end to end (in-process: the script's main())."""

import importlib.util
import json
from pathlib import Path

import pytest

from detr_ray.data.shards import read_meta, read_shard_table

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "prepare_coco.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("prepare_coco", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_converts_a_split_and_prints_the_validation_summary(script, coco_dir, tmp_path, capsys):
    coco = json.loads((coco_dir / "instances.json").read_text())
    coco["annotations"][0]["bbox"] = [0, 0, 0, 4]  # degenerate: dropped
    coco["annotations"][1]["image_id"] = 999  # unknown image: dropped
    (coco_dir / "instances.json").write_text(json.dumps(coco))
    (coco_dir / "images" / "img_005.jpg").unlink()  # missing file: skipped
    out = tmp_path / "out"
    argv = [
        "--images",
        str(coco_dir / "images"),
        "--annotations",
        str(coco_dir / "instances.json"),
        "--out",
        str(out),
        "--shard-size",
        "2",
        "--workers",
        "0",
        "--no-progress",
    ]
    assert script.main(argv) == 0
    printed = capsys.readouterr().out
    assert "written: 5 images" in printed
    assert "1  zero or negative box width/height" in printed
    assert "1  unknown image_id" in printed
    assert "img_005.jpg: missing file" in printed
    assert read_meta(str(out)).counts["images"] == 5
    assert script.main(argv) == 0  # rerun: nothing duplicated
    assert "(3 already complete, reused)" in capsys.readouterr().out
    assert sorted(read_shard_table(str(out)).column("image_id").to_pylist()) == [100, 101, 102, 103, 104]

    strict = [
        "--images",
        str(coco_dir / "images"),
        "--annotations",
        str(coco_dir / "instances.json"),
        "--out",
        str(tmp_path / "s"),
        "--strict",
        "--no-progress",
    ]
    assert script.main(strict) == 2
    assert "missing (--strict): img_005.jpg" in capsys.readouterr().err


def test_bad_json_is_a_clear_error(script, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": []')
    assert script.main(["--images", str(tmp_path), "--annotations", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert f"error: {bad}: malformed JSON" in capsys.readouterr().err


def test_demo_flag_writes_train_and_val(script, tmp_path, capsys):
    assert script.main(["--demo", "--out", str(tmp_path / "d"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "train: " in printed and "(400 images" in printed and "val: " in printed
    assert (tmp_path / "d" / "raw" / "annotations" / "instances_val.json").exists()
    assert read_meta(str(tmp_path / "d" / "val")).counts["images"] == 100
    assert (
        script.main(["--demo", "--num-train", "6", "--num-val", "3", "--out", str(tmp_path / "s"), "--no-progress"])
        == 0
    )
    assert [read_meta(str(tmp_path / "s" / split)).counts["images"] for split in ("train", "val")] == [6, 3]


def test_demo_sizes_need_the_demo_flag(script, coco_dir, tmp_path, capsys):
    argv = ["--images", str(coco_dir / "images"), "--annotations", str(coco_dir / "instances.json")]
    with pytest.raises(SystemExit):
        script.main([*argv, "--num-train", "6", "--out", str(tmp_path / "a")])
    assert "--num-train sizes the --demo dataset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main(["--demo", "--num-val", "0", "--out", str(tmp_path / "b")])
    assert "--num-val must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_max_pixels_and_read_attempts_flags(script, coco_dir, tmp_path, capsys):
    base = [
        "--images",
        str(coco_dir / "images"),
        "--annotations",
        str(coco_dir / "instances.json"),
        "--workers",
        "0",
        "--no-progress",
    ]
    assert script.main([*base, "--out", str(tmp_path / "a"), "--max-pixels", "3071"]) == 0  # images are 64x48
    assert "6  too many pixels" in capsys.readouterr().out
    image = coco_dir / "images" / "img_002.jpg"
    image.unlink()
    image.mkdir()  # reading it fails with an I/O error, every time
    assert script.main([*base, "--out", str(tmp_path / "b"), "--read-attempts", "1"]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "could not be read after 1 attempts" in err and "'img_002.jpg'" in err


def test_out_holding_other_files_is_refused_and_left_alone(script, coco_dir, tmp_path, capsys):
    mine = tmp_path / "mine" / "raw" / "annotations" / "instances_val.json"
    mine.parent.mkdir(parents=True)
    mine.write_text("my annotations")
    assert script.main(["--demo", "--out", str(tmp_path / "mine"), "--no-progress"]) == 2
    assert f"error: {tmp_path / 'mine'}: holds files that detr-ray did not create (raw)" in capsys.readouterr().err
    assert mine.read_text() == "my annotations"
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["raw"]

    argv = [
        "--images",
        str(coco_dir / "images"),
        "--annotations",
        str(coco_dir / "instances.json"),
        "--out",
        str(mine.parent),
        "--workers",
        "0",
        "--no-progress",
    ]
    assert script.main(argv) == 2
    assert (
        f"error: {mine.parent}: holds files that the shard writer did not write (instances_val.json)"
        in capsys.readouterr().err
    )
    assert [p.name for p in mine.parent.iterdir()] == ["instances_val.json"]
