import json

import pytest

from detr_ray.data.coco import (
    DROP_DEGENERATE,
    DROP_OUTSIDE,
    DROP_UNKNOWN_CATEGORY,
    DROP_UNKNOWN_IMAGE,
    CocoFormatError,
    load_coco,
    parse_coco,
)


def base():
    return {
        "images": [
            {"id": 2, "file_name": "b.jpg", "width": 100, "height": 50},
            {"id": 1, "file_name": "a.jpg", "width": 100, "height": 50},
        ],
        "categories": [
            {"id": 9, "name": "z", "supercategory": "s1"},
            {"id": 2, "name": "x", "supercategory": "s2"},
            {"id": 5, "name": "y"},
        ],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [10, 10, 20, 20], "area": 300}],
    }


def test_labels_follow_sorted_category_ids_and_images_are_sorted():
    ds = parse_coco(base(), "x.json")
    assert ds.label_to_category_id == [2, 5, 9]
    assert [c.name for c in ds.categories] == ["x", "y", "z"]
    assert ds.categories[1].supercategory == ""
    assert [r.id for r in ds.images] == [1, 2]
    (ann,) = ds.annotations[1]
    assert ann.bbox == (10, 10, 20, 20) and ann.area == 300 and not ann.iscrowd
    assert 2 not in ds.annotations  # the empty image is kept, with no annotations
    assert len(ds.images) == 2


def test_bad_boxes_and_unknown_references_are_dropped_and_counted():
    data = base()
    data["annotations"] += [
        {"id": 2, "image_id": 1, "category_id": 5, "bbox": [0, 0, 0, 5]},  # zero width
        {"id": 3, "image_id": 1, "category_id": 5, "bbox": [0, 0, 5, -1]},  # negative height
        {"id": 4, "image_id": 1, "category_id": 5, "bbox": [90, 40, 30, 30]},  # clipped
        {"id": 5, "image_id": 1, "category_id": 5, "bbox": [-10, -10, 15, 20]},  # clipped
        {"id": 6, "image_id": 1, "category_id": 5, "bbox": [200, 0, 10, 10]},  # outside
        {"id": 7, "image_id": 77, "category_id": 5, "bbox": [0, 0, 10, 10]},  # unknown image
        {"id": 8, "image_id": 2, "category_id": 4, "bbox": [0, 0, 10, 10]},  # unknown category
        {"id": 9, "image_id": 2, "category_id": 9, "bbox": [1, 2, 3, 4], "iscrowd": 1},
    ]
    ds = parse_coco(data, "x.json")
    assert ds.dropped == {DROP_DEGENERATE: 2, DROP_OUTSIDE: 1, DROP_UNKNOWN_IMAGE: 1, DROP_UNKNOWN_CATEGORY: 1}
    assert ds.clipped == 2
    boxes = {a.id: a.bbox for a in ds.annotations[1]}
    assert boxes == {1: (10, 10, 20, 20), 4: (90, 40, 10, 10), 5: (0, 0, 5, 10)}
    assert ds.annotations[1][1].area == 100  # no area given: the clipped box's
    (crowd,) = ds.annotations[2]
    assert crowd.iscrowd and crowd.id == 9
    assert ds.num_source_annotations == 9 and ds.num_annotations == 4


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d.pop("annotations"), "missing required top-level key 'annotations'"),
        (lambda d: d["images"][1].pop("width"), "images[1] (id=1): missing required key 'width'"),
        (lambda d: d["images"][0].update(height="50"), "images[0] (id=2): key 'height' must be int"),
        (lambda d: d["images"][0].update(width=0), "images[0] (id=2): width and height must be positive"),
        (lambda d: d["categories"][2].pop("name"), "categories[2] (id=5): missing required key 'name'"),
        (lambda d: d["annotations"][0].pop("bbox"), "annotations[0] (id=1): missing required key 'bbox'"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "annotations[0] (id=1): key 'bbox' must be 4 numbers"),
        (lambda d: d["images"].append(dict(d["images"][0])), "images[2] (id=2): duplicate image id 2 (also images[0])"),
        (lambda d: d["categories"].append({"id": 2, "name": "q"}), "duplicate category id 2"),
        (lambda d: d["annotations"].append(dict(d["annotations"][0])), "duplicate annotation id 1"),
    ],
)
def test_malformed_input_names_file_entry_and_key(mutate, expected):
    data = base()
    mutate(data)
    with pytest.raises(CocoFormatError) as e:
        parse_coco(data, "ann.json")
    assert str(e.value).startswith("ann.json: ")
    assert expected in str(e.value)


def test_load_coco_hashes_the_file_and_reports_bad_json(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(base()))
    import hashlib

    assert load_coco(str(good)).sha256 == hashlib.sha256(good.read_bytes()).hexdigest()
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [}')
    with pytest.raises(CocoFormatError, match=r"bad.json: malformed JSON: .*line 1"):
        load_coco(str(bad))
    with pytest.raises(CocoFormatError, match=r"missing.json: cannot read"):
        load_coco(str(tmp_path / "missing.json"))


@pytest.mark.parametrize(
    "name",
    [
        "/etc/passwd",
        "../x.jpg",
        "a/../../x.jpg",
        "a/..",
        "..\\x.jpg",
        "C:\\x.jpg",
        "c:x.jpg",
        "\\\\host\\share\\x.jpg",
        "s3://bucket/x.jpg",
        "file:///x.jpg",
        "",
    ],
)
def test_a_file_name_leaving_the_images_directory_is_refused(name):
    data = base()
    data["images"][0]["file_name"] = name
    with pytest.raises(
        CocoFormatError, match=r"^ann.json: images\[0\] \(id=2\): key 'file_name' .*must be a path relative"
    ):
        parse_coco(data, "ann.json")


def test_relative_file_names_are_kept():
    data = base()
    data["images"][0]["file_name"] = "train2017/sub/b..c.jpg"
    data["images"][1]["file_name"] = "./a.jpg"
    assert [r.file_name for r in parse_coco(data, "ann.json").images] == ["./a.jpg", "train2017/sub/b..c.jpg"]
