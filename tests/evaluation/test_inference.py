"""Ray Data inference of the tiny trained checkpoint (local Ray, CPU actors)."""

import shutil
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from detr_ray.coco_eval import evaluate
from detr_ray.data.shards import coco_ground_truth, read_rows
from detr_ray.data.transforms import DetectionTransform
from detr_ray.evaluation.inference import InferenceConfig, InferenceError, load_detector, run_inference
from detr_ray.model import build_model, postprocess
from detr_ray.model.predict import detections_to_results, normalize

pytestmark = pytest.mark.timeout(400)


def _with_corrupt_image(val: str, out: Path) -> tuple[str, int]:
    """A copy of the val shards whose first image of the second shard file cannot be decoded."""
    shutil.copytree(val, out)
    path = sorted(out.glob("*.parquet"))[1]
    table = pq.read_table(path)
    images = table.column("image").to_pylist()
    images[0] = b"\xff\xd8 not a jpeg"
    table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    pq.write_table(table, path)
    return str(out), table.column("image_id")[0].as_py()


def _direct(detector, val: str, image_id: int) -> list[dict]:
    """The same checkpoint on one image, without Ray: decode, val transform, forward."""
    from torchvision.io import decode_image

    model = build_model(detector.model)
    model.load_state_dict(detector.weights)
    model.eval()
    row = read_rows(val, [image_id], columns=("image", "height", "width"))[image_id]
    image = decode_image(torch.frombuffer(bytearray(row["image"]), dtype=torch.uint8))
    image, _, _ = DetectionTransform(detector.transform, train=False)(
        image, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)
    )
    with torch.no_grad():
        out = model(normalize(image[None]), torch.zeros(1, *image.shape[-2:], dtype=torch.bool))
    dets = postprocess(out, [[row["height"], row["width"]]], detector.label_to_category_id)
    return detections_to_results([image_id], dets)


def test_every_query_of_every_image_with_the_datasets_category_ids(tiny_run, tmp_path):
    detector = load_detector(tiny_run["checkpoint"])
    assert detector.label_to_category_id == [1, 2, 3] and detector.model.num_classes == 3
    val, bad_id = _with_corrupt_image(tiny_run["val"], tmp_path / "val")
    inference = run_inference(detector, val, InferenceConfig(batch_size=1, progress=False))
    queries = detector.model.num_queries
    assert inference.images == 12 and inference.skipped == [bad_id] and inference.device == "cpu"
    assert len(inference.results) == 11 * queries
    ids = [r["image_id"] for r in inference.results]
    assert ids == sorted(ids) and bad_id not in ids
    assert all(ids.count(i) == queries for i in set(ids))
    assert {r["category_id"] for r in inference.results} <= {1, 2, 3}
    assert all(0 < r["score"] < 1 and len(r["bbox"]) == 4 for r in inference.results)
    # What the actors computed is what the model gives on each image alone.
    for image_id in sorted(set(ids))[:4]:
        expected = _direct(detector, val, image_id)
        got = [r for r in inference.results if r["image_id"] == image_id]
        assert [r["category_id"] for r in got] == [r["category_id"] for r in expected]
        assert [r["score"] for r in got] == pytest.approx([r["score"] for r in expected], abs=1e-5)
        assert [r["bbox"] for r in got] == [pytest.approx(r["bbox"], abs=1e-3) for r in expected]
    ev = evaluate(coco_ground_truth(val), inference.results)
    assert 0 <= ev.metrics["val/AP"] <= 1


def test_a_checkpoint_of_other_categories_is_refused(tiny_run):
    detector = load_detector(tiny_run["checkpoint"])
    other = replace(detector, label_to_category_id=[1, 2, 17])
    with pytest.raises(InferenceError, match=r"predicts category ids \[17\] that .*val does not have"):
        run_inference(other, tiny_run["val"], InferenceConfig(progress=False))
    with pytest.raises(InferenceError, match=r"has no GPUs"):
        run_inference(detector, tiny_run["val"], InferenceConfig(use_gpu=True, progress=False))
