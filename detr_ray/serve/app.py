"""The Ray Serve application: a FastAPI ingress deployment with dynamic batching.

    POST /detect?score_threshold=0.5   body: image/jpeg or image/png bytes, or multipart/form-data
                                       with the image in a field named "image" (else the first
                                       file part). -> {"detections": [{score, label, category_id,
                                       category, xyxy, xywh}], "image": {width, height},
                                       "score_threshold", "model": {source, checkpoint,
                                       manifest_sha256, epoch[, trial]}}
    GET  /healthz                      {"status": "ok", "model": ...}
    GET  /model                        architecture, categories, input size and normalization

A refused request gets {"error": why, "status": code}: 415 a content type other than those
above (before the body is read), 413 a body over `max_body_bytes` (by its Content-Length before
reading, else while reading: at most max_body_bytes + one chunk is ever held) or an image whose
header declares more than `max_pixels` (before decoding), 400 an empty body or a bad
score_threshold / multipart body, 422 bytes that are not an image or do not decode (truncated).
Decoding runs in a child process of the replica (model.IsolatedDecoder): a native decoder that
crashes on hostile bytes takes down that child, never the replica.

Batching: requests are decoded and transformed one by one as they arrive, then `@serve.batch`
gathers up to `max_batch_size` of them (waiting at most `batch_wait_timeout_s` for more) into
one padded forward pass, run in a thread so that the next requests are decoded meanwhile.
Replicas: one per GPU (one GPU each) when the cluster has GPUs, else one CPU replica of
`cpus_per_replica` CPUs (as many torch threads); `num_replicas` or an autoscaling range instead.
"""

# No `from __future__ import annotations`: FastAPI, behind serve.ingress, must see the `Request`
# annotation itself to pass the request in.
import asyncio
import logging
import math
from dataclasses import asdict, dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from detr_ray.data.images import DEFAULT_MAX_PIXELS
from detr_ray.serve.model import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_SCORE_THRESHOLD,
    IsolatedDecoder,
    ModelSpec,
    RequestError,
    ServedModel,
    check_threshold,
)

log = logging.getLogger(__name__)

IMAGE_TYPES = ("image/jpeg", "image/png")
APP_NAME = "detr"


@dataclass
class ServeOptions:
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.01
    num_replicas: int | None = None  # None: one per GPU, else one
    autoscale: tuple[int, int] | None = None  # (min, max) replicas instead of a fixed number
    target_ongoing_requests: float = 8.0  # per replica, for autoscaling
    cpus_per_replica: float = 1.0
    decode_processes: int = 1  # per replica (see model.IsolatedDecoder)
    use_gpu: bool | None = None  # None: when the cluster has GPUs
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    score_threshold: float = DEFAULT_SCORE_THRESHOLD  # when a request gives none

    def validate(self) -> "ServeOptions":
        if self.max_batch_size < 1 or not self.batch_wait_timeout_s >= 0:
            raise ValueError(
                f"max_batch_size must be >= 1 and batch_wait_timeout_s >= 0, got {self.max_batch_size}, "
                f"{self.batch_wait_timeout_s}"
            )
        if self.num_replicas is not None and self.num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {self.num_replicas}")
        if self.autoscale is not None and not (0 <= self.autoscale[0] <= self.autoscale[1] and self.autoscale[1] >= 1):
            raise ValueError(f"autoscale: expected 0 <= min <= max, max >= 1, got {self.autoscale}")
        if self.cpus_per_replica <= 0 or self.decode_processes < 1 or self.max_body_bytes < 1 or self.max_pixels < 1:
            raise ValueError("cpus_per_replica, decode_processes, max_body_bytes and max_pixels must be > 0")
        check_threshold(self.score_threshold)
        return self


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) past `limit` bytes: by Content-Length before reading, and
    while reading whatever the header said (chunked bodies have none)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise RequestError(400, f"bad Content-Length header {declared!r}")
        if int(declared) > limit:
            raise RequestError(413, f"body of {int(declared)} bytes is over the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"body is over the limit of {limit} bytes")
    return bytes(body)


def image_from_multipart(body: bytes, content_type: str) -> bytes:
    """The image of a multipart/form-data body: the field named "image", else the first part
    with a file name (stdlib MIME parser; the body was read within the size limit)."""
    from email import policy
    from email.parser import BytesParser

    try:
        message = BytesParser(policy=policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
        )
        parts = list(message.iter_parts()) if message.is_multipart() else []
        part = next((p for p in parts if p.get_param("name", header="content-disposition") == "image"), None)
        part = part or next((p for p in parts if p.get_filename()), None)
        payload = part.get_payload(decode=True) if part is not None else None
    except Exception as e:  # the parser is lenient; whatever it still refuses is the request's fault
        raise RequestError(400, f"malformed multipart/form-data body: {type(e).__name__}: {e}") from None
    if not parts:
        raise RequestError(400, "malformed multipart/form-data body (no parts; is the boundary right?)")
    if part is None:
        raise RequestError(400, "multipart/form-data body has no field named 'image' and no file part")
    return payload or b""


api = FastAPI(title="detr-ray detection", docs_url=None, redoc_url=None)


@serve.deployment(name="detector")
@serve.ingress(api)
class DetectionService:
    def __init__(self, spec: ModelSpec, options: dict):
        self.options = ServeOptions(**options)
        use_gpu = bool(self.options.use_gpu)
        self.model = ServedModel(spec, use_gpu=use_gpu, threads=max(1, math.floor(self.options.cpus_per_replica)))
        self.decoder = IsolatedDecoder(self.model.detector.transform, self.options.decode_processes)
        self.batch.set_max_batch_size(self.options.max_batch_size)
        self.batch.set_batch_wait_timeout_s(self.options.batch_wait_timeout_s)
        self.batches = {"batches": 0, "images": 0, "largest": 0}  # of this replica, for GET /model
        log.info("serving %s on %s", self.model.identity, self.model.device)

    def __del__(self):  # Serve calls it when the replica stops: end the decoding processes
        decoder = getattr(self, "decoder", None)
        if decoder is not None:
            decoder.close()

    @api.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok", "model": self.model.identity}

    @api.get("/model")
    def describe(self) -> dict:
        batching = {
            "max_batch_size": self.options.max_batch_size,
            "batch_wait_timeout_s": self.options.batch_wait_timeout_s,
            "so_far": self.batches,
        }
        return {**self.model.describe(), "batching": batching}

    @api.post("/detect")
    async def detect(self, request: Request):
        try:
            threshold = self._threshold(request)
            content_type = request.headers.get("content-type", "")
            media = content_type.split(";")[0].strip().lower()
            if media not in (*IMAGE_TYPES, "multipart/form-data"):
                raise RequestError(
                    415,
                    f"content type {content_type or '(none)'!r} not accepted: send image/jpeg or image/png bytes, "
                    "or multipart/form-data with an 'image' field",
                )
            body = await read_body(request, self.options.max_body_bytes)
            if media == "multipart/form-data":
                body = image_from_multipart(body, content_type)
            image = await self.decoder.prepare(body, self.options.max_pixels)
            detections = await self.batch(image)
            return self.model.answer(detections, threshold, image)
        except RequestError as e:
            log.info("refused a request: %d %s", e.status, e)
            return _error(e.status, str(e))
        except Exception as e:  # a fault of ours, not of the request: logged, the replica stays up
            log.exception("detection failed")
            return _error(500, f"internal error: {type(e).__name__}: {e}")

    def _threshold(self, request: Request) -> float:
        raw = request.query_params.get("score_threshold")
        if raw is None:
            return self.options.score_threshold
        try:
            value = float(raw)
        except ValueError:
            raise RequestError(400, f"score_threshold must be a number in [0, 1], got {raw!r}") from None
        return check_threshold(value)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)  # set from the options in __init__
    async def batch(self, images: list) -> list[list[dict]]:
        self.batches["batches"] += 1
        self.batches["images"] += len(images)
        self.batches["largest"] = max(self.batches["largest"], len(images))
        return await asyncio.to_thread(self.model.predict, images)


