"""The real Serve app over HTTP: scripts/serve.py in a process of its own, joined to this
module's Ray, serving the tiny checkpoint of tests/evaluation/conftest.py (trained once per
session). One app for the whole module; stopped by SIGTERM in the last test."""

from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from detr_ray import checkpoint as ckpt
from detr_ray.data.shards import shard_files
from detr_ray.evaluation.inference import InferenceConfig, load_detector, run_inference
from detr_ray.evaluation.subject import EvaluationTargetError
from detr_ray.serve.model import choose_checkpoint, manifest_sha256
from tests.evaluation.conftest import local_ray, make_experiment, tiny_run  # noqa: F401  (module fixtures: one Ray, the tiny run)

REPO = Path(__file__).resolve().parents[2]
MAX_BODY = 2**20  # --max-body-mb 1
MAX_PIXELS = 20_000  # the demo's images have at most 96 x 96

pytestmark = pytest.mark.timeout(300)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    def __init__(self, port: int):
        self.port = port

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict | None = None
    ) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, json.loads(response.read() or b"null")
        finally:
            conn.close()

    def detect(
        self, image: bytes, content_type: str = "image/jpeg", query: str = "?score_threshold=0"
    ) -> tuple[int, dict]:
        return self.request("POST", "/detect" + query, image, {"Content-Type": content_type})


@pytest.fixture(scope="module")
def val_images(tiny_run) -> dict[int, bytes]:
    """image_id -> the JPEG bytes stored in the val shards."""
    images = {}
    for path in shard_files(tiny_run["val"]):
        table = pq.read_table(path, columns=["image_id", "image"])
        images.update(zip(table.column("image_id").to_pylist(), table.column("image").to_pylist()))
    return images


@pytest.fixture(scope="module")
def reference(tiny_run) -> dict[int, list[dict]]:
    """evaluate.py's detections of every val image (its inference, one image per batch: a
    request alone in its batch is not padded either)."""
    detector = load_detector(tiny_run["checkpoint"])
    results = run_inference(detector, tiny_run["val"], InferenceConfig(batch_size=1, progress=False)).results
    by_image: dict[int, list[dict]] = {}
    for r in results:
        by_image.setdefault(r["image_id"], []).append(r)
    return by_image


