"""The Ray Data pipeline on a local Ray: decode + augment, collate, skip counting, errors,
and two Ray Train workers reading disjoint parts of every epoch."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import ray
import torch

from detr_ray.config import DataConfig
from detr_ray.data.batches import DetectionBatches
from detr_ray.data.collate import collate, shape_group
from detr_ray.data.datasets import train_dataset, val_dataset
from detr_ray.data.decode import DECODED_SCHEMA, READ_COLUMNS, ShardRowError, decode_augment
from detr_ray.data.recipe import TransformConfig, augment_recipe
from detr_ray.data.shards import META_FILE, read_shard_table
from detr_ray.local_ray import init as init_local_ray
from tests.data.conftest import AUGMENT, AUGMENT_KW, CORRUPT_ID, make_shards


@pytest.fixture(scope="module")
def ray_local():
    init_local_ray(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def shards(tmp_path_factory, ray_local):
    return make_shards(tmp_path_factory.mktemp("pipeline"))


def source_boxes(coco: dict) -> dict[int, list]:
    out: dict[int, list] = {i["id"]: [] for i in coco["images"]}
    for a in coco["annotations"]:
        out[a["image_id"]].append((a["category_id"], a["bbox"]))
    return out


# ---------------------------------------------------------------------------------------------
# Without Ray


def decoded_row(image_id: int, h: int, w: int, boxes=(), labels=(), skipped=False) -> dict:
    image = torch.arange(3 * h * w, dtype=torch.int64).remainder(251).to(torch.uint8).reshape(3, h, w)
    return {
        "image_id": image_id,
        "image": b"" if skipped else image.permute(1, 2, 0).numpy().tobytes(),
        "height": 0 if skipped else h,
        "width": 0 if skipped else w,
        "orig_height": 2 * h,
        "orig_width": 2 * w,
        "boxes": list(boxes),
        "labels": list(labels),
        "skipped": skipped,
    }


def test_collate_pads_to_the_largest_image_and_masks_the_padding():
    rows = [
        decoded_row(1, 4, 6, boxes=[0.5, 0.5, 0.2, 0.4], labels=[2]),
        decoded_row(2, 0, 0, skipped=True),
        decoded_row(3, 5, 3, boxes=[0.1, 0.2, 0.1, 0.1, 0.7, 0.7, 0.2, 0.2], labels=[0, 1]),
        decoded_row(4, 2, 2),
    ]
    table = pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)
    images, mask, targets = collate(table)
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 5, 6)
    assert mask.dtype == torch.bool and mask.shape == (3, 5, 6)
    for k, (h, w) in enumerate([(4, 6), (5, 3), (2, 2)]):
        assert not mask[k, :h, :w].any() and mask[k].sum() == 30 - h * w
        assert (images[k][:, mask[k]] == 0).all()
    assert torch.equal(
        images[0, :, :4, :6],
        torch.frombuffer(bytearray(rows[0]["image"]), dtype=torch.uint8).reshape(4, 6, 3).permute(2, 0, 1),
    )
    assert images.is_contiguous(memory_format=torch.channels_last)  # as decoded: no transposing copy
    assert [t["image_id"] for t in targets] == [1, 3, 4]
    assert targets[1]["boxes"].dtype == torch.float32 and targets[1]["boxes"].shape == (2, 4)
    assert torch.equal(targets[1]["labels"], torch.tensor([0, 1]))
    assert targets[2]["boxes"].shape == (0, 4) and targets[2]["labels"].dtype == torch.int64
    assert torch.equal(targets[0]["orig_size"], torch.tensor([8, 12])) and torch.equal(
        targets[0]["size"], torch.tensor([4, 6])
    )

    sliced_images, _, sliced_targets = collate(pa.concat_tables([table.slice(2, 2), table.slice(0, 1)]))
    assert [t["image_id"] for t in sliced_targets] == [3, 4, 1]
    assert torch.equal(sliced_images[2, :, :4, :6], images[0, :, :4, :6])
    assert torch.equal(sliced_images[0, :, :5, :3], images[1, :, :5, :3])

    numpy_batch = {k: np.array(v, dtype=object) for k, v in table.to_pydict().items()}
    images2, mask2, targets2 = collate(numpy_batch)
    assert torch.equal(images, images2) and torch.equal(mask, mask2)


def test_decode_augment_skips_corrupt_images_and_names_shard_and_row_on_other_errors(tmp_path):
    out, coco = make_shards(tmp_path)
    table = read_shard_table(str(out), READ_COLUMNS).append_column("path", pa.array(["shard-x.parquet"] * 6))
    decoded = decode_augment(table, train=False, augment=AUGMENT_KW, category_to_label={3: 0, 7: 1})
    by_id = {r["image_id"]: r for r in decoded.to_pylist()}
    assert [i for i, r in by_id.items() if r["skipped"]] == [CORRUPT_ID]
    assert by_id[102]["labels"] == [1, 0] and (by_id[102]["height"], by_id[102]["width"]) == (48, 64)

    with pytest.raises(ShardRowError, match=r"shard-x.parquet: row image_id=101 file_name='img_001.png': KeyError"):
        decode_augment(table, train=False, augment=AUGMENT_KW, category_to_label={3: 0})


def test_seeded_decode_augment_draws_per_image_whatever_the_batch_and_order(tmp_path):
    out, _ = make_shards(tmp_path, corrupt=False)
    table = read_shard_table(str(out), READ_COLUMNS)
    kw = dict(train=True, augment=AUGMENT_KW, category_to_label={3: 0, 7: 1})
    rows = lambda t: {r["image_id"]: r for r in t.to_pylist()}  # noqa: E731
    whole = rows(decode_augment(table, seed=1, **kw))
    torch.manual_seed(123)  # the process's generator plays no part
    reversed_in_two = {
        **rows(decode_augment(table.take([5, 4, 3]), seed=1, **kw)),
        **rows(decode_augment(table.take([2, 1, 0]), seed=1, **kw)),
    }
    assert reversed_in_two == whole
    other = rows(decode_augment(table, seed=2, **kw))
    assert any(other[i]["image"] != whole[i]["image"] or other[i]["boxes"] != whole[i]["boxes"] for i in whole)


def test_data_config_validation_and_presets():
    from detr_ray.config import ConfigError, from_dict

    assert augment_recipe(from_dict(DataConfig, {})) == TransformConfig.demo()
    cfg = from_dict(DataConfig, {"train": "s3://b/train", "val": "s3://b/val", "batch_size": 2, "augment": "coco"})
    assert augment_recipe(cfg) == TransformConfig.coco()
    assert augment_recipe(replace(cfg, augment="demo")) == TransformConfig.demo()
    with pytest.raises(ConfigError, match="data: unknown key"):
        from_dict(DataConfig, {"shuffle": 1}, "data")
    with pytest.raises(ConfigError, match="give both train and val"):
        from_dict(DataConfig, {"train": "x"}, "data")
    with pytest.raises(ConfigError, match="data.augment"):
        from_dict(DataConfig, {"augment": "big"}, "data")


# ---------------------------------------------------------------------------------------------
# Local Ray


@pytest.mark.timeout(180)
def test_train_epochs_deliver_every_good_image_once_and_count_the_corrupt_one(shards):
    out, coco = shards
    ds = train_dataset(str(out), AUGMENT, decode_batch_size=2)
    batches = DetectionBatches(ds.iterator(), batch_size=2, shuffle_buffer=4)
    for _ in range(2):
        seen = []
        for images, mask, targets in batches:
            assert images.dtype == torch.uint8 and images.shape[0] == len(targets) and images.shape[1] == 3
            assert mask.shape == (images.shape[0], *images.shape[2:])
            for k, t in enumerate(targets):
                h, w = t["size"].tolist()
                assert min(h, w) in AUGMENT.train_scales
                assert not mask[k, :h, :w].any() and mask[k, h:, :].all() and mask[k, :, w:].all()
                assert torch.equal(t["orig_size"], torch.tensor([48, 64]))
                assert ((t["boxes"] >= 0) & (t["boxes"] <= 1)).all() and t["boxes"].shape == (len(t["labels"]), 4)
                seen.append(t["image_id"])
        assert sorted(seen) == [100, 101, 102, 104, 105]
        assert batches.skipped == 1 and batches.delivered == 5
    # the read and the decode ran as one task per block (see the pipeline's docstring)
    assert "ReadParquet->MapBatches(decode_blocks)" in ds.stats()


@pytest.mark.timeout(180)
def test_train_augmentation_is_drawn_from_the_seed_per_epoch_and_image(shards):
    out, _ = shards

    def epochs(seed, n=2, split=False):
        """Each image's augmented size, boxes and pixel sum, per pass over one dataset."""
        ds = train_dataset(str(out), AUGMENT, decode_batch_size=2, seed=seed)
        it = ds.streaming_split(1)[0] if split else ds.iterator()  # as Ray Train's shards
        return [
            {
                t["image_id"]: (t["size"].tolist(), t["boxes"].tolist(), int(images[k].sum()))
                for images, _, targets in DetectionBatches(it, batch_size=2)
                for k, t in enumerate(targets)
            }
            for _ in range(n)
        ]

    first, again, other = epochs(5), epochs(5), epochs(6)
    assert len(first[0]) == 5 and first == again  # 2 decode tasks: whichever finishes first
    assert first[0] != first[1]  # a new draw every epoch
    assert other[0] != first[0] and other[1] != first[1]
    assert epochs(5, split=True) == first


