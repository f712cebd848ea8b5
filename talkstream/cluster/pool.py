"""The caller's side of the render workers: start, watch, end and fail over sessions.

Placement is Ray Serve's: a session is one streaming request to the deployment, and Serve's
router sends it to the replica with the fewest requests in flight (power of two choices over
the replicas' queue lengths). Nothing here picks a worker.

- :meth:`RenderPool.start` returns a :class:`Lease` once a worker has published the presenter
  (its ``started`` event), or raises :class:`CapacityError` at once when the worker Serve chose
  was full (every worker was), or when no worker answers within ``assign_timeout_s`` (none up);
- a lease's ``ended`` is set when its session ends: cancelled by :meth:`Lease.end`, its duration
  over, dropped by the SFU, or its worker lost (``lost``: the process or the machine died);
- :meth:`RenderPool.failover` starts a lost lease's session again: Serve places it on a live
  worker, or it is refused like any other session when none has room. The dead worker's slots
  are not leaked anywhere: they were the replica's own requests, gone with it, and Serve
  restarts the replica (on any machine with the worker resource) with all its slots free.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from talkstream.errors import TalkstreamError

log = logging.getLogger(__name__)

ASSIGN_TIMEOUT_S = 60.0  # a worker loads nothing per session; this covers a cold replica
REFUSAL_RETRIES = 1  # a refusal is retried once: concurrent starts can race for one slot


class CapacityError(TalkstreamError):
    """No render worker has room for another session (HTTP 503 at a front end)."""


class WorkerLostError(TalkstreamError):
    """The worker rendering a session died (its process or its machine)."""


def _is_full(e: BaseException) -> bool:
    return "WorkerFullError" in type(e).__name__ or "WorkerFullError" in str(e)


def _is_lost(e: BaseException) -> bool:
    import ray.exceptions as rex

    lost = (rex.RayActorError, rex.ActorUnavailableError, rex.NodeDiedError, rex.WorkerCrashedError)
    return isinstance(e, lost) or isinstance(getattr(e, "cause", None), lost)


@dataclass(eq=False)
class Lease:
    """A running session: where it renders and how to reach it."""

    spec: dict[str, Any]
    started: dict[str, Any]
    gen: Any  # the DeploymentResponseGenerator
    started_at: float = field(default_factory=time.monotonic)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    end_reason: str = ""
    lost: bool = False
    last_stats: dict[str, Any] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None

    @property
    def session_id(self) -> str:
        return str(self.spec["id"])

    @property
    def worker(self) -> dict[str, str]:
        return dict(self.started["worker"])

    @property
    def push_url(self) -> str:
        return str(self.started["push_url"])

    @property
    def feed(self) -> int:
        return int(self.started["feed"])

    def _end(self, reason: str, *, lost: bool = False) -> None:
        if not self.ended.is_set():
            self.end_reason, self.lost = reason, lost
            self.ended.set()

    async def _follow(self) -> None:
        try:
            async for ev in self.gen:
                if ev.get("event") == "stats":
                    self.last_stats = ev
                elif ev.get("event") == "ended":
                    self._end(str(ev.get("reason", "ended")))
            self._end(self.end_reason or "ended")
        except asyncio.CancelledError:
            self._end("ended by the caller")
            raise
        except Exception as e:
            if _is_lost(e):
                self._end(f"worker lost: {type(e).__name__}", lost=True)
            else:
                self._end(f"session failed: {type(e).__name__}: {str(e)[:200]}")

    async def end(self, timeout: float = 10.0) -> None:
        """End the session (its worker closes the publication and frees the slot)."""
        if not self.ended.is_set():
            self.gen.cancel()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self.task, timeout)
        self._end("ended by the caller")


class RenderPool:
    """Sessions on the render workers of a deployed Serve application.

    Args:
        handle: the ``DeploymentHandle`` of :func:`talkstream.cluster.worker.deployment`.
        assign_timeout_s: how long a start may wait for any worker to answer.
    """

    def __init__(self, handle: Any, *, assign_timeout_s: float = ASSIGN_TIMEOUT_S) -> None:
        self.handle = handle
        self.assign_timeout_s = assign_timeout_s
        self.leases: dict[str, Lease] = {}

    @classmethod
    def deploy(
        cls,
        app: Any,
        *,
        name: str = "talkstream",
        assign_timeout_s: float = ASSIGN_TIMEOUT_S,
    ) -> RenderPool:
        """Run ``app`` (:func:`~talkstream.cluster.worker.deployment`) on the connected Ray
        cluster, without Serve's HTTP proxy; blocks until every replica is up."""
        from ray import serve

        serve.start(proxy_location="Disabled")
        handle = serve.run(app, name=name, route_prefix=None)
        return cls(handle, assign_timeout_s=assign_timeout_s)

    async def start(self, spec: dict[str, Any] | None = None, **kw: Any) -> Lease:
        """Start a session (``spec``: see ``RenderWorker.session``; ``id`` made if missing).

        Raises:
            CapacityError: every worker is full, or none answered in ``assign_timeout_s``.
        """
        spec = {**(spec or {}), **kw}
        spec.setdefault("id", uuid.uuid4().hex[:12])
        for attempt in range(REFUSAL_RETRIES + 1):
            try:
                return await self._start_once(spec)
            except CapacityError:
                if attempt == REFUSAL_RETRIES:
                    raise
                await asyncio.sleep(0.2)
        raise AssertionError("unreachable")

    async def _start_once(self, spec: dict[str, Any]) -> Lease:
        from ray.serve.exceptions import BackPressureError

        gen = self.handle.options(stream=True).session.remote(spec)
        try:
            first = await asyncio.wait_for(gen.__anext__(), self.assign_timeout_s)
        except TimeoutError:
            gen.cancel()
            raise CapacityError(
                f"no render worker took session {spec['id']!r} within "
                f"{self.assign_timeout_s:.0f} s: none is up, or all are busy starting"
            ) from None
        except BackPressureError:
            raise CapacityError(
                "all render workers are full; add a worker or retry later"
            ) from None
        except Exception as e:
            if _is_full(e):
                raise CapacityError(
                    "all render workers are full (the least loaded one refused); add a worker "
                    "or retry later"
                ) from None
            if _is_lost(e):
                raise WorkerLostError(
                    f"the worker chosen for session {spec['id']!r} died while starting it"
                ) from None
            raise
        if first.get("event") != "started":
            gen.cancel()
            raise TalkstreamError(f"session {spec['id']!r} did not start: {first}")
        lease = Lease(spec, first, gen)
        lease.task = asyncio.create_task(lease._follow(), name=f"lease-{spec['id']}")
        self.leases[lease.session_id] = lease
        lease.task.add_done_callback(lambda _t: self.leases.pop(lease.session_id, None))
        return lease

    async def failover(self, lease: Lease) -> Lease:
        """Start a lost (or ended) lease's session again, wherever Serve places it.

        Raises:
            CapacityError: no live worker has room: the session ends cleanly instead.
        """
        await lease.end()
        spec = {k: v for k, v in lease.spec.items() if k != "speech"}  # already spoken
        return await self.start(spec)

    async def close(self) -> None:
        for lease in list(self.leases.values()):
            await lease.end()


__all__ = [
    "ASSIGN_TIMEOUT_S",
    "CapacityError",
    "Lease",
    "RenderPool",
    "WorkerLostError",
]
