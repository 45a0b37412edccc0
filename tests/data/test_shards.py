import contextlib
import io
import json
import logging
import os
import re
import resource
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detr_ray.data.coco import load_coco
from detr_ray.data.shards import (
    META_FILE,
    SCHEMA_VERSION,
    SKIP_MISSING,
    SKIP_SIZE,
    SKIP_TOO_LARGE,
    SKIP_UNDECODABLE,
    ReadRetry,
    ShardError,
    coco_ground_truth,
    read_meta,
    read_rows,
    read_shard_table,
    write_shards,
)


def test_round_trip_keeps_bytes_boxes_and_meta(coco_dir, tmp_path):
    out = tmp_path / "shards"
    dataset = load_coco(str(coco_dir / "instances.json"))
    report = write_shards(dataset, str(coco_dir / "images"), str(out), shard_size=4, workers=0, progress=False)
    assert report.images_written == 6 and report.annotations_written == 6 and report.empty_images == 2
    assert report.shards_written == 2 and not report.skipped_images

    meta = read_meta(str(out))
    assert meta.schema_version == SCHEMA_VERSION
    assert meta.label_to_category_id == [3, 7] and meta.label_names == ["dog", "cat"]
    assert meta.categories[0].supercategory == "animal"
    assert meta.source["sha256"] == dataset.sha256
    assert meta.counts["images"] == 6 and meta.counts["per_category"] == {"3": 2, "7": 4}
    assert [s["rows"] for s in meta.shards] == [4, 2]

    rows = {r["image_id"]: r for r in read_shard_table(str(out)).to_pylist()}
    assert sorted(rows) == [100 + i for i in range(6)]
    assert rows[101]["image"] == (coco_dir / "images" / "img_001.png").read_bytes()  # not re-encoded
    assert rows[102]["boxes"] == [[4.0, 6.0, 12.0, 10.0], [24.0, 9.0, 12.0, 12.0]]
    assert rows[102]["category_ids"] == [7, 3] and rows[102]["iscrowd"] == [False, False]
    assert rows[100]["boxes"] == []


def test_bad_image_files_are_listed_and_skipped_and_nothing_good_is_lost(coco_dir, tmp_path):
    images = coco_dir / "images"
    (images / "img_002.jpg").unlink()  # 2 objects
    (images / "img_004.jpg").write_bytes((images / "img_004.jpg").read_bytes()[:200])  # truncated, 1 object
    coco = json.loads((coco_dir / "instances.json").read_text())
    coco["images"][5]["width"] = 65  # the file is 64 wide
    (coco_dir / "instances.json").write_text(json.dumps(coco))

    out = tmp_path / "shards"
    report = write_shards(load_coco(str(coco_dir / "instances.json")), str(images), str(out), workers=0, progress=False)
    reasons = {s["image_id"]: s["reason"] for s in report.skipped_images}
    assert reasons[102] == SKIP_MISSING
    assert reasons[104].startswith(SKIP_UNDECODABLE)
    assert reasons[105].startswith(SKIP_SIZE)
    assert report.images_written == 3 and report.dropped_annotations == {"of a skipped image": 5}
    assert sorted(read_shard_table(str(out)).column("image_id").to_pylist()) == [100, 101, 103]
    summary = report.summary()
    assert "img_002.jpg: missing file" in summary and "3 images" in summary
    assert read_meta(str(out)).validation["skipped_images"] == report.skipped_images


def test_strict_mode_raises(coco_dir, tmp_path):
    dataset = load_coco(str(coco_dir / "instances.json"))
    (coco_dir / "images" / "img_003.jpg").write_bytes(b"not an image")
    with pytest.raises(ShardError, match=r"could not be used \(--strict\).*img_003.jpg: undecodable"):
        write_shards(dataset, str(coco_dir / "images"), str(tmp_path / "a"), strict=True, workers=0, progress=False)
    assert not (tmp_path / "a" / META_FILE).exists()
    (coco_dir / "images" / "img_000.jpg").unlink()
    with pytest.raises(ShardError, match=r"1 image files are missing \(--strict\): img_000.jpg"):
        write_shards(dataset, str(coco_dir / "images"), str(tmp_path / "b"), strict=True, workers=0, progress=False)
    assert not (tmp_path / "b").exists()


