"""Shared Ray fixture for the jobs tests: one real local cluster per test session.

A local cluster takes seconds to start, so every test that is about Ray asks for `ray_local`
and they all share it. It is started with `address="local"` (never attaches to a cluster that
happens to run on the machine), 2 CPUs, no dashboard, and token authentication off (Ray 2.60
turns it on for new local clusters and writes ~/.ray/auth_token; a throwaway test cluster
needs neither). Code under test that calls `jobs.cluster.connect()` sees Ray initialised and
reuses this cluster instead of starting its own.
"""

from __future__ import annotations

import logging

import pytest


@pytest.fixture(scope="session")
def ray_local():
    import ray

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        if ray.is_initialized():  # someone else's cluster: do not silently share it
            ray.shutdown()
        ray.init(address="local", num_cpus=2, include_dashboard=False,
                 logging_level=logging.WARNING)
        try:
            yield ray
        finally:
            ray.shutdown()
