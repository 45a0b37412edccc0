import json

import pytest
import torch

from detr_ray import checkpoint as ckpt
from detr_ray.model import build_model
from detr_ray.train.step import build_optimizer
from tests.conftest import tiny_config


def _save(path, epoch=0, seed=0):
    torch.manual_seed(seed)
    model = build_model(tiny_config())
    opt = build_optimizer(model, 1e-4, 1e-5, 1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10)
    state = ckpt.TrainingState(
        epoch=epoch,
        global_step=7 * (epoch + 1),
        config={"lr": 1e-4},
        categories={"label_to_category_id": [1, 5, 9]},
        metrics={"val/AP": 0.25},
    )
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


def _resign(directory, name):
    """Rewrites the manifest entry of `name` to match the file as it is now."""
    manifest = json.loads((directory / ckpt.MANIFEST).read_text())
    f = directory / name
    manifest["files"][name] = {"sha256": ckpt._sha256(f), "bytes": f.stat().st_size}
    (directory / ckpt.MANIFEST).write_text(json.dumps(manifest))


def _with_entry(name, meta):
    return lambda m: {**m, "files": {**m["files"], name: meta}}


MALFORMED = {  # how the written manifest is spoilt: raw bytes, or a function of the good one
    "bad JSON": b"{",
    "bad UTF-8": b"\xff\xfe{",
    "a list": b"[]",
    "a string": b'"files"',
    "no format": lambda m: {"files": m["files"]},
    "no files": lambda m: {"format": m["format"]},
    "files as a list": lambda m: {**m, "files": list(m["files"])},
    "entry not an object": _with_entry("model.pt", 7),
    "entry without sha256": _with_entry("model.pt", {"bytes": 3}),
    "entry without bytes": _with_entry("model.pt", {"sha256": "ab"}),
    "bytes as a string": _with_entry("model.pt", {"sha256": "ab", "bytes": "3"}),
    "a required file not listed": lambda m: {**m, "files": {k: v for k, v in m["files"].items() if k != ckpt.STATE}},
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_manifest_is_a_checkpoint_error(tmp_path, case):
    _save(tmp_path / "good", epoch=0)
    _save(tmp_path / "bad", epoch=1)
    path = tmp_path / "bad" / ckpt.MANIFEST
    spoil = MALFORMED[case]
    path.write_bytes(spoil if isinstance(spoil, bytes) else json.dumps(spoil(json.loads(path.read_text()))).encode())
    with pytest.raises(ckpt.CheckpointError, match=str(path)):
        ckpt.verify(tmp_path / "bad")
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load(tmp_path / "bad")
    # Resuming skips it for the previous good one.
    assert ckpt.latest_valid([tmp_path / "good", tmp_path / "bad"]) == tmp_path / "good"


def test_a_state_that_is_not_a_training_state_is_a_checkpoint_error(tmp_path):
    _save(tmp_path / "c")
    for text in (
        "[1, 2]",
        json.dumps({"epoch": 0, "global_step": 0, "config": {}, "surprise": 1}),
        json.dumps({"epoch": 0}),
    ):
        (tmp_path / "c" / ckpt.STATE).write_text(text)
        _resign(tmp_path / "c", ckpt.STATE)  # a manifest that vouches for it: only the shape check is left
        with pytest.raises(ckpt.CheckpointError, match=r"state.json: not a training state"):
            ckpt.load(tmp_path / "c")


def test_manifest_entries_outside_the_checkpoint_are_refused(tmp_path):
    _save(tmp_path / "c")
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"not part of any checkpoint")
    meta = {"sha256": ckpt._sha256(secret), "bytes": secret.stat().st_size}
    manifest = json.loads((tmp_path / "c" / ckpt.MANIFEST).read_text())
    for name in ("../secret.bin", str(secret), "sub/../../secret.bin", "..\\secret.bin"):
        (tmp_path / "c" / ckpt.MANIFEST).write_text(
            json.dumps({**manifest, "files": {**manifest["files"], name: meta}})
        )
        with pytest.raises(
            ckpt.CheckpointError, match=r"entry .*secret.bin.* not a file inside the checkpoint directory"
        ):
            ckpt.verify(tmp_path / "c")
    # A listed file that is a link to outside the directory is not followed either.
    (tmp_path / "c" / ckpt.MANIFEST).write_text(json.dumps(manifest))
    (tmp_path / "c" / "model.pt").unlink()
    (tmp_path / "c" / "model.pt").symlink_to(secret)
    _resign(tmp_path / "c", "model.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"model.pt: a link to outside the checkpoint directory"):
        ckpt.verify(tmp_path / "c")


def test_verify_hashes_every_file_behind_a_uri(tmp_path):
    """A checkpoint behind a pyarrow URI is verified as fully as a local one (file:// goes through
    the same pyarrow FileSystem calls as s3://)."""
    _save(tmp_path / "good")
    _save(tmp_path / "flipped")
    blob = bytearray((tmp_path / "flipped" / "optimizer.pt").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (tmp_path / "flipped" / "optimizer.pt").write_bytes(bytes(blob))
    uri = "file://" + str(tmp_path)
    assert ckpt.verify(uri + "/good") == json.loads((tmp_path / "good" / ckpt.MANIFEST).read_text())
    with pytest.raises(ckpt.CheckpointError, match=r"file://.*flipped/optimizer.pt: contents do not match"):
        ckpt.verify(uri + "/flipped")
    with pytest.raises(ckpt.CheckpointError, match=r"missing; the checkpoint was never completed"):
        (tmp_path / "good" / ckpt.MANIFEST).rename(tmp_path / "good" / "MANIFEST.old")
        ckpt.verify(uri + "/good")


def test_verify_against_an_expected_manifest(tmp_path):
    _save(tmp_path / "c", seed=0)
    first = ckpt.verify(tmp_path / "c")
    assert ckpt.load(tmp_path / "c", first).state.epoch == 0
    _save(tmp_path / "c", seed=1)  # another, valid checkpoint in the same place
    with pytest.raises(ckpt.CheckpointError, match=r"not the checkpoint verified earlier"):
        ckpt.load(tmp_path / "c", first)


def test_best_verified_falls_back_to_the_next_best(tmp_path, caplog):
    for name in ("a", "b", "c"):
        _save(tmp_path / name)
    blob = bytearray((tmp_path / "a" / "model.pt").read_bytes())
    blob[-10] ^= 0xFF
    (tmp_path / "a" / "model.pt").write_bytes(bytes(blob))
    candidates = [
        (0.2, str(tmp_path / "c")),
        (0.9, str(tmp_path / "a")),
        (0.5, str(tmp_path / "b")),
        (float("nan"), str(tmp_path / "c")),
        (None, str(tmp_path / "c")),
        (True, str(tmp_path / "c")),
    ]
    (value, location), manifest = ckpt.best_verified(candidates, "max")
    assert (value, location) == (0.5, str(tmp_path / "b")) and manifest["format"] == ckpt.FORMAT_VERSION
    assert "a/model.pt: contents do not match" in caplog.text
    assert ckpt.best_verified(candidates, "min")[0] == (0.2, str(tmp_path / "c"))
    assert ckpt.best_verified(candidates[1:2], "max") is None


def test_a_full_disk_fails_the_save_naming_the_file_and_leaves_no_checkpoint(tmp_path):
    """The writer on a real full filesystem (a 4 MB tmpfs; root only). The whole run on a disk that
    fills up, resumed once space is freed, is the ENOSPC case of the fault suite (benchmarks/faults.py)."""
    from tests.faults.scenarios import tiny_tmpfs

    model = build_model(tiny_config())
    with tiny_tmpfs(tmp_path / "tmpfs", size_mb=4) as mounted:
        if mounted is None:
            pytest.skip("mounting a tmpfs needs root")
        target = mounted / "checkpoint_epoch0001"
        with pytest.raises(OSError, match=r"cannot write checkpoint file .*model\.pt: No space left") as e:
            ckpt.save(target, model, None, None, None, ckpt.TrainingState(epoch=1, global_step=1, config={}))
        assert e.value.errno == 28
        assert list(target.iterdir()) == []  # no partial file, no manifest: nothing that looks saved
        with pytest.raises(ckpt.CheckpointError):
            ckpt.verify(target)
