"""Options that several commands share, declared once so that they read the same everywhere."""

from __future__ import annotations

import argparse


def add_model_source(p: argparse.ArgumentParser, *, checkpoint_metavar: str, checkpoint_help: str) -> None:
    """The required choice of what to load: a sweep's best (--experiment) or one checkpoint."""
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--experiment", metavar="DIR_OR_URI", help="experiment directory of scripts/tune.py (best.json / trials.json)"
    )
    what.add_argument("--checkpoint", metavar=checkpoint_metavar, help=checkpoint_help)
