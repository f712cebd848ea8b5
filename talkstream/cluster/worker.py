"""The render worker: a Ray Serve deployment whose replicas render presenters into the SFU.

A session is one call of :meth:`RenderWorker.session`, a streaming request that lasts as long as
the presenter: it publishes a new :class:`AvatarStream` into a Janus VideoRoom (rendered and
encoded once in this replica, fanned out by Janus), serves the stream's push API on this node,
yields a ``started`` event (where to push speech, which feed to watch), then a ``stats`` event
every second, until the caller cancels it, its ``duration_s`` runs out, or Janus drops it.

Capacity: a replica holds at most ``max_sessions`` sessions. Serve lets ``max_sessions + 1``
requests into a replica (``max_ongoing_requests``), so a request that reaches a full replica
(every replica full) is refused at once by the replica itself, instead of waiting in Serve's
queue for a slot that may never free.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from talkstream.config import Config
from talkstream.errors import TalkstreamError

log = logging.getLogger(__name__)

RESOURCE = "talkstream_render"  # one unit per machine that may run a render worker
STATS_EVERY_S = 1.0


class WorkerFullError(TalkstreamError):
    """This worker already renders ``max_sessions`` sessions."""


@dataclass(frozen=True)
class ClusterConfig:
    """The ``cluster`` section of the config tree: where every replica publishes, and what it
    renders. The engine (preset, backend, threads, the avatar's framing) is the tree's ``engine``
    section; a replica whose engine section leaves ``threads`` unset runs one torch thread (it
    shares its machine with the SFU and the encoders).

    Args:
        janus_url: the SFU's HTTP API (``http://host:8088/janus``), reachable from workers.
        room: the VideoRoom sessions publish into unless their spec names one.
        max_sessions: presenters one worker renders at once (measure it: docs/deploy.md).
        random_init: load untrained weights (tests).
        image, landmarks: the avatar photo (None: the bundled face).
        push_host: address the per-session push API binds to; None: this node's IP.
        ice_address: gather ICE on this address only (an SFU on the same machine, tests).
        janus_keepalive_s: keepalive period of the workers' Janus sessions (under the Janus's
            ``session_timeout``, which is also how soon Janus drops a dead worker's feeds).
    """

    janus_url: str
    room: int = 1234
    max_sessions: int = 2
    random_init: bool = False
    image: Path | None = None
    landmarks: Path | None = None
    push_host: str | None = None
    ice_address: str | None = None
    janus_keepalive_s: float = 25.0


class RenderWorker:
    """One render worker (a Serve replica). Not decorated here: :func:`deployment` does it."""

    def __init__(self, root: Config) -> None:
        import dataclasses

        from talkstream.engine.avatar import load_avatar_source, prepare_avatar_source
        from talkstream.engine.checkpoint import Models
        from talkstream.runtime import load_engine

        if root.cluster is None:
            raise ValueError("a render worker needs the config's cluster section")
        cfg = root.cluster
        ecfg = root.engine if root.engine.threads else dataclasses.replace(root.engine, threads=1)
        self.cfg = cfg
        if cfg.ice_address:
            from talkstream.publish.local import use_local_ice

            # For the replica's whole life: every peer it makes is on this machine.
            self._ice = use_local_ice(cfg.ice_address)
            self._ice.__enter__()
        acfg = ecfg.avatar
        source = load_avatar_source(cfg.image, cfg.landmarks, acfg)
        models = Models.random_init(ecfg.preset, seed=0) if cfg.random_init else None
        self.engine = load_engine(ecfg, models)
        self.avatar = prepare_avatar_source(
            source, dataclasses.replace(acfg, crop_size=self.engine.crop_size)
        )
        self.engine.encode_avatar(self.avatar)
        self.engine.warmup(self.avatar)
        self.sessions: dict[str, dict[str, Any]] = {}
        self.identity = self._identity()
        log.info("render worker %s ready (%d sessions max)", self.identity, cfg.max_sessions)

    @staticmethod
    def _identity() -> dict[str, str]:
        ident = {"pid": str(os.getpid())}
        with contextlib.suppress(Exception):
            import ray
            from ray import serve

            ident["node"] = ray.get_runtime_context().get_node_id()
            ident["node_ip"] = ray.util.get_node_ip_address()
            ident["replica"] = serve.get_replica_context().replica_id.unique_id
        return ident

    async def session(self, spec: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Render and publish one presenter; yields ``started``, ``stats``..., ``ended``.

        ``spec``: ``id`` (required), ``room``, ``duration_s`` (None: until cancelled),
        ``speech`` (``(pcm, rate)`` to speak at once).

        Raises:
            WorkerFullError: this worker already renders ``max_sessions`` sessions.
        """
        from talkstream.publish.publisher import publish_to_janus
        from talkstream.publish.push import serve_push_api
        from talkstream.streaming.config import StreamConfig
        from talkstream.streaming.tracks import AvatarStream

        sid = str(spec["id"])
        if len(self.sessions) >= self.cfg.max_sessions:
            raise WorkerFullError(
                f"worker {self.identity.get('replica', self.identity['pid'])} already renders "
                f"{len(self.sessions)} of {self.cfg.max_sessions} sessions"
            )
        room = int(spec.get("room") or self.cfg.room)
        self.sessions[sid] = {"room": room, "since": time.time()}
        stream = AvatarStream(self.engine, self.avatar, StreamConfig(), mode="presenter", name=sid)
        pub = None
        runner = None
        try:
            stream.start()
            pub = await publish_to_janus(
                stream,
                self.cfg.janus_url,
                room,
                display=sid,
                keepalive_s=self.cfg.janus_keepalive_s,
            )
            host = self.cfg.push_host or self.identity.get("node_ip", "127.0.0.1")
            runner, port = await serve_push_api(
                stream,
                host,
                0,
                extra={"session": sid, "worker": self.identity},
                watch=(self.cfg.janus_url, room, pub.feed),
            )
            if spec.get("speech") is not None:
                pcm, rate = spec["speech"]
                stream.push_speech(pcm, int(rate))
            yield {
                "event": "started",
                "session": sid,
                "worker": self.identity,
                "room": room,
                "feed": pub.feed,
                "push_url": f"http://{host}:{port}",
                "watch_url": f"http://{host}:{port}/watch",
                "worker_sessions": len(self.sessions),
            }
            duration = spec.get("duration_s")
            until = time.monotonic() + float(duration) if duration else None
            while True:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(pub.ended.wait(), STATS_EVERY_S)
                if pub.ended.is_set():
                    yield {"event": "ended", "session": sid, "reason": pub.end_reason}
                    return
                if until is not None and time.monotonic() >= until:
                    yield {"event": "ended", "session": sid, "reason": "duration reached"}
                    return
                snap = stream.snapshot()
                yield {
                    "event": "stats",
                    "session": sid,
                    "display_fps": snap["display_fps"],
                    "frames_rendered": snap["frames_rendered"],
                    "queued_s": snap["queued_s"],
                }
        finally:
            # Also on cancellation (the caller ended the session): nothing stays behind.
            if runner is not None:
                await runner.cleanup()
            if pub is not None:
                with contextlib.suppress(Exception):
                    await pub.close()
            await stream.close()
            self.sessions.pop(sid, None)

    def check_health(self) -> None:
        """Serve's health check: the engine's worker must be alive."""
        if getattr(self.engine, "closed", False):
            raise RuntimeError("the engine is closed")


def deployment(
    root: Config,
    *,
    num_replicas: int = 2,
    resources: dict[str, float] | None = None,
    name: str = "talkstream-render",
) -> Any:
    """The Serve application of ``num_replicas`` render workers.

    Each replica asks for no CPU (it shares the box with the SFU and the encoders; size
    ``max_sessions`` instead) and one unit of ``resources`` (default ``{RESOURCE: 1}``): give each
    machine that may render one unit (``ray start --resources='{"talkstream_render": 1}'``) and
    Serve puts one worker per machine.
    """
    from ray import serve

    if root.cluster is None:
        raise ValueError("deployment() needs the config's cluster section (Config(cluster=...))")
    dep = serve.deployment(
        name=name,
        num_replicas=num_replicas,
        max_ongoing_requests=root.cluster.max_sessions + 1,  # + 1: a full replica refuses at once
        ray_actor_options={"num_cpus": 0, "resources": resources or {RESOURCE: 1}},
        health_check_period_s=2.0,
        health_check_timeout_s=10.0,
        graceful_shutdown_timeout_s=5.0,
    )(RenderWorker)
    return dep.bind(root)


__all__ = ["RESOURCE", "ClusterConfig", "RenderWorker", "WorkerFullError", "deployment"]
