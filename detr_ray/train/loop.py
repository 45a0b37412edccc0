"""`run_worker`: what each Ray Train worker runs (entered through worker_run.py).

Per epoch: stream this worker's part of the train split, take TrainSteps, report the epoch's
losses, lr, images/s, data-wait fraction and skipped images; every `eval_every` epochs (and the
last) each worker infers its part of the val split, detections are gathered on rank 0 and scored
with pycocotools. Every epoch rank 0 writes a checkpoint and all ranks call ray.train.report.
A restarted worker group, or a relaunch under the same run name, resumes from the newest valid
checkpoint at the next epoch.

Workers agree on every step over a CPU (gloo) group, so a worker whose data ends early (skipped
images) stops the epoch for all instead of leaving the others waiting in a collective.

The module is long because everything a Train worker process runs is here, on the worker's
state (`_Worker`): resume, the epoch, validation, the checkpoint and the report depend on each
other's order (a checkpoint must hold the epoch's metrics, a resume must find what a report
stored), which one module keeps in view. The step itself lives in step.py, the prediction path
in model/predict.py, the data in data/.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from detr_ray import checkpoint as ckpt
from detr_ray import testing_hooks
from detr_ray.coco_eval import evaluate
from detr_ray.data.batches import DetectionBatches
from detr_ray.data.decode import derive_seed
from detr_ray.data.shards import coco_ground_truth, read_meta
from detr_ray.model import build_criterion, detectors
from detr_ray.model.backbone import calibrate_frozen_batchnorm
from detr_ray.model.predict import normalize, predict_batch
from detr_ray.testing_hooks import TestingHooks
from detr_ray.train.step import StepOptions, TrainStep, build_optimizer
from detr_ray.train.worker_run import WorkerRun

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the message names epoch and step."""


