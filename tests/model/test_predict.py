"""The one predictor: validation during training and batch inference give the same detections."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from detr_ray.config import DataConfig, to_dict
from detr_ray.data.decode import DECODED_SCHEMA
from detr_ray.evaluation.inference import PREDICTION_SCHEMA, Predictor
from detr_ray.model import build_model
from detr_ray.train.loop import infer_val_part
from tests.conftest import tiny_config

CATEGORY_IDS = [5, 9, 17]


def _decoded_rows() -> pa.Table:
    """Four decoded images of different sizes (so the batch is padded) and one skipped row."""
    g = np.random.default_rng(0)
    sizes = [(64, 80), (48, 96), (80, 64), (56, 56)]
    rows = {name: [] for name in DECODED_SCHEMA.names}
    for i, (h, w) in enumerate(sizes):
        rows["image_id"].append(100 + i)
        rows["image"].append(g.integers(0, 256, h * w * 3, dtype=np.uint8).tobytes())
        rows["height"].append(h)
        rows["width"].append(w)
        rows["orig_height"].append(2 * h)
        rows["orig_width"].append(2 * w + 1)
        rows["boxes"].append([0.5, 0.5, 0.2, 0.3])
        rows["labels"].append([i % 3])
        rows["skipped"].append(False)
    for name, value in zip(DECODED_SCHEMA.names, (104, b"", 0, 0, 30, 40, [], [], True)):
        rows[name].append(value)
    return pa.Table.from_pydict(rows, schema=DECODED_SCHEMA)


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from detr_ray.local_ray import init as init_local_ray

    init_local_ray(num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_validation_and_batch_inference_give_the_same_detections(local_ray):
    import ray.data

    torch.manual_seed(0)
    cfg = tiny_config()
    model = build_model(cfg)
    table = _decoded_rows()

    predictor = Predictor(to_dict(cfg), model.state_dict(), CATEGORY_IDS, use_gpu=False, threads=1)
    out = predictor(table)
    columns = (out.column(n).to_pylist() for n in ("image_id", "category_ids", "scores", "boxes"))
    inferred = [
        {"image_id": i, "category_id": c, "bbox": b, "score": s}
        for i, cats, scores, boxes in zip(*columns)
        for c, s, b in zip(cats, scores, np.asarray(boxes, dtype=np.float64).reshape(-1, 4).tolist())
    ]
    assert out.schema == PREDICTION_SCHEMA and out.column("skipped").to_pylist() == [False] * 4 + [True]

    # The whole table as one batch of the val split, as the predictor received it: the same padding.
    data = DataConfig(batch_size=table.num_rows, group_shapes=False)
    model.train()
    val_part = ray.data.from_arrow(table)
    validated, ids, skipped, _ = infer_val_part(model, val_part, data, torch.device("cpu"), CATEGORY_IDS)
    assert model.training  # left as it was found
    assert ids == [100, 101, 102, 103] and skipped == 1
    assert len(validated) == 4 * cfg.num_queries
    assert {r["category_id"] for r in validated} <= set(CATEGORY_IDS)
    assert validated == inferred  # bit for bit: one code path