def decoded_blocks(n_blocks: int = 5, rows_per_block: int = 8, skipped_id: int = 13) -> list[pa.Table]:
    """In-memory DECODED_SCHEMA blocks of images of varied sizes; id `skipped_id` is a skipped row."""
    rows = [
        decoded_row(i, 0, 0, skipped=True)
        if i == skipped_id
        else decoded_row(i, 3 + i % 4, 5 + i % 3, boxes=[0.5] * 4, labels=[i % 2])
        for i in range(n_blocks * rows_per_block)
    ]
    return [
        pa.Table.from_pylist(rows[k : k + rows_per_block], schema=DECODED_SCHEMA)
        for k in range(0, len(rows), rows_per_block)
    ]


@pytest.mark.timeout(180)
def test_detection_batches_order_shuffle_batch_sizes_and_pixels(ray_local):
    import threading

    blocks = decoded_blocks()
    expected = {r["image_id"]: r for b in blocks for r in b.to_pylist() if not r["skipped"]}
    ds = ray.data.from_arrow(blocks)

    def one_pass(batches):
        ids, sizes = [], []
        for images, mask, targets in batches:
            sizes.append(len(targets))
            for k, t in enumerate(targets):
                row = expected[t["image_id"]]
                h, w = row["height"], row["width"]
                source = torch.frombuffer(bytearray(row["image"]), dtype=torch.uint8).reshape(h, w, 3).permute(2, 0, 1)
                assert torch.equal(images[k, :, :h, :w], source) and not mask[k, :h, :w].any()
                assert images[k, :, h:].eq(0).all() and images[k, :, :, w:].eq(0).all() and mask[k, h:].all()
                assert t["labels"].tolist() == row["labels"]
                ids.append(t["image_id"])
        return ids, sizes

    # no shuffle buffer: arrival order, full batches but the last, the skipped row counted
    in_order = DetectionBatches(ds, batch_size=3)
    ids, sizes = one_pass(in_order)
    assert ids == sorted(expected) and sizes == [3] * 13 and in_order.skipped == 1 and in_order.delivered == 39
    dropped = DetectionBatches(ds, batch_size=5, drop_last=True)
    ids, sizes = one_pass(dropped)
    assert ids == sorted(expected)[:35] and sizes == [5] * 7 and dropped.delivered == 35

    # shuffle buffer: every image once per pass, a different order each pass, reproducible by seed
    shuffled = DetectionBatches(ds, batch_size=4, shuffle_buffer=16, shuffle_seed=7)
    first, sizes = one_pass(shuffled)
    second, _ = one_pass(shuffled)
    assert sorted(first) == sorted(second) == sorted(expected) and sizes == [4] * 9 + [3]
    assert first != sorted(expected) and first != second
    again, _ = one_pass(DetectionBatches(ds, batch_size=4, shuffle_buffer=16, shuffle_seed=7))
    assert again == first
    # a row comes out only after it arrived, and the buffer holds at most 16 + one block of rows
    arrival = {image_id: k for k, image_id in enumerate(sorted(expected))}
    assert all(position >= arrival[image_id] - (16 + 8) for position, image_id in enumerate(first))

    # leaving a pass early stops its background thread
    for _ in shuffled:
        break
    for _ in range(50):
        if not any(t.name == "detr-ray-batches" for t in threading.enumerate()):
            break
        threading.Event().wait(0.1)
    assert not any(t.name == "detr-ray-batches" for t in threading.enumerate())


