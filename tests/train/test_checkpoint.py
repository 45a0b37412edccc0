import json

import pytest
import torch

from detr_ray.model import build_model
from detr_ray.train import checkpoint as ckpt
from detr_ray.train.step import build_optimizer
from tests.conftest import tiny_config


def _save(path, epoch=0, seed=0):
    torch.manual_seed(seed)
    model = build_model(tiny_config())
    opt = build_optimizer(model, 1e-4, 1e-5, 1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10)
    state = ckpt.TrainingState(epoch=epoch, global_step=7 * (epoch + 1), config={"lr": 1e-4}, categories={"label_to_category_id": [1, 5, 9]}, metrics={"val/AP": 0.25})
    ckpt.save(path, model, opt, sched, torch.amp.GradScaler("cpu", enabled=False), state)
    return model


def test_round_trip(tmp_path):
    model = _save(tmp_path / "c0", epoch=3)
    loaded = ckpt.load(tmp_path / "c0")
    assert loaded.state.epoch == 3 and loaded.state.metrics["val/AP"] == 0.25
    assert loaded.state.categories["label_to_category_id"] == [1, 5, 9]
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.model[k])
    assert loaded.scheduler["step_size"] == 10
    manifest = json.loads((tmp_path / "c0" / ckpt.MANIFEST).read_text())
    assert set(manifest["files"]) == {"model.pt", "optimizer.pt", "scheduler.pt", "scaler.pt", "state.json"}


def test_flipped_byte_and_missing_manifest_are_refused(tmp_path):
    _save(tmp_path / "good", epoch=0)
    _save(tmp_path / "flipped", epoch=1)
    _save(tmp_path / "unfinished", epoch=2)
    blob = bytearray((tmp_path / "flipped" / "model.pt").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (tmp_path / "flipped" / "model.pt").write_bytes(bytes(blob))
    (tmp_path / "unfinished" / ckpt.MANIFEST).unlink()
    with pytest.raises(ckpt.CheckpointError, match="model.pt.*corrupt"):
        ckpt.load(tmp_path / "flipped")
    with pytest.raises(ckpt.CheckpointError, match="MANIFEST.json: missing"):
        ckpt.verify(tmp_path / "unfinished")
    order = [tmp_path / "good", tmp_path / "flipped", tmp_path / "unfinished"]
    assert ckpt.latest_valid(order) == tmp_path / "good"
    assert ckpt.latest_valid(order[1:]) is None


def test_pickled_code_in_a_checkpoint_is_refused(tmp_path):
    _save(tmp_path / "c")
    torch.save({"evil": ckpt.TrainingState(0, 0, {})}, tmp_path / "c" / "optimizer.pt")
    # Re-sign the manifest so that only the unpickling guard stands in the way.
    manifest = json.loads((tmp_path / "c" / ckpt.MANIFEST).read_text())
    f = tmp_path / "c" / "optimizer.pt"
    manifest["files"]["optimizer.pt"] = {"sha256": ckpt._sha256(f), "bytes": f.stat().st_size}
    (tmp_path / "c" / ckpt.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointError, match="weights_only"):
        ckpt.load(tmp_path / "c")
