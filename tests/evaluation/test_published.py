"""Published DETR weights scored directly: the architecture read from the state dict, the class
head mapped to the val data's categories, the file's sha256 as its identity, and
scripts/evaluate.py --checkpoint / --compare on a file and an http URL."""

import argparse
import functools
import hashlib
import http.server
import importlib.util
import json
import threading
from pathlib import Path

import pytest
import torch

from detr_ray.data.coco import load_coco
from detr_ray.data.shards import read_meta, write_shards
from detr_ray.evaluation.inference import load_detector
from detr_ray.evaluation.subject import EvaluationTargetError, from_published, is_weights_file, resolve
from detr_ray.model import build_model
from detr_ray.model.predict import normalize
from detr_ray.model.weights import WeightsError, infer_model_config
from tests.conftest import random_batch, tiny_config
from tests.data.conftest import make_coco

# Three of COCO's categories, with COCO's ids and names, in an order of the dataset's own.
COCO_SUBSET = ((18, "dog"), (1, "person"), (44, "bottle"))
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "evaluate.py"


def _shards(root: Path) -> str:
    make_coco(root / "coco", categories=COCO_SUBSET)
    out = root / "shards"
    write_shards(
        load_coco(str(root / "coco" / "instances.json")),
        str(root / "coco" / "images"),
        str(out),
        shard_size=4,
        workers=0,
        progress=False,
    )
    return str(out)


def _published(path: Path, seed: int = 1, **extra) -> torch.nn.Module:
    """A tiny DETR with the published class head (92 logits indexed by COCO category id), saved
    as the reference repository saves it: {"model": state_dict, ...}."""
    torch.manual_seed(seed)
    model = build_model(tiny_config(num_classes=91))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), **extra}, path)
    return model.eval()


def _args(**kw) -> argparse.Namespace:
    """The reference training script's args, as its checkpoint.pth stores them."""
    base = dict(backbone="resnet18", dilation=False, nheads=4, hidden_dim=32, lr=1e-4, dropout=0.0)
    return argparse.Namespace(**{**base, **kw})


def test_architecture_is_read_from_the_state_dict():
    sd = build_model(
        tiny_config(backbone="resnet34", backbone_stages=3, pre_norm=True, frozen_bn=False, num_queries=7, dec_layers=3)
    ).state_dict()
    cfg = infer_model_config(sd, name="x.pth")
    assert cfg == {
        "backbone": "resnet34",
        "backbone_stages": 3,
        "frozen_bn": False,
        "hidden_dim": 32,
        "num_queries": 7,
        "enc_layers": 2,
        "dec_layers": 3,
        "pre_norm": True,
        "dim_feedforward": 64,
        "nheads": 8,
        "dilation": False,
    }
    assert infer_model_config(sd, args={"nheads": 4, "dropout": 0.1})["nheads"] == 4
    assert infer_model_config(sd, given={"nheads": 2})["nheads"] == 2


def test_dc5_is_decided_by_args_or_published_name_and_refused_otherwise():
    r50 = build_model(tiny_config(backbone="resnet50")).state_dict()
    r101 = build_model(tiny_config(backbone="resnet101")).state_dict()
    assert infer_model_config(r101, name="detr-r101-dc5-a2e86def.pth")["dilation"] is True
    assert infer_model_config(r50, name="detr-r50-dc5-f0fb7ef5.pth")["backbone"] == "resnet50"
    assert infer_model_config(r50, name="detr-r50-e632da11.pth")["dilation"] is False
    assert infer_model_config(r101, name="detr-r101-2c7b67e5.pth") == {
        **infer_model_config(r101, name="detr-r101-2c7b67e5.pth"),
        "backbone": "resnet101",
    }
    assert (
        infer_model_config(r50, name="checkpoint.pth", args={"dilation": True, "backbone": "resnet50"})["dilation"]
        is True
    )
    assert infer_model_config(r50, name="mine.pth", given={"dilation": False})["dilation"] is False
    with pytest.raises(
        WeightsError, match=r"mine\.pth: cannot tell whether this resnet50 DETR is a DC5.*model\.dilation=true"
    ):
        infer_model_config(r50, name="mine.pth")
    with pytest.raises(WeightsError, match="name says R50 but its tensors are a resnet101"):
        infer_model_config(r101, name="detr-r50-e632da11.pth")
    with pytest.raises(WeightsError, match="args say backbone 'resnet50' but its tensors are a resnet101"):
        infer_model_config(r101, args={"backbone": "resnet50"})