def test_rerun_reuses_finished_shards_and_completes_partial_output(coco_dir, tmp_path):
    out = tmp_path / "shards"
    dataset = load_coco(str(coco_dir / "instances.json"))
    args = (dataset, str(coco_dir / "images"), str(out))
    first = write_shards(*args, shard_size=2, workers=0, progress=False)
    files = sorted(p.name for p in out.iterdir())
    again = write_shards(*args, shard_size=2, workers=0, progress=False)
    assert again.shards_reused == 3 and again.shards_written == 0
    assert sorted(p.name for p in out.iterdir()) == files
    assert again.images_written == first.images_written == 6

    # An interrupted run: no meta, one shard missing, one truncated.
    (out / META_FILE).unlink()
    shards = sorted(out.glob("*.parquet"))
    shards[0].unlink()
    shards[1].write_bytes(shards[1].read_bytes()[:50])
    resumed = write_shards(*args, shard_size=2, workers=0, progress=False)
    assert resumed.shards_reused == 1 and resumed.shards_written == 2
    assert sorted(read_shard_table(str(out)).column("image_id").to_pylist()) == [100 + i for i in range(6)]

    with pytest.raises(ShardError, match="not part of this conversion"):
        write_shards(*args, shard_size=4, workers=0, progress=False)


def test_parallel_writer_matches_serial(coco_dir, tmp_path):
    dataset = load_coco(str(coco_dir / "instances.json"))
    write_shards(dataset, str(coco_dir / "images"), str(tmp_path / "serial"), shard_size=3, workers=0, progress=False)
    report = write_shards(
        dataset, str(coco_dir / "images"), str(tmp_path / "par"), shard_size=3, workers=2, progress=False
    )
    assert report.shards_written == 2
    for a, b in zip(sorted((tmp_path / "serial").glob("*.parquet")), sorted((tmp_path / "par").glob("*.parquet"))):
        assert a.name == b.name
        assert pq.read_table(a).equals(pq.read_table(b))


