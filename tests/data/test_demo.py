import json
import os

import numpy as np
import pytest

from detr_ray.data import demo
from detr_ray.data.shards import read_meta, read_shard_table
from detr_ray.ownership import MARKER, NotOwnedError


def test_demo_is_deterministic_and_shaped_as_designed(tmp_path):
    a = demo.make_demo_dataset(tmp_path / "a", num_train=40, num_val=10, shard_size=16)
    b = demo.make_demo_dataset(tmp_path / "b", num_train=40, num_val=10, shard_size=16)
    assert a == (str(tmp_path / "a" / "train"), str(tmp_path / "a" / "val"))
    for split in ("train", "val"):
        ja = (tmp_path / "a" / "raw" / "annotations" / f"instances_{split}.json").read_bytes()
        jb = (tmp_path / "b" / "raw" / "annotations" / f"instances_{split}.json").read_bytes()
        assert ja == jb
        assert (
            read_meta(str(tmp_path / "a" / split)).source["sha256"]
            == read_meta(str(tmp_path / "b" / split)).source["sha256"]
        )
    ta, tb = read_shard_table(a[0]), read_shard_table(b[0])
    assert ta.column("image").to_pylist() == tb.column("image").to_pylist()

    meta = read_meta(a[0])
    assert meta.label_names == ["rectangle", "triangle", "ellipse"]
    assert {c.supercategory for c in meta.categories} == {"polygon", "round"}
    assert meta.counts["images"] == 40 and meta.num_classes == 3
    assert meta.extra["demo"]["version"] == demo.DEMO_VERSION
    coco = json.loads((tmp_path / "a" / "raw" / "annotations" / "instances_train.json").read_text())
    per_image = {i["id"]: 0 for i in coco["images"]}
    for ann in coco["annotations"]:
        per_image[ann["image_id"]] += 1
        image = next(i for i in coco["images"] if i["id"] == ann["image_id"])
        x, y, w, h = ann["bbox"]
        assert 0 <= x and x + w <= image["width"] and 0 <= y and y + h <= image["height"]
        assert min(w, h) >= 0.25 * min(image["width"], image["height"])  # large objects
        assert ann["id"] >= 1
    counts = np.bincount(list(per_image.values()), minlength=3)
    assert counts[0] >= 1 and counts[1] >= 1 and counts[2] >= 1 and len(counts) == 3
    assert all(64 <= i["width"] <= 96 and 64 <= i["height"] <= 96 for i in coco["images"])
    assert read_meta(a[1]).counts["images"] == 10


def test_rendered_boxes_are_the_visible_pixels_of_each_object():
    for i in range(30):
        rng = np.random.default_rng([0, 2, i])
        pixels, objects = demo._render(rng, 80, 90)
        for obj in objects:
            colour = np.asarray(demo.COLOURS[obj["category_id"]], dtype=np.float32)
            near = np.linalg.norm(pixels.astype(np.float32) - colour, axis=-1) < 50
            ys, xs = np.nonzero(near)
            x, y, w, h = obj["bbox"]
            if len(objects) == 1:  # the colour's pixels are exactly this object
                assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)
            else:  # same-class objects never touch, so this object's box holds some of its colour
                inside = near[y : y + h, x : x + w]
                assert inside.mean() > 0.3


def test_ensure_demo_shards_generates_once_and_regenerates_when_stale(tmp_path):
    small = dict(num_train=12, num_val=4, shard_size=8)
    train, val = demo.ensure_demo_shards(tmp_path, **small)
    meta_file = tmp_path / "train" / "_meta.json"
    stamp = meta_file.stat().st_mtime_ns
    assert demo.ensure_demo_shards(tmp_path, **small) == (train, val)
    assert meta_file.stat().st_mtime_ns == stamp  # reused, not regenerated
    demo.ensure_demo_shards(tmp_path, **{**small, "num_train": 10})
    assert read_meta(train).counts["images"] == 10
    assert sorted(p.name for p in (tmp_path / "raw" / "train").iterdir())[-1] == "train_000010.jpg"