def test_published_subject_gives_the_reference_probabilities(tmp_path):
    """Loaded the way evaluate.py loads it (from_published -> load_detector, what each inference
    actor builds), a published-layout checkpoint predicts, for every query, the reference model's
    probabilities of the data's categories and no-object, renormalised over them (weights.py)."""
    shards = _shards(tmp_path)
    path = tmp_path / "ref" / "checkpoint.pth"
    ref = _published(path, args=_args(), epoch=299)
    subject = from_published(str(path), tmp_path / "work", data=shards)

    assert subject.kind == "published" and subject.name == "checkpoint.pth"
    assert subject.weights["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert subject.weights["architecture"]["nheads"] == 4 and subject.weights["architecture"]["backbone"] == "resnet18"
    meta = read_meta(shards)
    classes = subject.weights["load"]["classes"]
    assert [(c["label"], c["category_id"], c["how"], c["source_row"]) for c in classes] == [
        (i, cid, "id", cid) for i, cid in enumerate(meta.label_to_category_id)
    ]
    assert "3 by id" in subject.weights["load"]["summary"]

    detector = load_detector(subject.checkpoint, subject.manifest)
    assert detector.label_to_category_id == meta.label_to_category_id
    model = build_model(detector.model)
    model.load_state_dict(detector.weights)
    images, mask, _ = random_batch(seed=3)
    with torch.no_grad():
        a = ref(normalize(images), mask)
        b = model.eval()(normalize(images), mask)
    rows = meta.label_to_category_id + [91]  # the data's categories in label order, then no-object
    p_ref = a["pred_logits"].softmax(-1)[..., rows]
    p = b["pred_logits"].softmax(-1)
    torch.testing.assert_close(p, p_ref / p_ref.sum(-1, keepdim=True), rtol=0, atol=1e-6)
    # Not renormalised, per query: the mapped model's probabilities times the reference's mass on
    # these categories and no-object are exactly the reference's.
    torch.testing.assert_close(p * p_ref.sum(-1, keepdim=True), p_ref, rtol=0, atol=1e-6)
    assert torch.equal(a["pred_boxes"], b["pred_boxes"])


def test_same_name_different_files_are_different_subjects(tmp_path):
    shards = _shards(tmp_path)
    one, two = tmp_path / "a" / "checkpoint.pth", tmp_path / "b" / "checkpoint.pth"
    _published(one, seed=1, args=_args())
    _published(two, seed=2, args=_args())
    s1, s2 = (resolve(str(p), tmp_path / "work", data=shards) for p in (one, two))
    assert s1.name == s2.name and s1.weights["sha256"] != s2.weights["sha256"]
    assert s1.checkpoint != s2.checkpoint
    assert not torch.equal(
        load_detector(s1.checkpoint).weights["class_embed.weight"],
        load_detector(s2.checkpoint).weights["class_embed.weight"],
    )


def test_published_subject_errors_name_the_file(tmp_path):
    shards = _shards(tmp_path)
    bare = tmp_path / "detr-r50-mine.pth"
    _published(bare)
    with pytest.raises(EvaluationTargetError, match="give the val shards"):
        from_published(str(bare), tmp_path / "work", data=None)
    with pytest.raises(EvaluationTargetError, match="only model.* and data.*"):
        from_published(str(bare), tmp_path / "work", data=shards, overrides=["train.lr=1e-4"])
    with pytest.raises(
        EvaluationTargetError, match=r"detr-r50-mine.pth: shape mismatch.*\(96, 32\) vs model \(192, 64\)"
    ):  # a given value that does not fit the tensors
        from_published(str(bare), tmp_path / "work", data=shards, overrides=["model.nheads=4", "model.hidden_dim=64"])
    results = tmp_path / "results.json"
    results.write_text("[]")
    assert is_weights_file(str(bare)) and not is_weights_file(str(results)) and not is_weights_file(str(tmp_path))


@pytest.fixture
def http_server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/served, stopped by the test."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.mark.sweep
@pytest.mark.timeout(300)
def test_evaluate_script_scores_published_weights_from_a_url_and_in_compare(local_ray, http_server, tmp_path, capsys):
    served, url = http_server
    shards = _shards(tmp_path)
    _published(served / "detr-tiny-coco.pth")  # the published layout: {"model": state_dict}, no args
    local = tmp_path / "local" / "detr-tiny-coco.pth"
    local.parent.mkdir()
    local.write_bytes((served / "detr-tiny-coco.pth").read_bytes())
    spec = importlib.util.spec_from_file_location("evaluate_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "report"
    # nheads is not in a bare state dict (the reference's 8 is assumed); this tiny model has 4.
    rc = script.main(
        [
            "--checkpoint",
            f"{url}/detr-tiny-coco.pth",
            "--data",
            shards,
            "--out",
            str(out),
            "--set",
            "model.nheads=4",
            "--compare",
            str(local),
            "--batch-size",
            "4",
            # Published weights are evaluated at COCO's resolution (800 px): each timed image costs
            # almost a second here, and 20 per checkpoint (the default) would time nothing more.
            "--latency-images",
            "2",
            "--no-progress",
        ]
    )
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    sha = hashlib.sha256(local.read_bytes()).hexdigest()
    assert f"sha256 {sha}" in printed.out and "3 by id" in printed.out
    report = json.loads((out / "report.json").read_text())
    subject = report["subject"]
    assert subject["kind"] == "published" and subject["source"] == f"{url}/detr-tiny-coco.pth"
    assert (
        subject["weights"]["sha256"] == sha and [c["how"] for c in subject["weights"]["load"]["classes"]] == ["id"] * 3
    )
    (other,) = report["comparison"]
    assert other["kind"] == "published" and other["source"] == str(local) and other["weights"]["sha256"] == sha
    # The same bytes from the URL and from the file: the same model, the same detections, the same figures.
    assert other["metrics"] == report["metrics"]
    assert f"sha256 `{sha}`" in (out / "report.md").read_text()
    assert [r["efficiency"]["latency_images"] for r in (report, other)] == [2, 2]

    rc = script.main(
        ["--checkpoint", f"{url}/missing.pth", "--data", shards, "--out", str(tmp_path / "r2"), "--no-progress"]
    )
    assert rc == 2 and "missing.pth: cannot fetch" in capsys.readouterr().err


def test_training_reads_weights_from_urls_and_storage_uris(http_server, tmp_path, monkeypatch):
    """load_pretrained (what every trial's workers call) on an http URL and a file:// URI; two
    files published under the same name at two URLs are cached apart."""
    from detr_ray.model import load_pretrained

    served, url = http_server
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    refs = {}
    for seed, folder in enumerate(("a", "b")):
        refs[folder] = _published(served / folder / "detr-tiny.pth", seed=seed)
    for folder, ref in refs.items():
        model = build_model(tiny_config(num_classes=91))
        report = load_pretrained(model, f"{url}/{folder}/detr-tiny.pth")
        assert not report.skipped and torch.equal(model.class_embed.weight, ref.class_embed.weight)
    assert len(list((tmp_path / "hub" / "checkpoints").glob("*-detr-tiny.pth"))) == 2
    model = build_model(tiny_config(num_classes=91))
    load_pretrained(model, (served / "b" / "detr-tiny.pth").as_uri())
    assert torch.equal(model.query_embed.weight, refs["b"].query_embed.weight)
    with pytest.raises(WeightsError, match="missing.pth: cannot fetch"):
        load_pretrained(model, f"{url}/missing.pth")