# --------------------------------------------------------------------------------------------
# Set-up


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def build_scheduler(optimizer: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per epoch. step: x0.1 at lr_drop (DETR); cosine: linear warmup, then cosine
    decay to zero at the last epoch."""
    if cfg.lr_schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_drop, gamma=0.1)
    warm, total = cfg.warmup_epochs, cfg.epochs

    def factor(epoch: int) -> float:
        if epoch < warm:
            return (epoch + 1) / (warm + 1)
        progress = (epoch - warm) / max(total - warm, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _inner(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _CpuCollectives:
    """Collectives of the loop's bookkeeping over a CPU (gloo) group, apart from the training
    backend's: the per-step vote (does every worker have another batch?) and sums of counts."""

    def __init__(self):
        _, world = _world()
        self.group = dist.new_group(backend="gloo") if world > 1 else None

    def all_have(self, have: bool) -> bool:
        if self.group is None:
            return have
        flag = torch.tensor([1 if have else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return bool(flag.item())

    def sum(self, value: float) -> float:
        if self.group is None:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, group=self.group)
        return float(t.item())


# --------------------------------------------------------------------------------------------
# Resume


def run_checkpoints(filesystem, run_dir: str) -> list:
    """Every checkpoint directory of the run at `run_dir`, oldest first.

    Read from storage rather than taken from Ray's registry alone: Ray registers a reported
    checkpoint only when its controller next polls the workers (every 2 s by default), so a
    worker that dies just after a report loses the registration although rank 0 has already
    written the checkpoint in full."""
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    try:
        infos = filesystem.get_file_info(pafs.FileSelector(run_dir))
    except (OSError, FileNotFoundError):
        return []
    names = sorted(
        i.path
        for i in infos
        if i.type == pafs.FileType.Directory and os.path.basename(i.path).startswith("checkpoint_")
    )
    return [Checkpoint(p, filesystem=filesystem) for p in names]


def load_resume_state(candidates: list) -> ckpt.Loaded | None:
    """The newest of `candidates` (oldest first) that verifies; corrupt or unfinished ones are
    skipped with a warning (the previous one is used)."""
    for candidate in reversed(candidates):
        with candidate.as_directory() as d:
            try:
                return ckpt.load(d)
            except ckpt.CheckpointError as e:
                log.warning("not resuming from %s: %s", candidate.path, e)
    return None


def _resume_candidates(ctx) -> list:
    import ray.train

    storage = ctx.get_storage()
    candidates = run_checkpoints(storage.storage_filesystem, storage.experiment_fs_path)
    registered = ray.train.get_checkpoint()
    if registered is not None:
        paths = {c.path.rstrip("/") for c in candidates}
        if registered.path.rstrip("/") not in paths:  # not under the run directory: tried first
            candidates.append(registered)
        elif candidates and candidates[-1].path.rstrip("/") != registered.path.rstrip("/"):
            log.warning(
                "Ray's latest registered checkpoint is %s; %s is newer (a worker died before Ray registered it) and is "
                "tried first",
                registered.path,
                candidates[-1].path,
            )
    return candidates


# --------------------------------------------------------------------------------------------
# The loop


@dataclass
class _Worker:
    """This worker's model and optimisation state, as built and (when resuming) restored."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step: TrainStep
    meta: Any  # shards.DatasetMeta of the train split
    parameters: int
    calibrate: bool  # calibrate frozen BatchNorm statistics on the first batch
    start_epoch: int = 0
    global_step: int = 0
    last_val: dict = field(default_factory=dict)
    resumed_metrics: dict = field(default_factory=dict)


def _build_worker(run: WorkerRun, rank: int, device: torch.device) -> _Worker:
    import ray.train.torch

    exp, tcfg = run.experiment, run.experiment.train
    meta = read_meta(run.train_uri)
    model_cfg = replace(exp.model, num_classes=meta.num_classes)
    is_detr = model_cfg.arch == "detr"
    if rank == 0:
        detectors.ignored_settings(exp)
    torch.manual_seed(tcfg.seed)
    model = detectors.build(model_cfg)
    parameters = sum(p.numel() for p in model.parameters())  # a sweep may minimise it (model/parameters)
    pretrained_backbone = False
    for source in (tcfg.pretrained, tcfg.pretrained_backbone):
        if source:
            report = detectors.load_weights(
                model, source, categories=list(zip(meta.label_to_category_id, meta.label_names))
            )
            pretrained_backbone |= any(k.startswith("backbone.") for k in report.loaded)
    calibrate = is_detr and tcfg.calibrate_frozen_bn and model_cfg.frozen_bn and not pretrained_backbone

    precision = resolve_precision(tcfg.precision, device)
    model = ray.train.torch.prepare_model(model)
    criterion = (
        build_criterion(model_cfg, tcfg.cost_class, tcfg.cost_bbox, tcfg.cost_giou, tcfg.eos_coef).to(device)
        if is_detr
        else None
    )
    optimizer = build_optimizer(model, tcfg.lr, tcfg.lr_backbone, tcfg.weight_decay)
    scheduler = build_scheduler(optimizer, tcfg)
    step = TrainStep(model, criterion, optimizer, StepOptions(precision, tcfg.channels_last, tcfg.clip_max_norm))
    return _Worker(model, optimizer, scheduler, step, meta, parameters, calibrate)


def _resume(w: _Worker, ctx, rank: int) -> None:
    """Restores `w` from the newest checkpoint of the run that verifies, if there is one."""
    candidates = _resume_candidates(ctx)
    loaded = load_resume_state(candidates) if candidates else None
    if loaded is None:
        return
    _inner(w.model).load_state_dict(loaded.model)
    w.optimizer.load_state_dict(loaded.optimizer)
    w.scheduler.load_state_dict(loaded.scheduler)
    if loaded.scaler:
        w.step.scaler.load_state_dict(loaded.scaler)
    w.start_epoch, w.global_step = loaded.state.epoch, loaded.state.global_step
    w.last_val = {k: v for k, v in loaded.state.metrics.items() if k.startswith("val/")}
    w.resumed_metrics = loaded.state.metrics
    w.calibrate = False  # the checkpoint carries the calibrated statistics
    log.info("rank %d: resuming from %s at epoch %d", rank, loaded.path, w.start_epoch)


def run_worker(run: WorkerRun) -> None:
    """One Train worker's whole run (worker_run.train_loop_per_worker, Ray Train's entry point,
    calls it)."""
    import ray.train
    import ray.train.torch

    exp, tcfg = run.experiment, run.experiment.train
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    if device.type == "cpu":  # as many threads as CPUs reserved (Ray's default is 1 below 2 CPUs)
        torch.set_num_threads(max(1, math.ceil(tcfg.cpus_per_worker)))
    w = _build_worker(run, rank, device)
    _resume(w, ctx, rank)
    if w.start_epoch >= tcfg.epochs:
        # The run had finished when it was interrupted (e.g. before a sweep recorded its last
        # result): report its final metrics again so that whoever watches sees it complete.
        ray.train.report({**w.resumed_metrics, "train/start_epoch": w.start_epoch}, checkpoint=None)
        return

    agree = _CpuCollectives()
    writer = _tensorboard(run, rank)
    gt = coco_ground_truth(run.val_uri) if rank == 0 else None
    categories = {"label_to_category_id": w.meta.label_to_category_id, "names": w.meta.label_names}
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    for epoch in range(w.start_epoch, tcfg.epochs):
        # What this worker draws in an epoch (dropout, the local shuffle) follows from (seed,
        # epoch, rank), the same in every run with this seed and after a resume. Model init drew
        # from the seed above; augmentation is drawn in the decode tasks (data/decode.py).
        torch.manual_seed(derive_seed(tcfg.seed, "torch", epoch, rank))
        shuffle_seed = derive_seed(tcfg.seed, "shuffle", epoch, rank)
        batches = DetectionBatches.from_config(
            train_shard, exp.data, train=True, device=device, shuffle_seed=shuffle_seed
        )
        metrics, w.global_step, w.calibrate, seen, losses = _train_epoch(
            w.step, batches, agree, epoch, w.global_step, tcfg, device, w.calibrate, run.testing, rank
        )
        metrics["lr"] = w.optimizer.param_groups[0]["lr"]
        metrics["lr_backbone"] = w.optimizer.param_groups[-1]["lr"]
        w.scheduler.step()
        done = epoch + 1
        if done % tcfg.eval_every == 0 or done == tcfg.epochs:
            w.last_val, val_ids = _validate(_inner(w.model), val_shard, exp, device, gt, w.meta, writer, done)
            w.last_val["val/epoch"] = done
            metrics["checkpoint_score"] = w.last_val.get("val/AP", -1.0)  # rank 0 holds the metrics
        else:
            val_ids = None
            metrics["checkpoint_score"] = -1.0  # ranks below every evaluated checkpoint
        testing_hooks.audit_point(run.testing, rank, done, seen, w.model, losses, val_ids, batches.delivered)
        metrics.update(w.last_val)
        metrics.update(
            {
                "epoch": done,
                "global_step": w.global_step,
                "model/parameters": w.parameters,
                "train/start_epoch": w.start_epoch,
            }
        )  # start_epoch > 0: this attempt resumed
        _log_epoch(metrics, writer, rank, done, tcfg.epochs)
        _report(w.model, w.optimizer, w.scheduler, w.step.scaler, exp, categories, metrics, done, w.global_step, rank)
        testing_hooks.hold_point(run.testing, rank, done)
    if writer is not None:
        writer.close()


def _log_epoch(metrics: dict, writer, rank: int, done: int, epochs: int) -> None:
    """The epoch's line in the log and its TensorBoard scalars (rank 0); rank 0 adds where this
    run's workers live, so a sweep can check they were released."""
    import ray

    if rank == 0:
        log.info(
            "epoch %d/%d: loss %.3f, val/AP %.3f, val/AP50 %.3f, %.1f images/s, data wait %.0f%%",
            done,
            epochs,
            metrics["train/loss"],
            metrics.get("val/AP", float("nan")),
            metrics.get("val/AP50", float("nan")),
            metrics["train/images_per_s"],
            100 * metrics["train/data_wait_fraction"],
        )
    if writer is not None:
        for k, v in metrics.items():
            writer.add_scalar(k, v, done)
        writer.flush()
    if rank == 0:
        runtime = ray.get_runtime_context()
        metrics["run/placement_group"] = runtime.get_placement_group_id() or ""
        metrics["run/node_id"] = runtime.get_node_id()


def _train_epoch(
    step: TrainStep, batches, agree, epoch, global_step, tcfg, device, calibrate, testing: TestingHooks, rank
):
    sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=device))
    losses: list[torch.Tensor] = []  # per step, for the audit only (kept on the device: no sync)
    first_bad = torch.full((), -1, dtype=torch.int64, device=device)
    n_steps = n_images = 0
    seen: list[int] = []
    wait = 0.0
    t_start = t_last = time.perf_counter()
    it = iter(batches)
    while True:
        batch = next(it, None)
        if not agree.all_have(batch is not None):
            break
        if tcfg.max_steps_per_epoch and n_steps >= tcfg.max_steps_per_epoch:
            break
        images, mask, targets = batch
        wait += time.perf_counter() - t_last
        testing_hooks.crash_point(testing, rank, global_step)
        if calibrate:
            calibrate_frozen_batchnorm(_inner(step.model).backbone, normalize(images.to(device)))
            calibrate = False
        try:
            out = step(images, mask, targets)
        except FloatingPointError as e:
            raise NonFiniteLossError(f"non-finite loss at epoch {epoch + 1}, step {global_step}: {e}") from e
        for k, v in out.items():
            sums[k] += v
        if testing.keeps_losses:
            losses.append(out["loss"].detach())
        bad = ~torch.isfinite(out["loss"])
        if device.type == "cpu":
            if bad:
                raise NonFiniteLossError(
                    f"non-finite loss {out['loss'].item()} at epoch {epoch + 1}, step {global_step}"
                )
        else:
            first_bad = torch.where(bad & (first_bad < 0), global_step, first_bad)
            if (n_steps + 1) % tcfg.check_finite_every == 0:
                _check_finite(first_bad, epoch)
        global_step += 1
        n_steps += 1
        n_images += len(targets)
        seen += [t["image_id"] for t in targets]
        t_last = time.perf_counter()
    # Closed, not drained: after max_steps_per_epoch (or when another worker's part ran out first)
    # the rest of the epoch is not needed, and draining it would decode every image of the split
    # for a few steps' training. A split's coordinator shuts its execution down once every worker
    # has ended its part; the next epoch starts a new one.
    it.close()
    _check_finite(first_bad, epoch)
    elapsed = time.perf_counter() - t_start
    metrics = {k: float(v) / max(n_steps, 1) for k, v in sums.items()}
    metrics["train/epoch_time_s"] = elapsed
    metrics["train/images_per_s"] = agree.sum(n_images / elapsed if elapsed > 0 else 0.0)
    metrics["train/data_wait_fraction"] = wait / elapsed if elapsed > 0 else 0.0
    metrics["train/skipped_images"] = agree.sum(float(batches.skipped))
    metrics["train/steps"] = n_steps
    metrics = {k if k.startswith("train/") else f"train/{k}": v for k, v in metrics.items()}
    return metrics, global_step, calibrate, seen, [float(v) for v in losses]