def build_app(spec: ModelSpec, options: ServeOptions | None = None):
    """The Serve application for `spec` on the connected Ray cluster (see the module docstring
    for how replicas are placed)."""
    import ray

    options = (options or ServeOptions()).validate()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = options.use_gpu if options.use_gpu is not None else gpus > 0
    if use_gpu and gpus == 0:
        raise ValueError("use_gpu was asked for, but the Ray cluster has no GPUs")
    options = ServeOptions(**{**asdict(options), "use_gpu": use_gpu})
    actor = {"num_cpus": options.cpus_per_replica, "num_gpus": 1 if use_gpu else 0}
    deployment = DetectionService.options(
        ray_actor_options=actor,
        # a replica takes more requests than one batch, so that the next batch fills while one runs
        max_ongoing_requests=max(2 * options.max_batch_size, 8),
    )
    if options.autoscale is not None:
        low, high = options.autoscale
        deployment = deployment.options(
            autoscaling_config={
                "min_replicas": low,
                "max_replicas": high,
                "target_ongoing_requests": options.target_ongoing_requests,
            },
            num_replicas="auto",
        )
    else:
        deployment = deployment.options(num_replicas=options.num_replicas or (gpus if use_gpu else 1))
    log.info(
        "Serve app: %s replica(s), %s each, options %s",
        options.autoscale or options.num_replicas or (gpus if use_gpu else 1),
        actor,
        options,
    )
    return deployment.bind(spec, asdict(options))


def serve_running() -> bool:
    """Whether Serve already runs on the connected cluster (its controller is a named actor)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return True
    except ValueError:
        return False


def start(
    spec: ModelSpec,
    options: ServeOptions | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    name: str = APP_NAME,
    request_timeout_s: float | None = 60.0,
) -> bool:
    """Starts Serve (HTTP on host:port, on the head node) unless it runs already, and deploys
    the app; returns whether Serve was started here (then `stop` shuts it down, else it deletes
    only this app). Returns once every replica is ready."""
    started = not serve_running()
    if started:
        serve.start(
            proxy_location="HeadOnly",
            http_options={"host": host, "port": port, "request_timeout_s": request_timeout_s},
        )
    else:
        log.warning("Serve already runs on this cluster: its HTTP host/port stay as they are (not %s:%d)", host, port)
    try:
        serve.run(build_app(spec, options), name=name, route_prefix="/")
    except BaseException:
        stop(name, started)
        raise
    return started


def stop(name: str = APP_NAME, started: bool = True) -> None:
    """Undoes `start`: Serve shut down when `start` started it, else only this app deleted."""
    if started:
        serve.shutdown()
    else:
        serve.delete(name)