@pytest.mark.timeout(180)
def test_shape_groups_batch_one_orientation_and_size_together(ray_local):
    assert shape_group(480, 640) == shape_group(500, 700) != shape_group(640, 480)
    assert shape_group(800, 1066) != shape_group(480, 640)  # same orientation, another size band
    # portrait (5x3) and landscape (3x5) images, interleaved; id 13 skipped
    rows = [decoded_row(i, *((5, 3) if i % 3 else (3, 5)), boxes=[0.5] * 4, labels=[0]) for i in range(40)]
    rows[13] = decoded_row(13, 0, 0, skipped=True)
    blocks = [pa.Table.from_pylist(rows[k : k + 8], schema=DECODED_SCHEMA) for k in range(0, 40, 8)]
    ds = ray.data.from_arrow(blocks)

    def one_pass(group_shapes: bool):
        batches = DetectionBatches(ds, batch_size=4, shuffle_buffer=8, shuffle_seed=1, group_shapes=group_shapes)
        out = [
            (images.shape, [tuple(t["size"].tolist()) for t in targets], [t["image_id"] for t in targets])
            for images, _, targets in batches
        ]
        assert batches.skipped == 1 and batches.delivered == 39
        return out

    grouped, mixed = one_pass(True), one_pass(False)
    for out in (grouped, mixed):
        assert sorted(i for _, _, ids in out for i in ids) == [i for i in range(40) if i != 13]
    # all batches but the remainders at the end hold one shape; 39 = 26 portrait + 13 landscape
    uniform = [len(set(sizes)) == 1 for _, sizes, _ in grouped]
    assert all(uniform[:-1]) and [len(sizes) for _, sizes, _ in grouped] == [4] * 9 + [3]
    padded = lambda out: sum(shape[0] * shape[2] * shape[3] for shape, _, _ in out)  # noqa: E731
    assert padded(grouped) < padded(mixed)
    assert not all(len(set(sizes)) == 1 for _, sizes, _ in mixed)