def _check_finite(first_bad: torch.Tensor, epoch: int) -> None:
    bad_step = int(first_bad.item())
    if bad_step >= 0:
        raise NonFiniteLossError(f"non-finite loss at epoch {epoch + 1}, step {bad_step}")


@torch.no_grad()
def _validate(model: nn.Module, val_shard, exp, device, gt, meta, writer, epoch: int) -> tuple[dict, list[int]]:
    """Each worker infers its part of the val split (no collectives inside, so uneven parts are
    fine); rank 0 gathers the detections and runs COCOeval. Returns (the metrics on rank 0, {}
    elsewhere; the image ids this worker inferred).

    Every val image must be inferred exactly once (the val split is split without dropping rows:
    trainer.py); rank 0 checks that against the ground truth and fails the run otherwise, as
    val/AP would be scored on the wrong set of images."""
    keep = exp.train.tensorboard_images if writer is not None else 0
    results, ids, skipped, shown = infer_val_part(model, val_shard, exp.data, device, meta.label_to_category_id, keep)
    rank, world = _world()
    mine = (results, ids, skipped)
    parts = [mine]
    if world > 1:
        parts = [None] * world if rank == 0 else None
        dist.gather_object(mine, parts, dst=0)
    if rank != 0:
        return {}, ids
    results = [r for part, _, _ in parts for r in part]
    scored = [i for _, part, _ in parts for i in part]
    skipped = sum(n for _, _, n in parts)
    expected = len(gt["images"])
    if len(set(scored)) != len(scored) or len(scored) + skipped != expected:
        raise RuntimeError(
            f"validation at epoch {epoch}: {len(scored)} images inferred ({len(scored) - len(set(scored))} of them "
            f"more than once) and {skipped} skipped as unreadable, but the val split has {expected}"
        )
    if writer is not None:
        _draw_predictions(writer, shown, meta, epoch)
    return {**evaluate(gt, results).metrics, "val/images": len(scored), "val/skipped_images": skipped}, ids