@pytest.fixture(scope="module")
def server(tiny_run, local_ray, tmp_path_factory):  # noqa: F811
    import ray

    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [
        sys.executable,
        str(REPO / "scripts" / "serve.py"),
        "--checkpoint",
        tiny_run["checkpoint"],
        "--address",
        ray.get_runtime_context().gcs_address,
        "--port",
        str(port),
        "--max-batch-size",
        "4",
        "--batch-wait-ms",
        "50",
        "--max-body-mb",
        "1",
        "--max-pixels",
        str(MAX_PIXELS),
    ]
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    client = Client(port)
    deadline = time.monotonic() + 150
    while True:
        if process.poll() is not None:
            pytest.fail(f"scripts/serve.py exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if client.request("GET", "/healthz")[0] == 200:
                break
        except (OSError, http.client.HTTPException, ValueError):
            pass
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the app did not come up in 150 s:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    yield {"client": client, "process": process, "log": log, "port": port}
    if process.poll() is None:  # the SIGTERM test did not run
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


def _assert_same(served: list[dict], expected: list[dict]) -> None:
    """The answer's detections (score_threshold=0: every query) against evaluate.py's."""
    assert len(served) == len(expected) > 0
    expected = sorted(expected, key=lambda r: -r["score"])
    for got, want in zip(served, expected):
        assert got["category_id"] == want["category_id"]
        assert got["score"] == pytest.approx(want["score"], abs=1e-5)
        assert got["xywh"] == pytest.approx(want["bbox"], abs=1e-3)
        x, y, w, h = want["bbox"]
        assert got["xyxy"] == pytest.approx([x, y, x + w, y + h], abs=1e-3)


def test_detections_equal_evaluate(server, val_images, reference, tiny_run):
    client = server["client"]
    manifest = ckpt.verify(tiny_run["checkpoint"])
    detector = load_detector(tiny_run["checkpoint"])
    for image_id, data in sorted(val_images.items()):
        status, answer = client.detect(data)
        assert status == 200, answer
        _assert_same(answer["detections"], reference[image_id])
        with Image.open(io.BytesIO(data)) as im:
            assert answer["image"] == {"width": im.width, "height": im.height}
        for d in answer["detections"]:
            assert detector.label_to_category_id[d["label"]] == d["category_id"]
            assert d["category"] == detector.names[d["label"]]
    model = answer["model"]
    assert model["checkpoint"] == tiny_run["checkpoint"] and model["source"] == tiny_run["checkpoint"]
    assert model["manifest_sha256"] == manifest_sha256(manifest) and model["epoch"] == detector.epoch

    # the threshold filters, best first; the default is the documented 0.5
    image_id, data = next(iter(sorted(val_images.items())))
    scores = sorted((r["score"] for r in reference[image_id]), reverse=True)
    cut = (scores[1] + scores[2]) / 2
    status, answer = client.detect(data, query=f"?score_threshold={cut}")
    assert status == 200 and [d["score"] for d in answer["detections"]] == pytest.approx(scores[:2], abs=1e-5)
    status, answer = client.detect(data, query="")
    assert status == 200 and answer["score_threshold"] == 0.5
    assert all(d["score"] >= 0.5 for d in answer["detections"])

    # multipart/form-data, as `curl -F image=@photo.jpg` sends it
    boundary = "detr-ray-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    status, answer = client.detect(body, content_type=f"multipart/form-data; boundary={boundary}")
    assert status == 200, answer
    _assert_same(answer["detections"], reference[image_id])


def test_concurrent_requests_are_batched_and_answered_each_their_own(server, val_images):
    """Same-size images (no padding in a batch) sent at once: each answer is its own image's,
    as when sent alone."""
    client = server["client"]
    images = []
    for data in list(val_images.values())[:4]:
        buffer = io.BytesIO()
        Image.open(io.BytesIO(data)).convert("RGB").resize((90, 70)).save(buffer, "JPEG")
        images.append(buffer.getvalue())
    alone = [client.detect(data)[1]["detections"] for data in images]
    before = client.request("GET", "/model")[1]["batching"]["so_far"]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda data: client.detect(data), images * 2))
    after = client.request("GET", "/model")[1]["batching"]["so_far"]
    assert after["images"] - before["images"] == 8
    assert after["batches"] - before["batches"] < 8 and after["largest"] > 1  # some requests shared a forward pass
    for k, (status, answer) in enumerate(together):
        assert status == 200, answer
        expected = alone[k % len(images)]
        assert [d["category_id"] for d in answer["detections"]] == [d["category_id"] for d in expected]
        assert [d["score"] for d in answer["detections"]] == pytest.approx([d["score"] for d in expected], abs=1e-4)
        assert np.allclose([d["xywh"] for d in answer["detections"]], [d["xywh"] for d in expected], atol=1e-2)


