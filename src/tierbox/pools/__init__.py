"""Warm pools of ready sandboxes, autoscaled by the Kubernetes HPA
algorithm, within a disruption budget; serverless functions on top.

:class:`Pool` is one pool in this process; :class:`PoolManager` hosts named
pools and functions for a process that outlives its callers (their
definitions, templates and autoscaler history are kept on disk), and
:mod:`tierbox.pools.server` lets the CLI reach the one it starts."""

from tierbox.pools.budget import Amount, DisruptionBudget
from tierbox.pools.pool import Mode, Pool, PooledSandbox
from tierbox.pools.spec import PoolMetric, PoolSpec

__all__ = [
    "Amount",
    "DisruptionBudget",
    "Mode",
    "Pool",
    "PoolMetric",
    "PoolSpec",
    "PooledSandbox",
]