def infer_val_part(model: nn.Module, val_shard, data_cfg, device, label_to_category_id, keep_images: int = 0):
    """This worker's part of the val split through the predictor that evaluation's batch
    inference uses too (model/predict.py). Returns (COCO result dicts, the image ids inferred,
    the number of undecodable images skipped, up to `keep_images` (image, target, detections)
    for TensorBoard)."""
    was_training = model.training
    model.eval()
    results, shown, ids = [], [], []
    batches = DetectionBatches.from_config(val_shard, data_cfg, train=False, device=device)
    with torch.no_grad():
        for images, mask, targets in batches:
            predicted = predict_batch(model, images, mask, targets, label_to_category_id)
            ids += [t["image_id"] for t in targets]
            results += predicted.results
            if len(shown) < keep_images:
                dets = predicted.detections
                shown += [(images[i], targets[i], dets[i]) for i in range(min(len(targets), keep_images - len(shown)))]
    model.train(was_training)
    return results, ids, batches.skipped, shown


def _report(model, optimizer, scheduler, scaler, exp, categories, metrics, epoch, global_step, rank) -> None:
    import ray.train
    from ray.train import Checkpoint

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    state = ckpt.TrainingState(
        epoch=epoch, global_step=global_step, config=exp.to_dict(), categories=categories, metrics=metrics
    )
    with tempfile.TemporaryDirectory() as tmp:
        ckpt.save(tmp, model, optimizer, scheduler, scaler, state)
        ray.train.report(
            metrics, checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=_checkpoint_dir_name(epoch)
        )