def test_default_root_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DETR_RAY_DEMO_DIR", str(tmp_path / "x"))
    assert demo.default_demo_root() == str(tmp_path / "x")
    monkeypatch.delenv("DETR_RAY_DEMO_DIR")
    assert demo.default_demo_root().endswith(f"demo-v{demo.DEMO_VERSION}")


def _tree(root):
    """{relative path: bytes} of every file under root (marker and lock aside)."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in (MARKER, demo.LOCK_FILE)
    }


def test_a_directory_of_other_shards_is_refused_and_left_as_it_was(coco_dir, tmp_path, monkeypatch):
    """DETR_RAY_DEMO_DIR (or data.demo_root) pointing at a user's data: an error naming it, and
    not one file removed or changed."""
    from detr_ray.data.coco import load_coco
    from detr_ray.data.shards import write_shards

    root = tmp_path / "mine"
    write_shards(
        load_coco(str(coco_dir / "instances.json")),
        str(coco_dir / "images"),
        str(root / "train"),
        shard_size=4,
        workers=0,
        progress=False,
    )
    (root / "raw").mkdir()
    (root / "raw" / "notes.txt").write_text("my only copy")
    before = _tree(root)
    monkeypatch.setenv("DETR_RAY_DEMO_DIR", str(root))
    with pytest.raises(NotOwnedError, match=f"{root}: holds files that detr-ray did not create .*raw, train"):
        demo.ensure_demo_shards(num_train=12, num_val=4, shard_size=8)
    assert _tree(root) == before
    assert sorted(os.listdir(root)) == ["raw", "train"]  # not even a lock file or marker added


def test_stale_demo_data_with_a_foreign_file_is_not_removed(tmp_path):
    small = dict(num_train=12, num_val=4, shard_size=8)
    demo.ensure_demo_shards(tmp_path, **small)
    (tmp_path / "raw" / "train" / "my_photo.jpg").write_bytes(b"not the generator's")
    before = _tree(tmp_path)
    with pytest.raises(NotOwnedError, match=r"raw/train/my_photo.jpg: not written by the demo generator"):
        demo.ensure_demo_shards(tmp_path, **{**small, "num_train": 10})
    assert _tree(tmp_path) == before
    (tmp_path / "raw" / "train" / "my_photo.jpg").unlink()  # with it gone, stale data is replaced
    demo.ensure_demo_shards(tmp_path, **{**small, "num_train": 10})
    assert read_meta(str(tmp_path / "train")).counts["images"] == 10
    assert json.loads((tmp_path / MARKER).read_text())["owner"] == demo.OWNER


def test_valid_demo_shards_in_an_unmarked_directory_are_used_without_writing(tmp_path):
    small = dict(num_train=12, num_val=4, shard_size=8)
    demo.ensure_demo_shards(tmp_path / "made", **small)
    for name in (MARKER, demo.LOCK_FILE):  # as made by an earlier detr-ray, or copied
        (tmp_path / "made" / name).unlink(missing_ok=True)
    before = _tree(tmp_path / "made")
    assert demo.ensure_demo_shards(tmp_path / "made", **small) == (
        str(tmp_path / "made" / "train"),
        str(tmp_path / "made" / "val"),
    )
    assert _tree(tmp_path / "made") == before and not (tmp_path / "made" / MARKER).exists()
    with pytest.raises(NotOwnedError, match="did not create"):  # stale, unmarked: not replaced
        demo.ensure_demo_shards(tmp_path / "made", **{**small, "seed": 1})
    assert _tree(tmp_path / "made") == before


def test_make_demo_dataset_refuses_a_directory_with_other_files(tmp_path):
    annotations = tmp_path / "raw" / "annotations" / "instances_train.json"
    annotations.parent.mkdir(parents=True)
    annotations.write_text('{"mine": true}')
    with pytest.raises(NotOwnedError, match=f"{tmp_path}: holds files"):
        demo.make_demo_dataset(tmp_path, num_train=4, num_val=2)
    assert annotations.read_text() == '{"mine": true}'
