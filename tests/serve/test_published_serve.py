"""Published DETR weights served directly: the class head mapped to the data's categories exactly
as evaluate.py maps it, the file's sha256 checked again in each replica, categories the file has
no class for refused (no Ray: ServedModel is what each replica builds)."""

import pytest
import torch

from detr_ray.data.coco import load_coco
from detr_ray.data.shards import read_meta, write_shards
from detr_ray.evaluation.subject import EvaluationTargetError
from detr_ray.serve.model import ServedModel, choose_checkpoint
from tests.data.conftest import make_coco
from tests.evaluation.test_published import COCO_SUBSET, _args, _published, _shards


@pytest.mark.timeout(300)
def test_published_weights_are_served_with_their_coco_rows(tmp_path):
    data = _shards(tmp_path / "data")
    weights = tmp_path / "detr-r18-test.pth"
    reference = _published(weights, args=_args())
    spec = choose_checkpoint(checkpoint=str(weights), workdir=tmp_path / "work", data=data)
    assert spec.published["sha256"] == spec.identity["weights_sha256"]

    served = ServedModel(spec, workdir=tmp_path / "replica")
    model = served.predictor.model
    meta = read_meta(data)
    rows = meta.label_to_category_id
    head = dict(model.named_parameters())
    ref = dict(reference.named_parameters())
    # Each label's class row is the published row of its COCO category id; no-object stays last.
    for name in ("class_embed.weight", "class_embed.bias"):
        assert torch.equal(head[name][:-1], ref[name][rows])
        assert torch.equal(head[name][-1], ref[name][-1])
    assert torch.equal(head["bbox_embed.layers.0.weight"], ref["bbox_embed.layers.0.weight"])
    assert sorted(COCO_SUBSET) == sorted(zip(meta.label_to_category_id, meta.label_names))
    assert served.describe()["categories"] == [
        {"label": i, "id": c, "name": n} for i, (c, n) in enumerate(zip(meta.label_to_category_id, meta.label_names))
    ]

    # Another file under the same name after the choice: the replica refuses to serve it.
    _published(weights, seed=2, args=_args())
    with pytest.raises(EvaluationTargetError, match="sha256 is now"):
        ServedModel(spec, workdir=tmp_path / "replica2")


def test_published_weights_need_data_and_known_categories(tmp_path):
    weights = tmp_path / "detr-r18-test.pth"
    _published(weights)
    with pytest.raises(EvaluationTargetError, match="give the val shards"):
        choose_checkpoint(checkpoint=str(weights), workdir=tmp_path / "w1")
    # A category COCO does not have: its row would be random, different in every replica.
    make_coco(tmp_path / "odd" / "coco", categories=((1, "person"), (2, "unicorn")))
    shards = tmp_path / "odd" / "shards"
    write_shards(
        load_coco(str(tmp_path / "odd" / "coco" / "instances.json")),
        str(tmp_path / "odd" / "coco" / "images"),
        str(shards),
        shard_size=4,
        workers=0,
        progress=False,
    )
    with pytest.raises(EvaluationTargetError, match=r"\['unicorn'\].*Fine-tune it"):
        choose_checkpoint(checkpoint=str(weights), workdir=tmp_path / "w2", data=str(shards))