def _checkpoint_dir_name(epoch: int) -> str:
    """checkpoint_epochNNNN, or checkpoint_epochNNNN-2, -3, ... when a directory of that name is
    already in the run: the epoch is being redone because that checkpoint did not verify. Ray's
    registry, restored with the run, still holds the old entry; were the new checkpoint written
    under the same name, Ray evicting the old entry would delete the new files."""
    import pyarrow.fs as pafs
    import ray.train

    storage = ray.train.get_context().get_storage()
    base = name = f"checkpoint_epoch{epoch:04d}"
    attempt = 1
    while (
        storage.storage_filesystem.get_file_info(f"{storage.experiment_fs_path}/{name}").type != pafs.FileType.NotFound
    ):
        attempt += 1
        name = f"{base}-{attempt}"
    return name


# --------------------------------------------------------------------------------------------
# TensorBoard (rank 0)


def _tensorboard(run: WorkerRun, rank: int):
    if rank != 0 or not run.experiment.train.tensorboard or not run.tensorboard_dir:
        return None
    from tensorboardX import SummaryWriter

    return SummaryWriter(run.tensorboard_dir)


def _draw_predictions(writer, shown, meta, epoch: int, threshold: float = 0.5) -> None:
    from torchvision.utils import draw_bounding_boxes

    names = meta.label_names
    for i, (image, target, det) in enumerate(shown):
        h, w = (int(v) for v in target["size"])
        oh, ow = (int(v) for v in target["orig_size"])
        img = image[:, :h, :w].cpu()
        keep = det["scores"] > threshold
        boxes = det["boxes"][keep].cpu() * torch.tensor([w / ow, h / oh, w / ow, h / oh])
        labels = [f"{names[l]} {s:.2f}" for l, s in zip(det["labels"][keep].tolist(), det["scores"][keep].tolist())]
        drawn = draw_bounding_boxes(img, boxes, labels=labels, colors="yellow", width=1)
        writer.add_image(f"val/predictions/{i}", drawn, epoch)
