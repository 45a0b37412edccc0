"""A rehearsal of search_spaces/coco_finetune.yaml through scripts/tune.py: 2 trials of 2 steps
on shards whose categories carry COCO ids and names, each trial starting from the published-layout
checkpoint of its own backbone (made here, small: the space's resnet50/101 become resnet18/34
and the model tiny, the `by` table mechanism unchanged)."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from detr_ray.data.coco import load_coco
from detr_ray.data.shards import read_meta, write_shards
from detr_ray.model import build_model
from tests.conftest import tiny_config
from tests.data.conftest import make_coco
from tests.tiny_sweep import tune_command

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.sweep  # the scripts run end to end, each starting its own Ray

COCO_SUBSET = ((18, "dog"), (1, "person"), (44, "bottle"))
MODEL = {"hidden_dim": 32, "nheads": 4, "enc_layers": 1, "dec_layers": 2, "dim_feedforward": 64, "num_queries": 5}


def _published(path: Path, backbone: str, seed: int) -> dict:
    """A published-layout checkpoint ({"model": state dict}, 92-logit COCO-id class head) whose
    frozen BatchNorm statistics are its own, so that a trial's checkpoint shows which it loaded."""
    torch.manual_seed(seed)
    model = build_model(tiny_config(backbone=backbone, num_classes=91, **MODEL))
    sd = model.state_dict()
    sd["backbone.0.body.bn1.running_mean"] = torch.randn_like(sd["backbone.0.body.bn1.running_mean"])
    torch.save({"model": sd}, path)
    return sd


@pytest.mark.timeout(400)
def test_coco_finetune_rehearsal_two_trials_two_steps(tmp_path):
    data = tmp_path / "coco-shards"
    make_coco(tmp_path / "coco", categories=COCO_SUBSET)
    for split in ("train", "val"):
        write_shards(
            load_coco(str(tmp_path / "coco" / "instances.json")),
            str(tmp_path / "coco" / "images"),
            str(data / split),
            shard_size=3,
            workers=0,
            progress=False,
        )
    weights = {"resnet18": tmp_path / "detr-r18-tiny.pth", "resnet34": tmp_path / "detr-r34-tiny.pth"}
    published = {b: _published(p, b, seed) for seed, (b, p) in enumerate(weights.items())}

    raw = yaml.safe_load((REPO / "search_spaces" / "coco_finetune.yaml").read_text())
    raw["search"]["model.backbone"] = {"choice": list(weights)}
    raw["search"]["train.pretrained"] = {"by": {"model.backbone": {b: str(p) for b, p in weights.items()}}}
    space = tmp_path / "coco_finetune.yaml"
    space.write_text(yaml.safe_dump(raw))
    sets = [f"model.{k}={v}" for k, v in MODEL.items()] + [
        "data.augment=demo",
        "data.batch_size=2",
        "data.shuffle_buffer=4",
        "data.decode_num_cpus=0.25",
        "train.epochs=1",
        "train.max_steps_per_epoch=2",
        "train.warmup_epochs=0",
        "train.max_failures=0",
        "train.tensorboard=false",
        "train.num_workers=1",
        "train.gpus_per_worker=0",
        "train.cpus_per_worker=0.5",
    ]
    command = tune_command(space, data, tmp_path / "sweeps", "rehearsal", "--num-samples", "2")
    for s in sets:
        command += ["--set", s]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=360)
    assert done.returncode == 0, done.stderr[-4000:]

    trials = json.loads((tmp_path / "sweeps" / "rehearsal" / "trials.json").read_text())
    assert len(trials["trials"]) == 2 and trials["search"]["train.pretrained"]["by"]["model.backbone"] == {
        b: str(p) for b, p in weights.items()
    }
    meta = read_meta(str(data / "val"))
    rows = meta.label_to_category_id + [91]  # the COCO-id rows of the data's categories, then no-object
    for t in trials["trials"]:
        assert t["status"] == "completed" and t["epochs"] == 1 and t["checkpoint"], t
        backbone = t["config"]["model.backbone"]
        checkpoint = Path(t["checkpoint"])
        state = json.loads((checkpoint / "state.json").read_text())
        assert state["config"]["train"]["pretrained"] == str(weights[backbone])
        assert state["config"]["model"]["backbone"] == backbone
        trained = torch.load(checkpoint / "model.pt", map_location="cpu", weights_only=True)
        source = published[backbone]
        # The trial's own backbone's file was loaded (frozen BatchNorm keeps its statistics) ...
        assert torch.equal(trained["backbone.0.body.bn1.running_mean"], source["backbone.0.body.bn1.running_mean"])
        # ... and its class head came from the published rows of the data's categories (2 small steps since).
        torch.testing.assert_close(trained["class_embed.bias"], source["class_embed.bias"][rows], rtol=0, atol=2e-3)
    assert {t["config"]["model.backbone"] for t in trials["trials"]} <= set(weights)
    assert (tmp_path / "sweeps" / "rehearsal" / "best.json").is_file()
