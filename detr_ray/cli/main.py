"""detr-ray: train and tune DETR object detectors with Ray.

Each command takes its own options; `detr-ray <command> --help` lists them.
The same programs run as `python scripts/<file>.py`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module under detr_ray.cli, what it does). The modules import Ray and torch, so they
# are imported only for the command that runs, and the summaries stay here.
COMMANDS = {
    "prepare": ("prepare_coco", "convert a COCO-format split (or the synthetic demo) into Parquet shards"),
    "train": ("train", "train one DETR run with Ray Train"),
    "tune": ("tune", "tune hyperparameters: Optuna proposals, ASHA stopping, on Ray Tune"),
    "evaluate": ("evaluate", "COCO evaluation of a checkpoint or a sweep's best, with a report"),
    "serve": ("serve", "serve a checkpoint as an HTTP detection endpoint (Ray Serve)"),
    "export": ("export", "export a checkpoint's DETR as a torch.export program"),
    "pretrain-demo": ("pretrain_demo", "pre-train the demo DETR on part of the demo categories"),
    "benchmark-detectors": (
        "benchmark_detectors",
        "train DETR and torchvision detectors on one budget and compare them",
    ),
}


def parser() -> argparse.ArgumentParser:
    width = max(map(len, COMMANDS))
    listing = "\n".join(f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items())
    p = argparse.ArgumentParser(
        prog="detr-ray",
        description=__doc__,
        epilog="commands:\n" + listing,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("command", choices=COMMANDS, metavar="command", help="one of the commands below")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the command's own options (see detr-ray <command> --help)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    module = importlib.import_module(f"detr_ray.cli.{COMMANDS[args.command][0]}")
    # argparse names the program after sys.argv[0], and the commands print how to run them again from it.
    sys.argv[:] = [f"detr-ray {args.command}", *args.args]
    return module.main(args.args)
