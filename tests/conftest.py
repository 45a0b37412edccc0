"""Shared fixtures: tiny model configurations that run in milliseconds on a CPU."""

import os

import pytest
import torch

from detr_ray.model import DETRConfig

# Ray Train's preemption watcher only logs node drains, and no test drains a node; without it a
# Train run starts one process fewer (~3 s of CPU on 2 cores, for every run and every trial). It
# is set before any test starts Ray, so the scripts and clusters the tests start inherit it.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Ray Train's controller collects the workers' reports only when it polls them, every 2 s by
# default, and a worker's second report waits until its first was collected (a queue of one). A
# test run's epochs take well under 2 s, so each report and the end of each run waited for the
# next poll. Polling every 0.25 s: tests/train/test_trainer.py on 2 cores took 186-205 s instead
# of 213-225 s (two runs each). A stuck worker is still only declared dead after Ray's own
# timeout (RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S), which this leaves alone.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")


def tiny_config(**overrides) -> DETRConfig:
    base = dict(
        backbone="resnet18",
        hidden_dim=32,
        nheads=4,
        enc_layers=2,
        dec_layers=2,
        dim_feedforward=64,
        dropout=0.0,
        num_queries=6,
        num_classes=3,
    )
    base.update(overrides)
    return DETRConfig(**base)


# Fixtures that train a model through Ray Train (once per session or module): every test that
# needs one is marked `train`, so that `make test-fast` leaves it out.
TRAINING_FIXTURES = {"tiny_run", "pretrained"}


def pytest_collection_modifyitems(config, items):
    # `slow`: a case that a cheaper test of `make test` also covers (each names it); it runs
    # with DETR_RAY_SLOW=1, and the slow fault cases through benchmarks/faults.py.
    run_slow = os.environ.get("DETR_RAY_SLOW") == "1"
    skip = pytest.mark.skip(reason="slow case: set DETR_RAY_SLOW=1 (fault cases: or run benchmarks/faults.py)")
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.train)
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip)


@pytest.fixture
def tiny_cfg() -> DETRConfig:
    return tiny_config()


def random_batch(batch=2, h=64, w=80, max_boxes=3, num_classes=3, seed=0, pad_last=True):
    """uint8 images, padding mask (the last image padded on the right and bottom), targets."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, h, w), dtype=torch.uint8, generator=g)
    mask = torch.zeros(batch, h, w, dtype=torch.bool)
    if pad_last and batch > 1:
        mask[-1, :, w - w // 4 :] = True
        mask[-1, h - h // 5 :, :] = True
        images[-1][:, mask[-1]] = 0
    targets = []
    for i in range(batch):
        n = int(torch.randint(0, max_boxes + 1, (1,), generator=g)) if i else max_boxes
        cxcy = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=g) * 0.3 + 0.05
        targets.append(
            {
                "labels": torch.randint(0, num_classes, (n,), generator=g),
                "boxes": torch.cat([cxcy, wh], dim=1),
            }
        )
    return images, mask, targets
