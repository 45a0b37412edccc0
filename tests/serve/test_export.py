"""The torch.export program of scripts/export.py against the eager model it came from: padded
batches of several sizes (one export for the module; no Ray)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from detr_ray import checkpoint as ckpt
from detr_ray.model import build_model, postprocess
from detr_ray.serve.export import MIN_SIDE, TOLERANCE, Exportable, load_program, random_padded_batch
from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(300)


def _export_script():
    spec = importlib.util.spec_from_file_location("export_script", REPO / "scripts" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(eager model, checkpoint directory, export directory): a tiny DETR saved as a detr-ray
    checkpoint and exported by scripts/export.py."""
    from detr_ray.train.trainer import demo_experiment

    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    cfg = tiny_config(num_queries=5)
    model = build_model(cfg).eval()
    exp = demo_experiment()
    exp["model"].update(
        {
            k: getattr(cfg, k)
            for k in (
                "backbone",
                "backbone_stages",
                "hidden_dim",
                "nheads",
                "enc_layers",
                "dec_layers",
                "dim_feedforward",
                "num_queries",
            )
        }
    )
    state = ckpt.TrainingState(
        epoch=3, global_step=30, config=exp, categories={"label_to_category_id": [1, 2, 7], "names": ["a", "b", "c"]}
    )
    directory = ckpt.save(root / "checkpoint_epoch0003", model, None, None, None, state)
    out = root / "export"
    assert _export_script().main(["--checkpoint", str(directory), "--out", str(out)]) == 0
    return model, directory, out


@pytest.fixture(scope="module")
def program(exported):
    return load_program(exported[2])


@pytest.mark.parametrize(
    "sizes",
    [
        [(64, 64)],  # one image, no padding
        [(80, 120), (96, 71)],  # padded right and bottom
        [(150, 97), (MIN_SIDE, 40), (120, 150), (200, 64)],  # the smallest side the program takes
        [(160, 230)],  # larger than the example the trace saw
    ],
)
def test_exported_program_equals_eager(exported, program, sizes):
    model = exported[0]
    images, mask = random_padded_batch(sizes, seed=len(sizes))
    with torch.no_grad():
        want = Exportable(model)(images, mask)
        got = program[0](images, mask)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= TOLERANCE
    # and so are the detections
    heights_widths = torch.tensor(sizes)
    exported_dets = postprocess({"pred_logits": got[0], "pred_boxes": got[1]}, heights_widths)
    eager_dets = postprocess({"pred_logits": want[0], "pred_boxes": want[1]}, heights_widths)
    for e, w in zip(exported_dets, eager_dets):
        assert torch.equal(e["labels"], w["labels"])
        assert torch.allclose(e["boxes"], w["boxes"], atol=1e-3) and torch.allclose(
            e["scores"], w["scores"], atol=TOLERANCE
        )


def test_export_metadata_and_refusal(exported, program, tmp_path, capsys):
    _, directory, _ = exported
    metadata = program[1]
    assert metadata["categories"] == [
        {"label": 0, "id": 1, "name": "a"},
        {"label": 1, "id": 2, "name": "b"},
        {"label": 2, "id": 7, "name": "c"},
    ]
    assert metadata["model"]["checkpoint"] == str(directory) and metadata["model"]["epoch"] == 3
    assert metadata["input"]["resize"] == {"shortest_side": 80, "max_size": 128, "antialias": True}
    assert metadata["check"]["max_abs_difference"] <= TOLERANCE

    # a directory holding someone else's files is refused, and left alone
    other = tmp_path / "theirs"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert _export_script().main(["--checkpoint", str(directory), "--out", str(other)]) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
