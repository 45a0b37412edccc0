"""The pipeline on a simulated 2-node cluster (ray.cluster_utils.Cluster): two consumers, one per
node, each reading its streaming_split part, as two Train workers on two nodes would."""

from __future__ import annotations

import pytest
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from detr_ray.data.batches import DetectionBatches
from detr_ray.data.datasets import train_dataset
from tests.data.conftest import AUGMENT, CORRUPT_ID, make_shards

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=2)  # a CPU-only worker node
    ray.init(address=c.address, log_to_driver=False, configure_logging=False)
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()


@ray.remote(num_cpus=0)
class Consumer:
    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def epochs(self, iterator, n: int) -> list[dict]:
        batches = DetectionBatches(iterator, batch_size=2, shuffle_buffer=2)
        out = []
        for _ in range(n):
            ids = [t["image_id"] for _, _, targets in batches for t in targets]
            out.append({"ids": ids, "skipped": batches.skipped})
        return out


@pytest.mark.timeout(300)
def test_two_nodes_two_consumers_disjoint_and_complete(cluster, tmp_path):
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 2
    out, _ = make_shards(tmp_path)
    splits = train_dataset(str(out), AUGMENT, decode_batch_size=2).streaming_split(2, equal=False)
    consumers = [
        Consumer.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
        for node in nodes
    ]
    assert sorted(ray.get([c.node.remote() for c in consumers])) == sorted(nodes)
    results = ray.get([c.epochs.remote(split, 2) for c, split in zip(consumers, splits)])
    for epoch in range(2):
        a, b = results[0][epoch], results[1][epoch]
        assert not set(a["ids"]) & set(b["ids"])
        assert sorted(a["ids"] + b["ids"]) == sorted({100, 101, 102, 103, 104, 105} - {CORRUPT_ID})
        assert a["skipped"] + b["skipped"] == 1
