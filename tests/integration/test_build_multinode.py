"""Ray Train workers of one build placed on different nodes of a multi-node (local) cluster."""

import pytest

from atlas.data.dataset import build_plan, vocabulary_sizes
from atlas.train.trainer import train
from tests.build_helpers import concerto_config

pytestmark = [pytest.mark.real_data, pytest.mark.ray]


def test_multi_node_training_places_workers_on_different_nodes(pbmc, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    store, _ = pbmc
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=2, resources={"trainer_slot": 1})
        ray.init(address=cluster.address)
        build = concerto_config(store, tmp_path / "artifact", tmp_path, name="test-multinode",
                                 scaling={"resources_per_worker": {"CPU": 1, "trainer_slot": 1}})
        plan = build_plan(store, build.data)
        result = train(build, plan, vocabulary_sizes(store, ["RNA"]))
        nodes = result.history["worker_nodes"]
        assert len(nodes) == 2 and len(set(nodes)) == 2, nodes
        assert result.history["epochs"][0]["cells"] == 2000
    finally:
        ray.shutdown()
        cluster.shutdown()