def _png(width: int, height: int, idat: bytes | None = None) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    if idat is None:
        raw = b"".join(b"\0" + bytes(3 * width) for _ in range(height))
        idat = zlib.compress(raw)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _oversize(port: int, chunked: bool) -> tuple[int, dict]:
    """A body over the limit: announced by Content-Length (only its start is sent: the server
    must answer without reading the rest), or chunked without a length."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.putrequest("POST", "/detect")
        conn.putheader("Content-Type", "image/jpeg")
        if chunked:
            conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            piece = b"\xff" * 65536
            for _ in range(MAX_BODY // len(piece) + 2):
                conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            conn.send(b"0\r\n\r\n")
        else:
            conn.putheader("Content-Length", str(50 * MAX_BODY))
            conn.endheaders()
            conn.send(b"\xff\xd8\xff" + bytes(1000))
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_bad_requests_are_refused_and_the_app_stays_up(server, val_images, reference):
    client = server["client"]
    image_id, good = next(iter(sorted(val_images.items())))
    cases = {
        "not an image": (client.detect(b"this is not an image"), 422, "not an image"),
        "truncated JPEG": (client.detect(good[: len(good) // 2]), 422, "cannot decode"),
        "zero bytes": (client.detect(b""), 400, "empty body"),
        "PNG header declaring 100000 x 100000": (
            client.detect(_png(100000, 100000, idat=b""), "image/png"),
            413,
            "too large",
        ),
        "over the pixel limit": (client.detect(_png(200, 200), "image/png"), 413, f"limit {MAX_PIXELS}"),
        "PNG that crashes torchvision's decoder": (
            client.detect(_png(100, 100, idat=zlib.compress(bytes(10))), "image/png"),
            422,
            "decoder crashed",
        ),
        "wrong content type": (client.detect(good, "text/plain"), 415, "not accepted"),
        "no content type": (client.request("POST", "/detect", good), 415, "not accepted"),
        "bad threshold": (client.detect(good, query="?score_threshold=2"), 400, "score_threshold"),
        "multipart without an image": (
            client.detect(
                b'--b\r\nContent-Disposition: form-data; name="x"\r\n\r\n1\r\n--b--\r\n',
                "multipart/form-data; boundary=b",
            ),
            400,
            "no field named 'image'",
        ),
        "Content-Length over the limit": (_oversize(server["port"], chunked=False), 413, "over the limit"),
        "chunked body over the limit": (_oversize(server["port"], chunked=True), 413, "over the limit"),
    }
    for name, ((status, answer), want_status, want_text) in cases.items():
        assert status == want_status, (name, answer)
        assert answer["status"] == want_status and want_text in answer["error"], (name, answer)
    status, health = client.request("GET", "/healthz")
    assert status == 200 and health["status"] == "ok"
    status, answer = client.detect(good)
    assert status == 200
    _assert_same(answer["detections"], reference[image_id])


def test_model_describes_what_is_loaded(server, tiny_run):
    status, model = server["client"].request("GET", "/model")
    assert status == 200
    detector = load_detector(tiny_run["checkpoint"])
    assert model["categories"] == [
        {"label": i, "id": c, "name": n} for i, (c, n) in enumerate(zip(detector.label_to_category_id, detector.names))
    ]
    assert model["arch"]["num_queries"] == 5 and model["arch"]["num_classes"] == len(detector.label_to_category_id)
    t = detector.transform
    assert model["input"]["resize"] == {"shortest_side": t.val_scale, "max_size": t.max_size}
    assert model["batching"]["max_batch_size"] == 4 and model["device"] == "cpu"


def test_experiment_serves_its_best_verified_checkpoint(tiny_run, tmp_path):
    """--experiment chooses as evaluate.py does: best.json's checkpoint, else the best trial whose
    checkpoint verifies; a file is not a checkpoint."""
    run = dict(tiny_run)
    for key in ("checkpoint", "checkpoint_epoch1"):
        run[key] = str(shutil.copytree(tiny_run[key], tmp_path / "run" / Path(tiny_run[key]).name))
    experiment = make_experiment(tmp_path / "sweep", run)
    spec = choose_checkpoint(experiment=str(experiment), workdir=tmp_path / "work")
    assert spec.location == run["checkpoint"] and spec.identity["trial"] == "t1"
    assert spec.identity["manifest_sha256"] == manifest_sha256(ckpt.verify(run["checkpoint"]))
    with open(Path(run["checkpoint"]) / "model.pt", "ab") as f:
        f.write(b"\0")  # the best trial's checkpoint no longer verifies
    spec = choose_checkpoint(experiment=str(experiment), workdir=tmp_path / "work")
    assert spec.location == run["checkpoint_epoch1"] and spec.identity["trial"] == "t2"
    with pytest.raises(EvaluationTargetError, match="a file"):
        choose_checkpoint(checkpoint=str(Path(run["checkpoint_epoch1"]) / "model.pt"), workdir=tmp_path / "work")


def test_sigterm_stops_the_app_cleanly(server):
    process = server["process"]
    process.send_signal(signal.SIGTERM)
    assert process.wait(90) == 0, server["log"].read_text()[-3000:]
    assert "stopped" in server["log"].read_text()
    with pytest.raises(OSError):
        server["client"].request("GET", "/healthz")
