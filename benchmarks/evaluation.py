#!/usr/bin/env python
"""The final evaluation's cost at COCO val2017's size, in one run:

  (a) COCOeval: a synthetic ground truth of 5,000 images (640x480, 80 categories in 12
      supercategories, ~7.3 boxes per image as val2017) and 100 detections per image (a few
      jittered copies of each box, right class 80% of the time, the rest background), scored by
      detr_ray.coco_eval.evaluate (pycocotools + our checks and TP IoUs): seconds;
  (b) the error analysis (TIDE, the COCO breakdown's three extra COCOevals, PR curves, worst
      images) on the first --analysis-images images of the same set: seconds;
  (c) inference: DETR R50 in the COCO configuration (91 classes, 100 queries; random weights:
      speed does not depend on them) through run_inference (Ray Data decode + the val transform,
      shortest side 800, + an actor pool) on --inference-images generated 640x480-class JPEGs:
      images/s end to end, actor start and model load included.

Writes benchmarks/results/evaluation.json (or --out) with the machine's CPU count and GPU.

    python benchmarks/evaluation.py                              # CPU: inference on a subset
    python benchmarks/evaluation.py --inference-images 5000      # a GPU machine: the full set
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "evaluation.json"
SIZES = [(480, 640), (640, 480), (427, 640)]  # (height, width), as COCO's


def synthetic_coco(images: int, dets_per_image: int, seed: int = 0) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(seed)
    categories = [{"id": i + 1 + i // 10, "name": f"c{i}", "supercategory": f"s{i % 12}"} for i in range(80)]
    cat_ids = np.array([c["id"] for c in categories])
    gt_images, anns, results = [], [], []
    for image_id in range(1, images + 1):
        h, w = SIZES[image_id % 3]
        gt_images.append({"id": image_id, "width": w, "height": h, "file_name": f"{image_id:012d}.jpg"})
        n = int(rng.poisson(7.3))
        bw = rng.uniform(8, w / 2, n)
        bh = rng.uniform(8, h / 2, n)
        bx = rng.uniform(0, w - bw)
        by = rng.uniform(0, h - bh)
        cats = rng.choice(cat_ids, n)
        for x, y, bw_, bh_, c in zip(bx, by, bw, bh, cats):
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": int(c),
                    "bbox": [float(x), float(y), float(bw_), float(bh_)],
                    "area": float(bw_ * bh_),
                    "iscrowd": int(rng.uniform() < 0.01),
                }
            )
        dets = []
        for x, y, bw_, bh_, c in zip(bx, by, bw, bh, cats):
            for _ in range(int(rng.integers(1, 4))):
                j = rng.normal(0, 0.1, 4) * [bw_, bh_, bw_, bh_]
                dets.append(
                    (
                        int(c) if rng.uniform() < 0.8 else int(rng.choice(cat_ids)),
                        [x + j[0], y + j[1], max(bw_ + j[2], 1), max(bh_ + j[3], 1)],
                        rng.uniform(0.3, 1),
                    )
                )
        while len(dets) < dets_per_image:
            dw, dh = rng.uniform(4, w / 3), rng.uniform(4, h / 3)
            dets.append(
                (
                    int(rng.choice(cat_ids)),
                    [rng.uniform(0, w - dw), rng.uniform(0, h - dh), dw, dh],
                    rng.uniform(0, 0.5),
                )
            )
        for c, box, s in dets[:dets_per_image]:
            results.append({"image_id": image_id, "category_id": c, "bbox": [float(v) for v in box], "score": float(s)})
    return {"images": gt_images, "annotations": anns, "categories": categories}, results


def time_cocoeval(gt: dict, results: list[dict]) -> dict:
    from detr_ray.coco_eval import as_coco, evaluate

    start = time.perf_counter()
    coco = as_coco(gt)
    index_s = time.perf_counter() - start
    start = time.perf_counter()
    ev = evaluate(coco, results, prefix="")
    seconds = time.perf_counter() - start
    return {
        "index_s": round(index_s, 2),
        "cocoeval_s": round(seconds, 2),
        "AP": round(ev.metrics["AP"], 4),
        "AP50": round(ev.metrics["AP50"], 4),
    }


def time_analysis(gt: dict, results: list[dict], images: int) -> dict:
    from detr_ray.coco_eval import evaluate
    from detr_ray.evaluation import analysis as A

    keep = set(range(1, images + 1))
    sub_gt = {
        "images": [i for i in gt["images"] if i["id"] in keep],
        "annotations": [a for a in gt["annotations"] if a["image_id"] in keep],
        "categories": gt["categories"],
    }
    sub = [r for r in results if r["image_id"] in keep]
    ev = evaluate(sub_gt, sub, prefix="")
    index = A.GroundTruth(ev.gt)
    timings = {}
    for name, fn in (
        ("tide", lambda: A.tide(index, sub)),
        ("coco_breakdown", lambda: A.coco_breakdown(index, sub)),
        ("pr_curves", lambda: A.pr_curves(ev)),
        ("worst_images", lambda: A.worst_images(index, sub)),
    ):
        start = time.perf_counter()
        fn()
        timings[f"{name}_s"] = round(time.perf_counter() - start, 2)
    return {"images": images, "detections": len(sub), **timings, "total_s": round(sum(timings.values()), 2)}


def make_jpegs(root: Path, count: int, seed: int = 0, distinct: int = 64) -> str:
    """`count` COCO-sized textured JPEGs with 1-4 boxes each (`distinct` different pictures,
    repeated: decoding costs the same), sharded for run_inference."""
    import io
    import shutil

    from PIL import Image

    from detr_ray.data.coco import load_coco
    from detr_ray.data.shards import write_shards

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    coco = {"images": [], "annotations": [], "categories": [{"id": i, "name": f"c{i}"} for i in range(1, 91)]}
    pictures = []
    for i in range(min(count, distinct)):
        h, w = SIZES[i % 3]
        coarse = rng.uniform(0, 255, size=(12, 16, 3)).astype(np.uint8)
        pixels = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.float32) + rng.normal(
            0, 18, size=(h, w, 3)
        )
        boxes = []
        for _ in range(int(rng.integers(1, 5))):
            bw, bh = int(rng.integers(40, w // 2)), int(rng.integers(40, h // 2))
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            pixels[y : y + bh, x : x + bw] = rng.uniform(0, 255, size=3)
            boxes.append([x, y, bw, bh])
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        path = root / "images" / f"{i + 1:012d}.jpg"
        path.write_bytes(buffer.getvalue())
        pictures.append((path, h, w, boxes))
    for i in range(count):
        source, h, w, boxes = pictures[i % len(pictures)]
        name = f"{i + 1:012d}.jpg"
        if i >= len(pictures):
            shutil.copyfile(source, root / "images" / name)
        coco["images"].append({"id": i + 1, "file_name": name, "width": w, "height": h})
        for x, y, bw, bh in boxes:
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": i + 1,
                    "category_id": int(rng.integers(1, 91)),
                    "bbox": [x, y, bw, bh],
                    "area": bw * bh,
                    "iscrowd": 0,
                }
            )
    (root / "instances.json").write_text(json.dumps(coco))
    write_shards(
        load_coco(str(root / "instances.json")),
        str(root / "images"),
        str(root / "shards"),
        shard_size=500,
        progress=False,
    )
    return str(root / "shards")


def time_inference(root: Path, count: int, batch_size: int, device: str) -> dict:
    import ray
    import torch

    from detr_ray import checkpoint as ckpt
    from detr_ray.config import DataConfig, DETRConfig, ExperimentConfig, TrainConfig
    from detr_ray.evaluation.inference import InferenceConfig, load_detector, run_inference
    from detr_ray.model import build_model

    start = time.perf_counter()
    shards = make_jpegs(root / "jpegs", count)
    data_s = time.perf_counter() - start
    model_cfg = DETRConfig(num_classes=90)  # the R50 COCO configuration; 90 categories 1..90 -> 90 labels
    exp = ExperimentConfig(model_cfg, DataConfig(train=shards, val=shards), TrainConfig())
    torch.manual_seed(0)
    ckpt.save(
        root / "checkpoint",
        build_model(model_cfg),
        None,
        None,
        None,
        ckpt.TrainingState(
            0, 0, exp.to_dict(), {"label_to_category_id": list(range(1, 91)), "names": [f"c{i}" for i in range(1, 91)]}
        ),
    )
    cpus = os.cpu_count() or 1
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        use_gpu = {"auto": gpus > 0, "gpu": True, "cpu": False}[device]
        cfg = InferenceConfig(
            batch_size=batch_size,
            use_gpu=use_gpu,
            cpus_per_actor=max(1.0, cpus - 1.0) if not use_gpu else 2.0,
            decode_num_cpus=1.0,
            progress=False,
        )
        inference = run_inference(load_detector(root / "checkpoint"), shards, cfg)
    finally:
        ray.shutdown()
    return {
        "model": "DETR R50 (COCO configuration, 100 queries), random weights, fp32",
        "val_transform": "shortest side 800, longest <= 1333",
        "images": inference.images,
        "batch_size": batch_size,
        "device": inference.device,
        "actors": inference.actors,
        "cpus_per_actor": cfg.cpus_per_actor if not use_gpu else None,
        "seconds": round(inference.seconds, 2),
        "images_per_s": round(inference.images_per_s, 2),
        "detections": len(inference.results),
        "data_generation_s": round(data_s, 1),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--dets", type=int, default=100, help="detections per image")
    p.add_argument("--analysis-images", type=int, default=500, help="images of the set the analysis is timed on")
    p.add_argument("--inference-images", type=int, default=16, help="generated JPEGs inferred (5000 on a GPU machine)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    p.add_argument("--parts", default="cocoeval,analysis,inference", help="comma-separated: what to measure")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch

    record = {
        "cpu_count": os.cpu_count(),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],  # other work on the machine
        "machine": platform.machine(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "synthetic_set": {"images": args.images, "detections_per_image": args.dets},
    }
    parts = set(args.parts.split(","))
    if parts & {"cocoeval", "analysis"}:
        start = time.perf_counter()
        gt, results = synthetic_coco(args.images, args.dets)
        record["synthetic_set"].update(
            annotations=len(gt["annotations"]),
            detections=len(results),
            generation_s=round(time.perf_counter() - start, 1),
        )
        print(f"synthetic set: {args.images} images, {len(gt['annotations'])} boxes, {len(results)} detections")
    if "cocoeval" in parts:
        record["cocoeval"] = time_cocoeval(gt, results)
        print(
            "COCOeval (evaluate(): checks, loadRes, evaluate, accumulate, summarize, TP IoUs): "
            f"{record['cocoeval']['cocoeval_s']} s"
        )
    if "analysis" in parts:
        record["analysis"] = time_analysis(gt, results, min(args.analysis_images, args.images))
        a = record["analysis"]
        print(
            f"analysis on {a['images']} images ({a['detections']} detections): {a['total_s']} s "
            f"(TIDE {a['tide_s']}, COCO breakdown {a['coco_breakdown_s']}, PR {a['pr_curves_s']}, worst images "
            f"{a['worst_images_s']})"
        )
    if parts & {"cocoeval", "analysis"}:
        del gt, results
    if "inference" in parts:
        with tempfile.TemporaryDirectory() as tmp:
            record["inference"] = time_inference(Path(tmp), args.inference_images, args.batch_size, args.device)
        inf = record["inference"]
        if inf["images"] < args.images:
            record["inference"]["note"] = (
                f"measured on {inf['images']} of the set's {args.images} images: a full pass of DETR R50 at "
                "COCO scale on this machine's CPUs would take too long for a benchmark run"
            )
        print(
            f"inference: {inf['images']} images in {inf['seconds']} s = {inf['images_per_s']} images/s "
            f"({inf['actors']} {inf['device']} actor(s), batch {inf['batch_size']}, actor start included)"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
