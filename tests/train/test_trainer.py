"""End-to-end runs of the Ray Train trainer on the demo data, on one local Ray instance."""

import json
import os
from dataclasses import replace

import pyarrow.fs as pafs
import pytest
import ray

from detr_ray import checkpoint as ckpt
from detr_ray.config import experiment_from_dict
from detr_ray.data.datasets import resolve_shards
from detr_ray.data.demo import ensure_demo_shards
from detr_ray.data.shards import read_shard_table
from detr_ray.local_ray import init as init_local_ray
from detr_ray.testing_hooks import TestingHooks
from detr_ray.train.loop import load_resume_state, run_checkpoints
from detr_ray.train.trainer import build_trainer, data_config, demo_experiment
from tests.conftest import tiny_config
from tests.tiny_sweep import demo_shards

pytestmark = [pytest.mark.train, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    ensure_demo_shards(root, num_train=48, num_val=16)
    return str(root)


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    # 4 logical CPUs on 2 cores: 2 Train workers plus Ray Data's decode tasks.
    init_local_ray(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _experiment(demo_root, **train):
    exp = demo_experiment()
    exp["model"].update(hidden_dim=32, dim_feedforward=64, num_queries=5)
    exp["data"].update(demo_shards(demo_root), batch_size=4, shuffle_buffer=8)
    exp["train"].update(epochs=2, max_steps_per_epoch=2, max_failures=0, cpus_per_worker=1.0)
    exp["train"].update(train)
    return exp


def test_one_worker_iterates_its_datasets_itself_several_split_them():
    from ray.data import ExecutionOptions
    from ray.data._internal.iterator.stream_split_iterator import StreamSplitDataIterator

    config = data_config(ExecutionOptions())
    datasets = {"train": ray.data.range(10), "val": ray.data.range(7)}
    (one,) = config.configure(datasets, 1, None, None)
    # No split, so no SplitCoordinator actor: the single worker runs each execution itself.
    assert not any(isinstance(it, StreamSplitDataIterator) for it in one.values())
    assert sorted(r["id"] for r in one["val"].iter_rows()) == list(range(7))
    assert sorted(r["id"] for r in one["train"].iter_rows()) == list(range(10))
    two = config.configure(datasets, 2, None, None)
    assert all(isinstance(it, StreamSplitDataIterator) for split in two for it in split.values())


@pytest.fixture(scope="module")
def seeded_runs(demo_root, tmp_path_factory):
    """Three runs of 3 epochs of 2 steps, validated after epochs 2 and 3, each audited: "a" and "b"
    with seed 3, "c" with seed 4. Run "a" is also the run whose metrics and checkpoints are checked
    (each run costs about 20 s on 2 cores)."""
    storage = tmp_path_factory.mktemp("seeded")
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        exp = _experiment(demo_root, seed=seed, eval_every=2, epochs=3)
        exp["data"].update(decode_batch_size=4)  # 12 decode tasks, one at a time (1 worker: 1 CPU of decoding)
        audit = storage / f"audit-{name}"
        result = build_trainer(
            experiment_from_dict(exp), name=name, storage_path=str(storage), testing=TestingHooks(audit_dir=str(audit))
        ).fit()
        records = [json.loads((audit / f"rank0_epoch{epoch}.json").read_text()) for epoch in (1, 2, 3)]
        runs[name] = {"result": result, "dir": storage / name, "audit": records}
    return runs


def test_short_run_reports_metrics_and_verified_checkpoints(seeded_runs):
    result = seeded_runs["a"]["result"]
    m = result.metrics
    assert m["epoch"] == 3 and m["global_step"] == 6 and m["train/start_epoch"] == 0
    for key in (
        "train/loss",
        "train/loss_ce",
        "train/loss_bbox_0",
        "lr",
        "train/images_per_s",
        "train/data_wait_fraction",
        "train/skipped_images",
        "val/AP",
        "val/AP50",
        "val/AR100",
        "val/mean_iou",
    ):
        assert key in m, key
    assert m["val/epoch"] == 3  # the last epoch always validates
    manifest = ckpt.verify(result.checkpoint.path)
    loaded = ckpt.load(result.checkpoint.path)
    assert loaded.state.epoch == 3 and loaded.state.metrics["val/AP"] == m["val/AP"]
    assert loaded.state.categories["label_to_category_id"] == [1, 2, 3]
    assert set(manifest["files"]) >= {"model.pt", "optimizer.pt"}
    # Epoch 1 did not validate: it reports the previous (absent) val metrics and ranks last.
    epochs = {c.path.rsplit("_epoch", 1)[1]: mm for c, mm in result.best_checkpoints}
    assert "0003" in epochs and epochs["0003"]["checkpoint_score"] == m["val/AP"]
    assert all(mm["checkpoint_score"] == -1.0 for k, mm in epochs.items() if k == "0001")
    events = list((seeded_runs["a"]["dir"] / "tensorboard").glob("events.out.tfevents.*"))
    tags = _event_tags(events[0])
    assert {"train/loss", "val/AP", "lr"} <= tags["scalar"]
    assert "val/predictions/0" in tags["image"]  # predictions drawn on val images


def _event_tags(path):
    """Scalar and image tags of a TensorBoard event file (TFRecord framing, Event protos)."""
    import struct

    from tensorboardX.proto import event_pb2

    tags = {"scalar": set(), "image": set()}
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
        pos += 12 + length + 4
        for value in event.summary.value:
            tags["image" if value.HasField("image") else "scalar"].add(value.tag)
    return tags


def test_worker_killed_mid_run_resumes_from_its_checkpoint(demo_root, tmp_path):
    marker = tmp_path / "crashed"
    exp = _experiment(demo_root, epochs=3, num_workers=2, max_failures=1)
    # Rank 1 dies once, at global step 3: the first step of epoch 2, right after epoch 1's report and
    # usually before Ray's controller has registered its checkpoint (it polls every 2 s). The
    # checkpoint is on storage all the same, and the restart must pick it up.
    crash = TestingHooks(crash={"rank": 1, "step": 3, "marker": str(marker)})
    result = build_trainer(
        experiment_from_dict(exp), name="crash", storage_path=str(tmp_path / "runs"), testing=crash
    ).fit()
    assert marker.exists()
    m = result.metrics
    assert m["epoch"] == 3 and m["train/start_epoch"] == 1 and m["global_step"] == 6


def test_three_workers_score_every_val_image_exactly_once(demo_root, tmp_path):
    exp = _experiment(demo_root, epochs=1, max_steps_per_epoch=1, num_workers=3)
    exp["data"].update(ray_data_cpus=1.0, decode_batch_size=4)  # 3 workers + 1 CPU of decoding; several val blocks
    audit = tmp_path / "audit"
    result = build_trainer(
        experiment_from_dict(exp),
        name="val3",
        storage_path=str(tmp_path / "runs"),
        testing=TestingHooks(audit_dir=str(audit)),
    ).fit()
    _, val_uri = resolve_shards(experiment_from_dict(exp).data)  # the demo split the run used
    val_ids = read_shard_table(val_uri, ["image_id"]).column("image_id").to_pylist()
    assert len(val_ids) % 3 and len(set(val_ids)) == len(val_ids)  # an equal split must drop some
    scored = [i for r in range(3) for i in json.loads((audit / f"rank{r}_epoch1.json").read_text())["val_image_ids"]]
    assert sorted(scored) == sorted(val_ids)  # none missing, none twice
    assert result.metrics["val/images"] == len(val_ids)


def test_one_seed_gives_the_same_step_losses_another_seed_others(seeded_runs):
    for run in seeded_runs.values():
        # Each epoch stopped at max_steps_per_epoch (2 steps of 4) and closed its stream: the 48
        # images of the split were not all decoded. At most the 8 trained on, the 2 batches
        # prefetched, one waiting to be queued and one being collated when it closed: 24.
        assert all(r["delivered"] <= 24 for r in run["audit"]), [r["delivered"] for r in run["audit"]]
    first, again, other = ([x for r in seeded_runs[n]["audit"] for x in r["losses"]] for n in "abc")
    assert len(first) == 6  # 3 epochs of 2 steps: shuffle, augmentation and init all draw
    assert first == again
    assert other != first


def test_non_finite_loss_stops_the_run_naming_epoch_and_step(demo_root, tmp_path):
    exp = _experiment(demo_root, lr=1e12, lr_backbone=1e12, clip_max_norm=0.0, max_steps_per_epoch=4)
    with pytest.raises(Exception, match=r"non-finite loss .*at epoch 1, step \d"):
        build_trainer(experiment_from_dict(exp), name="nan", storage_path=str(tmp_path)).fit()


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path):
    from detr_ray.model import build_model

    model = build_model(tiny_config())
    for epoch in (1, 2):
        ckpt.save(
            tmp_path / f"checkpoint_epoch{epoch:04d}", model, None, None, None, ckpt.TrainingState(epoch, epoch * 5, {})
        )
    blob = bytearray((tmp_path / "checkpoint_epoch0002" / "model.pt").read_bytes())
    blob[-100] ^= 0x01
    (tmp_path / "checkpoint_epoch0002" / "model.pt").write_bytes(bytes(blob))
    found = run_checkpoints(pafs.LocalFileSystem(), str(tmp_path))
    assert [os.path.basename(c.path) for c in found] == ["checkpoint_epoch0001", "checkpoint_epoch0002"]
    loaded = load_resume_state(found)
    assert loaded is not None and loaded.state.epoch == 1
    (tmp_path / "checkpoint_epoch0001" / ckpt.MANIFEST).unlink()
    assert load_resume_state(found) is None
    assert run_checkpoints(pafs.LocalFileSystem(), str(tmp_path / "absent")) == []


def test_fine_tuning_maps_the_pretrained_class_head_by_the_data_categories(demo_root, tmp_path):
    import torch

    from detr_ray.config import experiment_from_dict
    from detr_ray.model import build_model

    # lr so small that one step leaves every weight as loaded: the run's checkpoint shows the load.
    exp = _experiment(demo_root, epochs=1, max_steps_per_epoch=1, lr=1e-30, lr_backbone=0.0, weight_decay=0.0)
    torch.manual_seed(5)
    src = build_model(replace(experiment_from_dict(exp).model, num_classes=3))
    # Another dataset's checkpoint: "Triangle" under the demo's id, rectangle under another id.
    stored = {"label_to_category_id": [2, 9, 5], "names": ["Triangle", "rectangle", "hexagon"]}
    ckpt.save(tmp_path / "other", src, None, None, None, ckpt.TrainingState(1, 1, {}, categories=stored))
    exp["train"]["pretrained"] = str(tmp_path / "other")
    result = build_trainer(experiment_from_dict(exp), name="finetune", storage_path=str(tmp_path / "runs")).fit()
    tuned = ckpt.load(result.checkpoint.path)
    assert tuned.state.categories["names"] == ["rectangle", "triangle", "ellipse"]
    w, b = tuned.model["class_embed.weight"], tuned.model["class_embed.bias"]
    sw, sb = src.class_embed.weight.detach(), src.class_embed.bias.detach()
    for label, row in ((0, 1), (1, 0), (3, 3)):  # rectangle by name, triangle by id, no-object
        assert torch.equal(w[label], sw[row]) and torch.equal(b[label], sb[row]), label
    assert not any(torch.allclose(w[2], sw[row]) for row in range(4))  # ellipse: new
