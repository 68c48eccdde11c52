"""Shared Ray fixture for the jobs tests: one real local cluster per test session.

A cluster takes seconds to start, so every test that is about Ray asks for `ray_local` and
they all share it. It is a `ray.cluster_utils.Cluster`: a head node with 2 CPUs and no GPU,
no dashboard, token authentication off (Ray 2.60 turns it on for new local clusters and
writes ~/.ray/auth_token; a throwaway test cluster needs neither). Tests about autoscaling
ask for `nodes` to add (logical GPU) nodes mid-run and remove them; the nodes a test added
are removed afterwards, so the next test sees the 2-CPU head alone again. Code under test
that calls `jobs.cluster.connect()` sees Ray initialised and reuses this cluster.
"""

from __future__ import annotations

import logging

import pytest


def _start_head(cluster_cls, attempts: int = 2):
    """The head node; a second try if its raylet missed Ray's 30 s start-up window (a busy
    machine: every helper's tests share two cores)."""
    for attempt in range(attempts):
        try:
            return cluster_cls(initialize_head=True, head_node_args={
                "num_cpus": 2, "num_gpus": 0, "include_dashboard": False})
        except Exception as exc:  # noqa: BLE001 -- Ray raises a bare Exception on that timeout
            if attempt == attempts - 1 or "timed out during startup" not in str(exc):
                raise
            logging.getLogger(__name__).warning("Ray head start timed out; retrying once")


@pytest.fixture(scope="session")
def ray_cluster():
    import ray
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        if ray.is_initialized():  # someone else's cluster: do not silently share it
            ray.shutdown()
        cluster = _start_head(Cluster)
        try:
            ray.init(address=cluster.address, logging_level=logging.WARNING)
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()


@pytest.fixture(scope="session")
def ray_local(ray_cluster):
    import ray

    return ray


class Nodes:
    """Adds worker nodes to the shared cluster for one test; `remove` takes one away."""

    def __init__(self, cluster):
        self.cluster, self.added = cluster, []

    def add(self, num_cpus: int = 1, num_gpus: int = 1):
        node = self.cluster.add_node(num_cpus=num_cpus, num_gpus=num_gpus)
        self.added.append(node)
        return node

    def remove(self, node) -> None:
        self.cluster.remove_node(node, allow_graceful=False)
        self.added.remove(node)

    def by_id(self, node_id: str):
        return next(n for n in self.added if n.node_id == node_id)


@pytest.fixture
def nodes(ray_cluster):
    helper = Nodes(ray_cluster)
    try:
        yield helper
    finally:
        for node in list(helper.added):
            helper.remove(node)
        ray_cluster.wait_for_nodes()
