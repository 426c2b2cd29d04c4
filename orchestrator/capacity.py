"""Requests the cluster can never meet.

A stage's worker group is `num_workers` identical bundles (`resources_per_worker`);
Ray Train places them with a soft PACK placement group, so they fit when the
nodes together hold that many bundles: sum over nodes of how many bundles each
node's totals hold. A cluster that cannot grow (the embedded one, or one without
an autoscaler) is refused at once, before any trial starts; on an autoscaling
cluster the driver asks the autoscaler for the bundles and waits for nodes, up
to `rlgrad run --wait-for-nodes` seconds.
"""

from __future__ import annotations

import math
import time
from typing import Callable

from .spec import StageSpec

Nodes = list[dict[str, float]]  # each alive node's total resources


def stage_bundles(stage: StageSpec) -> tuple[int, dict[str, float]]:
    """(how many bundles, one bundle): an inline trial (num_workers 0) holds one worker's resources."""
    per = {k: v for k, v in stage.scaling.resources_per_worker().items() if v > 0}
    return max(1, stage.scaling.num_workers), per


def bundles_fitting(node: dict[str, float], bundle: dict[str, float]) -> int:
    if not bundle:
        return 1 << 30
    return min(math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in bundle.items())


def fits(stage: StageSpec, nodes: Nodes) -> bool:
    count, bundle = stage_bundles(stage)
    return sum(bundles_fitting(node, bundle) for node in nodes) >= count


def _amounts(resources: dict[str, float]) -> str:
    shown = []
    for k, v in sorted(resources.items(), key=lambda kv: (kv[0] not in ("CPU", "GPU", "memory"), kv[0])):
        if k.startswith("node:") or k == "object_store_memory":
            continue
        if k == "memory":
            shown.append(f"{v / 1024**3:.3g} GiB memory")
        else:
            shown.append(f"{v:g} {k}")
    return ", ".join(shown) or "nothing"


def describe_shortfall(stage: StageSpec, nodes: Nodes) -> str:
    """`stage 'x' asks for 64 worker(s) x {1 CPU, 1 GPU}; the cluster has 1 node(s), the biggest 2 CPU, ...; in all ...`"""
    count, bundle = stage_bundles(stage)
    asks = f"{count} worker(s) x {{{_amounts(bundle)}}}"
    if not nodes:
        return f"stage {stage.name!r} asks for {asks}; the cluster has no alive node"
    keys = set(bundle) | {"CPU", "GPU"}
    total = {k: sum(n.get(k, 0.0) for n in nodes) for k in keys}
    biggest = max(nodes, key=lambda n: (bundles_fitting(n, bundle), n.get("GPU", 0), n.get("CPU", 0)))
    room = sum(bundles_fitting(n, bundle) for n in nodes)
    return (f"stage {stage.name!r} asks for {asks}; the cluster has {len(nodes)} node(s), the biggest with "
            f"{{{_amounts({k: biggest.get(k, 0.0) for k in keys})}}}, in all {{{_amounts(total)}}}: "
            f"room for {room} such worker(s)")


def alive_nodes() -> Nodes:
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def cluster_can_grow() -> bool:
    """Whether an autoscaler watches this cluster: its status key in the GCS (written by the
    autoscaler's monitor), or a cluster config with node types that can add nodes."""
    try:
        from ray._private import ray_constants
        from ray.experimental.internal_kv import _internal_kv_get

        if _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS) is not None:
            return True
        from ray._private.state import state

        config = state.get_cluster_config()
        return bool(config and any(g.max_count != 0 for g in config.node_group_configs))
    except Exception:  # no GCS key, no cluster config API: treat as fixed
        return False


class InfeasibleError(Exception):
    """A stage asks for more than the cluster has or (autoscaling) could get in time."""


def refuse_infeasible(stages: list[StageSpec], nodes: Nodes) -> None:
    """On a cluster that cannot grow: the first stage that can never run, in one line."""
    for stage in stages:
        if not fits(stage, nodes):
            raise InfeasibleError(describe_shortfall(stage, nodes) + "; lower num_workers or the per-worker "
                                                                      "resources, or run on a bigger cluster")


def wait_for_nodes(stage: StageSpec, timeout_s: float, say: Callable[[str], None],
                   get_nodes: Callable[[], Nodes] = alive_nodes, request: Callable[[list], None] | None = None,
                   poll_s: float = 5.0, sleep: Callable[[float], None] = time.sleep,
                   clock: Callable[[], float] = time.monotonic) -> None:
    """On an autoscaling cluster: ask for the stage's bundles and wait until they fit,
    or raise InfeasibleError after timeout_s."""
    nodes = get_nodes()
    if fits(stage, nodes):
        return
    count, bundle = stage_bundles(stage)
    if request is None:
        from ray.autoscaler.sdk import request_resources

        def request(bundles):
            request_resources(bundles=bundles)
    request([bundle] * count)
    say(f"{describe_shortfall(stage, nodes)}; waiting up to {timeout_s / 60:.3g} min for the autoscaler "
        "to add nodes (--wait-for-nodes)")
    deadline = clock() + timeout_s
    try:
        while clock() < deadline:
            sleep(poll_s)
            nodes = get_nodes()
            if fits(stage, nodes):
                say(f"stage {stage.name!r}: the cluster now has room for its workers")
                return
        raise InfeasibleError(f"no nodes after {timeout_s / 60:.3g} min: {describe_shortfall(stage, nodes)}")
    finally:
        request([])
