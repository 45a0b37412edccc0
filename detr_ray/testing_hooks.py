"""The one seam through which tests and the fault benchmarks reach into a training run.

A production run has no hooks (`TestingHooks()` is inert, and it is what build_trainer uses by
default). Tests set one field of build_trainer, `testing=TestingHooks(...)`, and the per-worker
loop calls the functions here at named points of each step and epoch:

- `crash_point` (before each train step): `crash={"rank", "step", "marker"[, "signal"]}` makes
  that rank die once at that global step, as a worker killed by a node loss or the OOM killer
  would (os._exit, or a real signal such as 9): the marker file records that it happened, so
  the restarted worker group does not die again.
- `audit_point` (after each epoch): `audit_dir` gets one JSON file per rank and epoch with the
  image ids that rank trained on, its per-step losses, a hash of its parameters and the val
  image ids it inferred, and how many images its data stream delivered (collated) in the
  epoch, for tests of data splitting, determinism and early stops.
- `hold_point` (after each epoch's report): `hold={"epoch", "release"}` makes rank 0 wait, once
  that epoch's checkpoint is stored, until the file `release` exists, so a test can change the
  world (fill a disk, kill a node) at a known point of the run instead of racing it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TestingHooks:
    __test__ = False  # not a pytest test class

    crash: dict[str, Any] | None = None  # {"rank", "step", "marker"[, "signal"]}
    audit_dir: str | None = None
    hold: dict[str, Any] | None = None  # {"epoch", "release"[, "timeout_s"]}

    @property
    def keeps_losses(self) -> bool:
        """Whether the loop must keep each step's loss (for the audit)."""
        return bool(self.audit_dir)


def crash_point(hooks: TestingHooks, rank: int, global_step: int) -> None:
    """Kills this worker process once, when `hooks.crash` names this rank and step."""
    crash = hooks.crash
    if not crash or crash.get("rank") != rank or global_step != crash.get("step") or os.path.exists(crash["marker"]):
        return
    Path(crash["marker"]).write_text(f"crashed at step {global_step}")
    if crash.get("signal"):  # a real kill (e.g. 9, SIGKILL): no Python clean-up, as from the OOM killer
        os.kill(os.getpid(), crash["signal"])
    os._exit(1)  # dies without clean-up, as a worker whose node is lost


def hold_point(hooks: TestingHooks, rank: int, epoch: int) -> None:
    """Rank 0 waits after epoch `hooks.hold["epoch"]` until the file `hooks.hold["release"]` exists."""
    hold = hooks.hold
    if not hold or rank != 0 or epoch != hold["epoch"]:
        return
    deadline = time.monotonic() + hold.get("timeout_s", 300)
    while not os.path.exists(hold["release"]):
        if time.monotonic() > deadline:
            raise TimeoutError(f"testing hold after epoch {epoch}: {hold['release']} never appeared")
        time.sleep(0.05)


def audit_point(
    hooks: TestingHooks,
    rank: int,
    epoch: int,
    image_ids: list[int],
    model,
    losses=(),
    val_image_ids=None,
    delivered: int | None = None,
) -> None:
    """Writes `<audit_dir>/rank<R>_epoch<E>.json` (see the module docstring); no audit_dir: nothing."""
    if not hooks.audit_dir:
        return
    import ray

    h = hashlib.sha256()
    for p in getattr(model, "module", model).parameters():
        h.update(p.detach().float().cpu().numpy().tobytes())
    record = {
        "rank": rank,
        "epoch": epoch,
        "node_id": ray.get_runtime_context().get_node_id(),
        "image_ids": image_ids,
        "params_sha256": h.hexdigest(),
        "losses": list(losses),
        "val_image_ids": val_image_ids,
        "delivered": delivered,
    }
    os.makedirs(hooks.audit_dir, exist_ok=True)
    Path(hooks.audit_dir, f"rank{rank}_epoch{epoch}.json").write_text(json.dumps(record))
