"""Render workers on a local Ray cluster, sessions placed by Ray Serve, published into Janus.

The cluster has a head node (no CPUs, Serve's controller) and two "machines": Ray nodes with
one unit of the ``talkstream_render`` resource each, so Serve runs one worker on each. Workers
load a tiny random-weight engine and take one session each. The test checks placement (two
sessions, one per worker, both publishing into Janus), a clean refusal when both are full, and a
lost machine: its session ends with the reason, its failover is refused while the survivor is
full, Janus drops the dead publisher, a replacement machine gets a worker, and the survivor's
freed slot and the new worker's slot each take one session again (no slot stuck anywhere). The
figures are printed (run with -s) and written to $TALKSTREAM_CLUSTER_FIGURES if set.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

ray = pytest.importorskip("ray", reason="the cluster extra (ray[serve]) is not installed")
pytest.importorskip("ray.serve", reason="the cluster extra (ray[serve]) is not installed")
pytest.importorskip("aiortc", reason="the serve extra (aiortc) is not installed")

import aiohttp  # noqa: E402
from aiohttp import web  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from talkstream.cluster.gateway import gateway_app  # noqa: E402
from talkstream.cluster.pool import CapacityError, Lease, RenderPool  # noqa: E402
from talkstream.cluster.worker import RESOURCE, ClusterConfig, deployment  # noqa: E402
from talkstream.config import AvatarConfig, Config, EngineConfig, IdleConfig  # noqa: E402
from talkstream.publish import janus  # noqa: E402
from talkstream.publish.local import (  # noqa: E402
    LocalJanus,
    janus_binary,
    local_ice_address,
    use_local_ice,
)
from talkstream.publish.publisher import watch_janus  # noqa: E402

ROOM = 4100
JANUS_SESSION_TIMEOUT_S = 5  # how soon Janus drops a dead worker's publisher

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        janus_binary() is None, reason="janus is not installed (apt-get install janus)"
    ),
    pytest.mark.skipif(
        local_ice_address() is None,
        reason="no IPv4 address besides loopback: Janus gathers no ICE candidate on loopback",
    ),
]


@pytest.fixture(scope="module")
def local_janus() -> Iterator[LocalJanus]:
    with LocalJanus(session_timeout_s=JANUS_SESSION_TIMEOUT_S) as j:
        yield j


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "include_dashboard": False,
            # The GCS declares a killed machine dead after 3 failed health checks 1 s apart
            # (Ray's defaults: 5 checks 3 s apart), so Serve replaces its worker sooner.
            "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3},
        },
    )
    for _ in range(2):
        c.add_node(num_cpus=1, resources={RESOURCE: 1})
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield c
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        c.shutdown()


def node_of(c: Cluster, lease: Lease) -> Any:
    for node in c.worker_nodes:
        if node.node_id == lease.worker["node"]:
            return node
    raise AssertionError(f"no node {lease.worker['node']}")


async def feeds(j: LocalJanus) -> dict[int, str]:
    async with await janus.JanusSession.open(j.url) as s:
        return {
            int(p["id"]): p["display"] for p in await janus.list_publishers(await s.attach(), ROOM)
        }


async def wait_until(pred: Any, timeout: float, step: float = 0.2) -> float:
    """Seconds until the async predicate held (AssertionError after ``timeout``)."""
    t0 = time.monotonic()
    while not await pred():
        assert time.monotonic() - t0 < timeout, f"not within {timeout} s"
        await asyncio.sleep(step)
    return time.monotonic() - t0


async def test_placement_refusal_and_a_lost_worker(
    cluster: Cluster, local_janus: LocalJanus
) -> None:
    address = local_ice_address()
    assert address is not None
    cfg = Config(
        engine=EngineConfig(
            preset="tiny",
            idle=IdleConfig(enabled=False),
            avatar=AvatarConfig(framing="square"),
            threads=1,
        ),
        cluster=ClusterConfig(
            janus_url=local_janus.url,
            room=ROOM,
            max_sessions=1,
            random_init=True,
            ice_address=address,
            janus_keepalive_s=1.0,
        ),
    )
    t = time.monotonic()
    pool = RenderPool.deploy(deployment(cfg, num_replicas=2), assign_timeout_s=30)
    fig: dict[str, Any] = {"deploy_s": round(time.monotonic() - t, 1)}
    leases: list[Lease] = []
    try:
        # Placement: one session per worker, each on its own machine, both in the SFU.
        a = await pool.start(id="a")
        b = await pool.start(id="b")
        leases += [a, b]
        assert a.worker["node"] != b.worker["node"], (a.worker, b.worker)
        assert set((await feeds(local_janus)).values()) == {"a", "b"}
        fig["placement"] = {"a": a.worker["replica"], "b": b.worker["replica"]}
        with use_local_ice(address):
            viewers = [await watch_janus(local_janus.url, ROOM, x.feed) for x in (a, b)]
            try:

                async def both_watched() -> bool:  # 1.5 s of video at >= 10 fps each
                    for v in viewers:
                        t = v.stats.video_arrivals
                        if len(t) < 2 or t[-1] - t[0] < 1.5 or v.stats.fps(last_s=1.5) < 10:
                            return False
                    return True

                await wait_until(both_watched, 10, step=0.1)
                fig["viewer_fps"] = [round(v.stats.fps(last_s=1.5), 1) for v in viewers]
            finally:
                for v in viewers:
                    await v.close()

        # Both full: refused at once, not queued; over HTTP, a 503 with Retry-After.
        t = time.monotonic()
        with pytest.raises(CapacityError, match="full"):
            await pool.start(id="c")
        fig["refusal_ms"] = round(1000 * (time.monotonic() - t))
        assert fig["refusal_ms"] < 5000
        runner = web.AppRunner(gateway_app(pool), handle_signals=False, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        gw = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            async with aiohttp.ClientSession() as http:
                async with http.post(gw + "/sessions", json={"id": "c"}) as r:
                    body = await r.json()
                    assert r.status == 503 and "full" in body["error"], body
                    assert int(r.headers["Retry-After"]) > 0
                async with http.get(gw + "/sessions") as r:
                    assert (await r.json())["sessions"] == []  # nothing half-made
        finally:
            await runner.cleanup()

        # Lose the machine of session a.
        lost_node = node_of(cluster, a)
        t_kill = time.monotonic()
        cluster.remove_node(lost_node, allow_graceful=False)
        await asyncio.wait_for(a.ended.wait(), 30)
        fig["loss_detected_s"] = round(time.monotonic() - t_kill, 1)
        assert a.lost, a.end_reason
        assert not b.ended.is_set()
        # Failover while the survivor is full: refused cleanly, b untouched.
        with pytest.raises(CapacityError):
            await pool.failover(a)
        assert not b.ended.is_set()

        # A replacement machine, added now so that its worker starts while Janus times out the
        # dead one's publisher: Serve restarts the lost worker there, with its slot free.
        t_add = time.monotonic()
        new_node = cluster.add_node(num_cpus=1, resources={RESOURCE: 1})
        survivor = b.worker["node"]

        # Janus drops the dead worker's publisher (its session stops being kept alive).
        async def a_gone() -> bool:
            return "a" not in (await feeds(local_janus)).values()

        await wait_until(a_gone, 4 * JANUS_SESSION_TIMEOUT_S)
        fig["sfu_dropped_dead_feed_s"] = round(time.monotonic() - t_kill, 1)
        # The survivor's slot frees when b ends; a's failover lands on a worker with room (the
        # survivor, or the replacement if it is up already).
        await b.end()
        t = time.monotonic()
        a2 = await pool.failover(a)
        leases.append(a2)
        fig["failover_start_s"] = round(time.monotonic() - t, 2)
        assert a2.worker["node"] in (survivor, new_node.node_id), a2.worker

        # The one slot left free, on the other of the two machines, takes a session once the
        # replacement worker is up: the survivor's slot and the new worker's both work.
        async def placed() -> bool:
            try:
                lease = await pool.start(id=f"d{int(time.monotonic() * 10)}")
            except CapacityError:
                return False
            leases.append(lease)
            return True

        await wait_until(placed, 90, step=0.5)
        fig["replacement_worker_ready_s"] = round(time.monotonic() - t_add, 1)
        assert {a2.worker["node"], leases[-1].worker["node"]} == {survivor, new_node.node_id}
        assert not a2.ended.is_set(), a2.end_reason
        assert len(await feeds(local_janus)) == 2  # a2 and d, no stale feed
    finally:
        for lease in leases:
            await lease.end()
        from ray import serve

        serve.delete("talkstream")
    print("CLUSTER FIGURES", json.dumps(fig))
    out = os.environ.get("TALKSTREAM_CLUSTER_FIGURES")
    if out:
        with open(out, "w") as f:
            json.dump(fig, f, indent=1)
