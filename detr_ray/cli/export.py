"""Export a verified checkpoint's DETR as a torch.export program for use outside Ray.

  python scripts/export.py --experiment runs/demo-sweep --out export/demo
  python scripts/export.py --checkpoint runs/detr-demo/checkpoint_epoch0010 --out export/demo

Writes OUT/model.pt2 (torch.export.save) and OUT/model.json (identity, categories, input size,
how to post-process), after checking the program against the eager model on padded batches of
several sizes. What the program takes and returns, and why torch.export: detr_ray/serve/export.py.
Load it anywhere torch is installed:

  program = torch.export.load("export/demo/model.pt2").module()
  pred_logits, pred_boxes = program(images_uint8_padded, mask)
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile

from detr_ray.checkpoint import CheckpointError
from detr_ray.cli.arguments import add_model_source
from detr_ray.config import ConfigError
from detr_ray.evaluation.inference import load_detector
from detr_ray.evaluation.subject import EvaluationTargetError, fetch_checkpoint
from detr_ray.ownership import NotOwnedError
from detr_ray.serve.export import export_detector
from detr_ray.serve.model import choose_checkpoint


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_source(
        p, checkpoint_metavar="DIR_OR_URI", checkpoint_help="a checkpoint directory (checkpoint_epochNNNN)"
    )
    p.add_argument(
        "--out", default="export", help="output directory: new, empty or an earlier export's (default: ./export)"
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="detr-export-") as workdir:
        try:
            spec = choose_checkpoint(experiment=args.experiment, checkpoint=args.checkpoint, workdir=workdir)
            directory, _ = fetch_checkpoint(spec.location, workdir)  # a URI's copy; a local directory as it is
            detector = load_detector(directory, spec.manifest)
            metadata = export_detector(detector, {**spec.identity, "epoch": detector.epoch}, args.out)
        except (EvaluationTargetError, CheckpointError, ConfigError, NotOwnedError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    check = metadata["check"]
    print(
        f"exported {spec.identity['checkpoint']} -> {args.out}/model.pt2 (+ model.json)\n"
        f"  largest |exported - eager| on padded batches of several sizes: {check['max_abs_difference']:.3g} "
        f"(tolerance {check['tolerance']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