@pytest.mark.timeout(180)
def test_val_targets_match_the_source_annotations(shards):
    out, coco = shards
    expected = source_boxes(coco)
    ds = val_dataset(str(out), AUGMENT)
    seen = set()
    for images, mask, targets in ds.iterator().iter_torch_batches(batch_size=3, collate_fn=collate):
        for t in targets:
            seen.add(t["image_id"])
            assert t["size"].tolist() == [48, 64]
            want = expected[t["image_id"]]
            labels = [{3: 0, 7: 1}[c] for c, _ in want]
            assert t["labels"].tolist() == labels
            boxes = torch.tensor([[x + w / 2, y + h / 2, w, h] for _, (x, y, w, h) in want]).reshape(-1, 4)
            assert torch.allclose(t["boxes"], boxes / torch.tensor([64, 48, 64, 48]), atol=1e-5)
    assert seen == {100, 101, 102, 104, 105}
    # iter_batches (numpy batches) + collate gives the same
    n = sum(len(collate(b)[2]) for b in ds.iter_batches(batch_size=4))
    assert n == 5


@pytest.mark.timeout(180)
def test_building_the_datasets_calls_no_deprecated_ray_api(shards):
    """No deprecation warning points at our code (Ray's own DataContext copies warn about
    Ray's internal settings; those point into Ray)."""
    import warnings

    import detr_ray

    ours = str(Path(detr_ray.__file__).parent)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_dataset(str(shards[0]), AUGMENT, seed=0)
        val_dataset(str(shards[0]), AUGMENT)
    from_us = [
        f"{w.filename}:{w.lineno}: {w.message}"
        for w in caught
        if issubclass(w.category, DeprecationWarning) and w.filename.startswith(ours)
    ]
    assert not from_us, from_us


def test_progress_bars_only_when_stdout_is_a_terminal(shards, monkeypatch):
    """Ray Data's bars redraw with carriage returns: kept on a terminal, off where output is a
    log file (pytest captures stdout here: not a terminal). The global context is left as it was."""
    import os

    from ray.data import DataContext

    from detr_ray.data.datasets import progress_bars_wanted

    context = DataContext.get_current()
    before = context.enable_progress_bars
    leader, follower = os.openpty()  # a real terminal (open on both ends while in use)
    try:
        context.enable_progress_bars = True  # Ray's default
        assert not progress_bars_wanted() and not val_dataset(str(shards[0]), AUGMENT).context.enable_progress_bars
        assert context.enable_progress_bars  # the global context is left alone
        with os.fdopen(follower, "w") as terminal:
            monkeypatch.setattr("sys.stdout", terminal)
            assert progress_bars_wanted() and val_dataset(str(shards[0]), AUGMENT).context.enable_progress_bars
            context.enable_progress_bars = False  # switched off (RAY_DATA_DISABLE_PROGRESS_BARS=1): stays off
            assert not val_dataset(str(shards[0]), AUGMENT).context.enable_progress_bars
            monkeypatch.undo()
    finally:
        os.close(leader)
        context.enable_progress_bars = before


