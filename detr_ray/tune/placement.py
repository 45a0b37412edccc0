"""The placement-group watch: every finished trial's Train placement groups are released, or
reported and removed."""

from __future__ import annotations

import json
import logging
import time

from ray import tune

from detr_ray.data import storage

log = logging.getLogger(__name__)

RELEASE_GRACE_S = 20.0  # how long Ray may take to remove a finished trial's placement groups


class PlacementGroupWatch(tune.Callback):
    """Makes sure each finished trial's Train placement groups are removed.

    A Train worker group's placement group lives until its controller removes it or the job
    ends; when a trial is stopped (ASHA) or killed, only Ray Train's PlacementGroupCleaner
    removes it, and that cleaner depends on the state API (it can be missing, or slow on a busy
    machine). A placement group left behind holds its GPUs, and later trials wait for them
    forever. So: rank 0 reports its placement group id with every result (a worker group
    restarted after a failure has a new one, so all are remembered); RELEASE_GRACE_S after a
    trial ends (Tune has killed its actor, and with it the Train controller, by then), every one
    still there is logged as an error, removed, and recorded in
    `<experiment>/leaked_placement_groups.json`."""

    def __init__(self, experiment_dir: str) -> None:
        self.record = storage.join(experiment_dir, "leaked_placement_groups.json")
        self.groups: dict[str, set[str]] = {}
        self.pending: list[tuple[float, str, str]] = []  # (deadline, trial id, group id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        pg = result.get("run/placement_group")
        if pg:
            self.groups.setdefault(trial.trial_id, set()).add(pg)

    def finished(self, trial_id: str, groups: set[str] | None = None) -> None:
        deadline = time.time() + RELEASE_GRACE_S
        groups = set(groups or ()) | self.groups.pop(trial_id, set())
        self.pending += [(deadline, trial_id, pg) for pg in sorted(groups)]

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.finished(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.finished(trial.trial_id)

    def on_step_end(self, iteration, trials, **info):
        self.check()

    def check(self, wait: bool = False) -> list[dict]:
        """Removes the overdue placement groups (with `wait`: waits for every pending one's
        deadline first); returns the ones it had to remove."""
        still, leaked = [], []
        for deadline, trial_id, pg in sorted(self.pending):
            while wait and _placement_group_alive(pg) and time.time() < deadline:
                time.sleep(0.5)
            if not _placement_group_alive(pg):
                continue
            if time.time() < deadline:
                still.append((deadline, trial_id, pg))
                continue
            log.error(
                "LEAK: trial %s ended %.0f s ago and Ray still holds its Train placement group %s; "
                "removing it so that later trials get its resources",
                trial_id,
                RELEASE_GRACE_S,
                pg,
            )
            _remove_placement_group(pg)
            leaked.append({"trial": trial_id, "placement_group": pg})
        self.pending = still
        if leaked:
            storage.write_bytes_atomic(self.record, json.dumps(read_leaks(self.record) + leaked, indent=2).encode())
        return leaked


def read_leaks(record: str) -> list[dict]:
    try:
        return json.loads(storage.read_bytes(record))
    except FileNotFoundError:
        return []


def _placement_group_alive(pg_id: str) -> bool:
    from ray.util import placement_group_table

    info = placement_group_table().get(pg_id)
    return bool(info) and info.get("state") not in ("REMOVED", None)


def _remove_placement_group(pg_id: str) -> None:
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    try:
        remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id))))
    except Exception as e:  # noqa: BLE001 - report and carry on; the summary records the leak
        log.error("could not remove placement group %s: %s", pg_id, e)


def live_placement_groups() -> list[dict]:
    """Placement groups that still hold (or wait for) resources on the cluster."""
    from ray.util import placement_group_table

    return [
        {"id": pid, "state": info.get("state"), "bundles": info.get("bundles")}
        for pid, info in placement_group_table().items()
        if info.get("state") not in ("REMOVED",)
    ]