def test_ground_truth_rebuilt_from_shards_evaluates_to_perfect_ap(coco_dir, tmp_path):
    out = tmp_path / "shards"
    write_shards(
        load_coco(str(coco_dir / "instances.json")), str(coco_dir / "images"), str(out), workers=0, progress=False
    )
    gt_dict = coco_ground_truth(str(out))
    source = json.loads((coco_dir / "instances.json").read_text())
    assert {i["id"]: (i["width"], i["height"]) for i in gt_dict["images"]} == {
        i["id"]: (i["width"], i["height"]) for i in source["images"]
    }
    assert sorted(a["id"] for a in gt_dict["annotations"]) == sorted(a["id"] for a in source["annotations"])
    assert gt_dict["categories"] == sorted(source["categories"], key=lambda c: c["id"])

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = gt_dict
        gt.createIndex()
        dets = [
            {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in gt_dict["annotations"]
        ]
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[1] == pytest.approx(1.0)


def test_read_meta_of_an_unfinished_directory_says_so(tmp_path):
    with pytest.raises(ShardError, match="no _meta.json; not a finished shard directory"):
        read_meta(str(tmp_path))


def test_uri_locations_work_like_local_paths(coco_dir, tmp_path):
    """A pyarrow filesystem URI (file:// here; s3:// and gs:// take the same path) for the
    annotation file, the images and the output."""
    out = f"file://{tmp_path}/uri-shards"
    dataset = load_coco(f"file://{coco_dir}/instances.json")
    report = write_shards(dataset, f"file://{coco_dir}/images", out, shard_size=4, workers=0, progress=False)
    assert report.images_written == 6
    assert read_meta(out).counts["images"] == 6
    assert len(coco_ground_truth(out)["annotations"]) == 6
    assert (
        write_shards(dataset, f"file://{coco_dir}/images", out, shard_size=4, workers=0, progress=False).shards_reused
        == 2
    )


def test_read_rows_fetches_only_the_asked_images(coco_dir, tmp_path):
    out = tmp_path / "shards"
    write_shards(
        load_coco(str(coco_dir / "instances.json")),
        str(coco_dir / "images"),
        str(out),
        shard_size=4,
        workers=0,
        progress=False,
    )
    rows = read_rows(str(out), [101, 105, 999], columns=("image", "width"))
    assert sorted(rows) == [101, 105]  # 999 is not in the split; 101 and 105 are in different shards
    assert rows[101]["image"] == (coco_dir / "images" / "img_001.png").read_bytes() and rows[105]["width"] == 64
    assert set(rows[105]) == {"image_id", "image", "width"}
    assert read_rows(str(out), []) == {}


# ---------------------------------------------------------------------------------------------
# Read errors: retried; one that persists fails its shard, which a rerun redoes.
# The I/O errors are real: a directory stands where the image file should be, so reading it
# fails in the filesystem (IsADirectoryError) until the file is put back.

FAST_RETRY = ReadRetry(attempts=3, first_delay=0.01, max_delay=0.02)


class _PutBackAfterFailures(logging.Handler):
    """Replaces the directory at `path` by the file's bytes once `failures` retry warnings about
    it were logged: reads fail that many times, then succeed."""

    def __init__(self, path, data: bytes, failures: int):
        super().__init__(logging.WARNING)
        self.path, self.data, self.failures, self.seen = path, data, failures, 0

    def emit(self, record):
        if str(self.path) in record.getMessage() and "retrying" in record.getMessage():
            self.seen += 1
            if self.seen == self.failures:
                self.path.rmdir()
                self.path.write_bytes(self.data)


def _unreadable(path):
    """Puts a directory in place of the file; returns the file's bytes."""
    data = path.read_bytes()
    path.unlink()
    path.mkdir()
    return data


def test_transient_read_error_is_retried_and_the_image_kept(coco_dir, tmp_path):
    image = coco_dir / "images" / "img_003.jpg"
    data = _unreadable(image)
    handler = _PutBackAfterFailures(image, data, failures=2)
    logger = logging.getLogger("detr_ray.data.shards")
    logger.addHandler(handler)
    try:
        report = write_shards(
            load_coco(str(coco_dir / "instances.json")),
            str(coco_dir / "images"),
            str(tmp_path / "out"),
            shard_size=2,
            workers=0,
            progress=False,
            read_retry=FAST_RETRY,
        )
    finally:
        logger.removeHandler(handler)
    assert handler.seen == 2  # two reads failed for real, the third succeeded
    assert report.images_written == 6 and not report.skipped_images
    assert read_rows(str(tmp_path / "out"), [103])[103]["image"] == data


@pytest.mark.parametrize("workers", [0, 2])
def test_persistent_read_error_fails_its_shard_and_a_rerun_redoes_it(coco_dir, tmp_path, workers):
    image = coco_dir / "images" / "img_004.jpg"
    data = _unreadable(image)
    dataset = load_coco(str(coco_dir / "instances.json"))
    out = tmp_path / "out"
    with pytest.raises(ShardError) as failure:
        write_shards(
            dataset,
            str(coco_dir / "images"),
            str(out),
            shard_size=2,
            workers=workers,
            progress=False,
            read_retry=FAST_RETRY,
        )
    message = str(failure.value)
    assert "1 of 3 shards not written" in message and "after 3 attempts" in message
    assert "shard part-00002-of-00003-" in message and "image_id=104 'img_004.jpg'" in message
    assert "IsADirectoryError" in message
    written = sorted(p.name for p in out.glob("*.parquet"))
    assert len(written) == 2 and not any(name.startswith("part-00002") for name in written)
    assert not (out / META_FILE).exists()

    image.rmdir()
    image.write_bytes(data)
    rerun = write_shards(dataset, str(coco_dir / "images"), str(out), shard_size=2, workers=0, progress=False)
    assert rerun.shards_reused == 2 and rerun.shards_written == 1
    assert rerun.images_written == 6 and not rerun.skipped_images
    assert read_meta(str(out)).counts["images"] == 6


def test_a_shard_that_skipped_an_image_over_a_read_error_is_redone(coco_dir, tmp_path):
    """Shards written when a read error made an image an "unreadable file" skip hold a hole that
    says nothing about the image: a rerun redoes them instead of reusing them."""
    dataset = load_coco(str(coco_dir / "instances.json"))
    out = tmp_path / "out"
    write_shards(dataset, str(coco_dir / "images"), str(out), shard_size=3, workers=0, progress=False)
    first = sorted(out.glob("*.parquet"))[0]
    table = pq.read_table(first)
    report = json.loads(table.schema.metadata[b"detr_ray.shard_report"])
    report["rows"] -= 1
    report["skipped_images"] = [{"image_id": 100, "file_name": "img_000.jpg", "reason": "unreadable file (EIO)"}]
    keep = table.filter(pa.compute.not_equal(table.column("image_id"), 100))
    pq.write_table(keep.replace_schema_metadata({b"detr_ray.shard_report": json.dumps(report).encode()}), first)

    rerun = write_shards(dataset, str(coco_dir / "images"), str(out), shard_size=3, workers=0, progress=False)
    assert rerun.shards_written == 1 and rerun.shards_reused == 1
    assert sorted(read_shard_table(str(out)).column("image_id").to_pylist()) == [100 + i for i in range(6)]


# ---------------------------------------------------------------------------------------------
# Hostile images: the pixel count is checked in the header, before anything is decoded.


def _png_declaring(width: int, height: int) -> bytes:
    """A valid 1-bit grayscale PNG of width x height black pixels: ~200 kB on disk for
    40000 x 40000, 4.8 GB once decoded to RGB."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = bytes(1 + -(-width // 8))  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    rows_per_piece = 1000
    idat = (
        b"".join(
            compressor.compress(row * min(rows_per_piece, height - start)) for start in range(0, height, rows_per_piece)
        )
        + compressor.flush()
    )
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


_CONVERT_IN_CHILD = """
import json, resource, sys
from detr_ray.data.coco import load_coco
from detr_ray.data.shards import write_shards
root = sys.argv[1]
# The same images without the large one first: imports and buffers are in place before measuring.
write_shards(load_coco(root + "/instances.json"), root + "/images", root + "/warm-up", workers=0, progress=False)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
report = write_shards(load_coco(root + "/with_bomb.json"), root + "/images", root + "/out", workers=0, progress=False)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"skipped": report.skipped_images, "written": report.images_written, "grew_kb": after - before}))
"""


@pytest.mark.timeout(120)
def test_an_image_declaring_too_many_pixels_is_skipped_without_decoding_it(coco_dir):
    """A 200 kB PNG declaring 40000 x 40000 pixels (annotated at that size, so that only the
    pixel limit can refuse it). Converted in a child process whose peak memory is measured and
    whose address space is capped, so that decoding it could not take this machine down."""
    bomb = _png_declaring(40000, 40000)
    assert len(bomb) < 1_000_000
    (coco_dir / "images" / "bomb.png").write_bytes(bomb)
    coco = json.loads((coco_dir / "instances.json").read_text())
    coco["images"].append({"id": 999, "file_name": "bomb.png", "width": 40000, "height": 40000})
    (coco_dir / "with_bomb.json").write_text(json.dumps(coco))

    def cap_address_space():
        resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, 8 * 2**30))  # imports map ~4 GB

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    child = subprocess.run(
        [sys.executable, "-c", _CONVERT_IN_CHILD, str(coco_dir)],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=cap_address_space,
        timeout=100,
    )
    assert child.returncode == 0, child.stderr[-2000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert [(s["image_id"], s["reason"].split(" (")[0]) for s in result["skipped"]] == [(999, SKIP_TOO_LARGE)]
    assert result["written"] == 6
    assert result["grew_kb"] < 50 * 1024  # decoding it would take 4.8 GB


def test_max_pixels_is_an_option(coco_dir, tmp_path):
    dataset = load_coco(str(coco_dir / "instances.json"))  # 6 images of 64 x 48 = 3072 pixels
    report = write_shards(
        dataset, str(coco_dir / "images"), str(tmp_path / "a"), workers=0, progress=False, max_pixels=3071
    )
    assert report.images_written == 0 and len(report.skipped_images) == 6
    assert report.skipped_images[0]["reason"] == f"{SKIP_TOO_LARGE} (64x48 = 3072 pixels, limit 3071)"
    # Made with another limit: not reused.
    again = write_shards(
        dataset, str(coco_dir / "images"), str(tmp_path / "a"), workers=0, progress=False, max_pixels=3072
    )
    assert again.shards_written == 1 and again.images_written == 6


def _files(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir()}


@pytest.mark.parametrize(
    "present",
    [
        {"notes.txt": b"my notes"},
        {META_FILE: b'{"mine": true}'},  # a _meta.json that is not detr-ray's: never replaced
        {"other.parquet": b"PAR1 not ours"},
    ],
)
def test_an_output_directory_with_other_files_is_refused_untouched(coco_dir, tmp_path, present):
    out = tmp_path / "shards"
    out.mkdir()
    for name, data in present.items():
        (out / name).write_bytes(data)
    with pytest.raises(ShardError, match=f"{out}: holds .*{list(present)[0]}"):
        write_shards(
            load_coco(str(coco_dir / "instances.json")),
            str(coco_dir / "images"),
            str(out),
            shard_size=4,
            workers=0,
            progress=False,
        )
    assert _files(out) == present


def test_an_output_directory_with_a_subdirectory_is_refused(coco_dir, tmp_path):
    (tmp_path / "shards" / "train").mkdir(parents=True)
    with pytest.raises(ShardError, match=r"did not write \(train/\)"):
        write_shards(
            load_coco(str(coco_dir / "instances.json")),
            str(coco_dir / "images"),
            str(tmp_path / "shards"),
            workers=0,
            progress=False,
        )
    assert [p.name for p in (tmp_path / "shards").iterdir()] == ["train"]


def test_own_meta_and_leftovers_of_an_interrupted_write_are_not_in_the_way(coco_dir, tmp_path):
    out = tmp_path / "shards"
    dataset = load_coco(str(coco_dir / "instances.json"))
    write_shards(dataset, str(coco_dir / "images"), str(out), shard_size=4, workers=0, progress=False)
    (out / f"{META_FILE}.0123abcd.tmp").write_bytes(b"{")  # killed while writing the meta
    report = write_shards(dataset, str(coco_dir / "images"), str(out), shard_size=4, workers=0, progress=False)
    assert report.shards_reused == 2 and read_meta(str(out)).counts["images"] == 6


@pytest.mark.parametrize(
    "name, uri, reason",
    [
        ("../secret.jpg", False, "climbs out"),  # a dataset built in code: load_coco would refuse it
        ("sub%2F..%2F..%2Fsecret.jpg", True, "holds %, \\? or #"),  # pyarrow decodes %2F in a URI
    ],
)
def test_a_file_name_outside_the_images_directory_is_never_read(coco_dir, tmp_path, name, uri, reason):
    import dataclasses

    (coco_dir / "images" / "sub").mkdir()
    outside = coco_dir / "secret.jpg"  # a valid image of the right size, next to images/
    outside.write_bytes((coco_dir / "images" / "img_000.jpg").read_bytes())
    dataset = load_coco(str(coco_dir / "instances.json"))
    dataset.images[0] = dataclasses.replace(dataset.images[0], file_name=name)
    images = f"file://{coco_dir}/images" if uri else str(coco_dir / "images")
    with pytest.raises(ShardError, match=f"image id=100: file_name '{re.escape(name)}' {reason}"):
        write_shards(dataset, images, str(tmp_path / "shards"), workers=0, progress=False)
    assert not (tmp_path / "shards").exists()


@pytest.mark.parametrize(
    "name",
    ["../elsewhere/part.parquet", "/abs/part.parquet", "sub/part.parquet", "..", "", "..%2Felsewhere%2Fpart.parquet"],
)
def test_shard_names_in_the_meta_stay_in_the_shard_directory(coco_dir, tmp_path, name):
    out = tmp_path / "shards"
    write_shards(
        load_coco(str(coco_dir / "instances.json")),
        str(coco_dir / "images"),
        str(out),
        shard_size=4,
        workers=0,
        progress=False,
    )
    # A real shard where the name would lead: the reader must not get there.
    (tmp_path / "elsewhere").mkdir()
    first = sorted(out.glob("*.parquet"))[0]
    (tmp_path / "elsewhere" / "part.parquet").write_bytes(first.read_bytes())
    meta = json.loads((out / META_FILE).read_text())
    meta["shards"][1]["file"] = name.replace("/abs", str(tmp_path / "elsewhere"))
    (out / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(
        ShardError, match=r"_meta.json: shards\[1\]: file .* is not a file name inside the shard directory"
    ):
        read_shard_table(str(out))
    with pytest.raises(ShardError, match=r"shards\[1\]: file .* is not a file name inside"):
        read_shard_table(f"file://{out}")
    meta["shards"][1] = {"file": 7}
    (out / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ShardError, match=r"shards\[1\] must be"):
        read_meta(str(out))