def test_other_errors_fail_the_epoch_naming_shard_and_row(shards, tmp_path):
    out, _ = shards
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in out.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    meta = json.loads((broken / META_FILE).read_text())
    meta["label_to_category_id"] = [3]  # category 7 now unknown to the mapping
    (broken / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(Exception) as e:
        for _ in DetectionBatches(val_dataset(str(broken), AUGMENT).iterator(), batch_size=2):
            pass
    message = str(e.value)
    assert "ShardRowError" in message and "part-0000" in message and "row image_id=10" in message


@pytest.mark.timeout(300)
def test_two_train_workers_read_disjoint_parts_that_cover_each_epoch(shards, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out, _ = shards
    record = tmp_path / "seen"
    record.mkdir()

    def loop(config):
        import ray.train

        ctx = ray.train.get_context()
        batches = DetectionBatches(ray.train.get_dataset_shard("train"), batch_size=2, shuffle_buffer=2)
        for epoch in range(2):
            ids = [t["image_id"] for _, _, ts in batches for t in ts]
            path = Path(config["record"]) / f"rank{ctx.get_world_rank()}-epoch{epoch}.json"
            path.write_text(json.dumps({"ids": ids, "skipped": batches.skipped}))

    trainer = TorchTrainer(
        loop,
        train_loop_config={"record": str(record)},
        datasets={"train": train_dataset(str(out), AUGMENT, decode_batch_size=2)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(storage_path=str(tmp_path / "runs"), name="split"),
    )
    trainer.fit()
    for epoch in range(2):
        parts = [json.loads((record / f"rank{r}-epoch{epoch}.json").read_text()) for r in range(2)]
        a, b = parts[0]["ids"], parts[1]["ids"]
        assert not set(a) & set(b)
        assert sorted(a + b) == [100, 101, 102, 104, 105]
        assert parts[0]["skipped"] + parts[1]["skipped"] == 1


# ---------------------------------------------------------------------------------------------
# Unusual images: every colour mode becomes uint8 RGB; EXIF orientation follows the annotation.


def _convert_and_decode(root: Path, images: list[tuple], *, train: bool, save=None) -> dict[int, dict]:
    """Writes COCO `images` (file name, PIL image, annotated width, height, one box) with one
    category, converts them with write_shards and runs decode_augment on the rows."""
    from detr_ray.data.coco import load_coco
    from detr_ray.data.shards import write_shards

    (root / "images").mkdir(parents=True)
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "patch", "supercategory": "x"}]}
    for k, (file_name, image, width, height, box) in enumerate(images):
        (save or {}).get(file_name, lambda im, path: im.save(path))(image, root / "images" / file_name)
        coco["images"].append({"id": k, "file_name": file_name, "width": width, "height": height})
        coco["annotations"].append(
            {"id": k, "image_id": k, "category_id": 1, "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
        )
    (root / "instances.json").write_text(json.dumps(coco))
    report = write_shards(
        load_coco(str(root / "instances.json")), str(root / "images"), str(root / "shards"), workers=0, progress=False
    )
    assert not report.skipped_images, report.summary()
    table = read_shard_table(str(root / "shards"), READ_COLUMNS)
    decoded = decode_augment(table, train=train, augment=AUGMENT_KW, category_to_label={1: 0})
    return {r["image_id"]: r for r in decoded.to_pylist()}


def _pixels_under_boxes(row: dict, min_side: int = 0) -> list[np.ndarray]:
    """Mean RGB of the middle half of each box of a decoded row (of those at least `min_side`
    pixels wide and high)."""
    h, w = row["height"], row["width"]
    assert len(row["image"]) == h * w * 3  # uint8 HWC, three channels
    image = np.frombuffer(row["image"], dtype=np.uint8).reshape(h, w, 3)
    means = []
    for cx, cy, bw, bh in np.array(row["boxes"]).reshape(-1, 4):
        if bw * w < min_side or bh * h < min_side:
            continue
        x0, x1 = int((cx - bw / 4) * w), int(np.ceil((cx + bw / 4) * w))
        y0, y1 = int((cy - bh / 4) * h), int(np.ceil((cy + bh / 4) * h))
        means.append(image[y0:y1, x0:x1].reshape(-1, 3).mean(0))
    return means


def test_every_colour_mode_decodes_to_three_channel_uint8(tmp_path):
    from PIL import Image

    box = [20, 10, 24, 20]
    colour = np.zeros((48, 64, 3), np.uint8)
    colour[10:30, 20:44] = (200, 30, 60)
    gray = colour[..., 0]
    rgb = Image.fromarray(colour)
    images = [
        ("gray.png", Image.fromarray(gray), 64, 48, box),
        ("gray_alpha.png", Image.fromarray(gray).convert("LA"), 64, 48, box),
        ("palette.png", rgb.convert("P"), 64, 48, box),
        ("rgba.png", rgb.convert("RGBA"), 64, 48, box),
        ("cmyk.jpg", rgb.convert("CMYK"), 64, 48, box),
        ("gray16.png", Image.fromarray(gray.astype(np.uint16) * 257), 64, 48, box),
    ]
    assert [im.mode for _, im, *_ in images] == ["L", "LA", "P", "RGBA", "CMYK", "I;16"]
    rows = _convert_and_decode(
        tmp_path, images, train=False, save={"cmyk.jpg": lambda im, path: im.save(path, quality=98)}
    )
    expected = [(200, 200, 200), (200, 200, 200), (200, 30, 60), (200, 30, 60), (200, 30, 60), (200, 200, 200)]
    for k, want in enumerate(expected):
        row = rows[k]
        assert not row["skipped"] and (row["height"], row["width"]) == (48, 64), images[k][0]
        [mean] = _pixels_under_boxes(row)
        np.testing.assert_allclose(mean, want, atol=6, err_msg=images[k][0])

    images_batch, _, _ = collate(pa.Table.from_pylist(list(rows.values()), schema=DECODED_SCHEMA))
    assert images_batch.dtype == torch.uint8 and images_batch.shape == (6, 3, 48, 64)


def test_exif_orientation_keeps_the_box_on_the_pixels_it_was_drawn_on(tmp_path):
    """Rotated: stored 64 wide x 40 high with EXIF orientation 6 (shown rotated 90 degrees
    clockwise), annotated 40 x 64 on the shown pixels: the EXIF rotation is applied. As stored:
    the same tag, but annotated 64 x 40 on the stored pixels: no rotation."""
    from PIL import Image, ImageOps

    shown = np.zeros((64, 40, 3), np.uint8)
    shown[36:56, 8:24] = (220, 20, 20)  # the annotated patch, box [8, 36, 16, 20]
    stored = Image.fromarray(shown).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    save = {
        name: lambda im, path: im.save(path, quality=95, exif=exif.tobytes())
        for name in ("rotated.jpg", "as_stored.jpg")
    }
    as_stored = np.zeros((40, 64, 3), np.uint8)
    as_stored[4:24, 30:60] = (220, 20, 20)  # box [30, 4, 30, 20] on the stored pixels
    images = [
        ("rotated.jpg", stored, 40, 64, [8, 36, 16, 20]),
        ("as_stored.jpg", Image.fromarray(as_stored), 64, 40, [30, 4, 30, 20]),
    ]
    assert stored.size == (64, 40)
    for train in (False, True):
        rows = _convert_and_decode(tmp_path / f"train{train}", images, train=train, save=save)
        written = Image.open(tmp_path / f"train{train}" / "images" / "rotated.jpg")
        assert written.size == (64, 40) and ImageOps.exif_transpose(written).size == (40, 64)
        for k in (0, 1):
            row = rows[k]
            assert not row["skipped"] and (row["orig_height"], row["orig_width"]) == (images[k][3], images[k][2])
            if not train:
                assert row["height"] > row["width"] if k == 0 else row["height"] < row["width"]
            means = _pixels_under_boxes(row, min_side=6 if train else 0)
            assert means or train  # a random crop may cut the box away
            for mean in means:  # red, not the black around the patch (train: blurred by resizing)
                assert mean[0] > (100 if train else 170) and max(mean[1:]) < mean[0] / 3, (images[k][0], train, mean)
