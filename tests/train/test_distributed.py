"""Data parallelism: gradient equivalence across worker counts, and a simulated 2-node cluster."""

import json
import sys
from pathlib import Path

import pytest
import ray
import torch
from ray import cloudpickle
from ray.cluster_utils import Cluster

from detr_ray.config import experiment_from_dict
from detr_ray.local_ray import init as init_local_ray
from detr_ray.testing_hooks import TestingHooks
from detr_ray.train.trainer import build_trainer, demo_experiment
from tests.tiny_sweep import demo_shards

pytestmark = pytest.mark.timeout(420)
REPO = str(Path(__file__).resolve().parents[2])
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import test modules


def first_step_gradients(config):
    """One forward/backward of a fixed batch of 4, split evenly over the workers."""
    import ray.train
    import ray.train.torch

    from detr_ray.model import build_criterion, build_model
    from detr_ray.model.predict import normalize
    from tests.conftest import random_batch, tiny_config

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = tiny_config(dropout=0.0)
    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(build_model(cfg))
    criterion = build_criterion(cfg)
    images, mask, targets = random_batch(batch=4, max_boxes=5, seed=11)
    per = 4 // world
    part = slice(rank * per, (rank + 1) * per)
    loss = criterion.weighted_total(criterion(model(normalize(images[part]), mask[part]), targets[part]))
    loss.backward()
    if rank == 0:
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        torch.save({n.removeprefix("module."): g for n, g in grads.items()}, config["out"])


@pytest.mark.train
class TestOneNode:
    @pytest.fixture(scope="class", autouse=True)
    def local_ray(self):
        init_local_ray(
            num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": REPO}}
        )
        yield
        ray.shutdown()

    def test_one_worker_batch_4_equals_two_workers_batch_2(self, tmp_path):
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        out = {}
        for workers in (1, 2):
            path = tmp_path / f"grads{workers}.pt"
            TorchTrainer(
                first_step_gradients,
                train_loop_config={"out": str(path)},
                scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
                run_config=RunConfig(name=f"grads{workers}", storage_path=str(tmp_path / "runs")),
            ).fit()
            out[workers] = torch.load(path, weights_only=True)
        assert out[1].keys() == out[2].keys() and len(out[1]) > 50
        for name, g in out[1].items():
            torch.testing.assert_close(out[2][name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.cluster
class TestTwoNodes:
    @pytest.fixture(scope="class", autouse=True)
    def two_node_cluster(self):
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
        cluster.add_node(num_cpus=2)
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
        ray.shutdown()
        cluster.shutdown()

    def test_ranks_on_two_nodes_stay_identical_and_read_disjoint_data(self, tmp_path, tmp_path_factory):
        from detr_ray.data.demo import ensure_demo_shards
        from detr_ray.data.shards import read_shard_table

        root = tmp_path_factory.mktemp("demo2")
        train_uri, _ = ensure_demo_shards(root, num_train=48, num_val=16)
        exp = demo_experiment()
        exp["model"].update(hidden_dim=32, dim_feedforward=64, num_queries=5)
        exp["data"].update(demo_shards(root), batch_size=4, shuffle_buffer=8)
        exp["train"].update(epochs=2, num_workers=2, cpus_per_worker=1.0, max_failures=0, eval_every=2)
        audit = tmp_path / "audit"
        result = build_trainer(
            experiment_from_dict(exp),
            name="two-nodes",
            storage_path=str(tmp_path / "runs"),
            testing=TestingHooks(audit_dir=str(audit)),
            placement_strategy="STRICT_SPREAD",
        ).fit()
        assert result.metrics["epoch"] == 2
        all_ids = set(read_shard_table(train_uri, ["image_id"]).column("image_id").to_pylist())
        for epoch in (1, 2):
            r0 = json.loads((audit / f"rank0_epoch{epoch}.json").read_text())
            r1 = json.loads((audit / f"rank1_epoch{epoch}.json").read_text())
            assert r0["node_id"] != r1["node_id"]
            assert r0["params_sha256"] == r1["params_sha256"]
            assert not set(r0["image_ids"]) & set(r1["image_ids"])
            assert set(r0["image_ids"]) | set(r1["image_ids"]) == all_ids
