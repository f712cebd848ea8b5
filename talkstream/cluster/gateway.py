"""An HTTP front end of the render pool: sessions over HTTP, 503 when every worker is full.

- ``POST /sessions`` (JSON: ``id``, ``room``, ``duration_s``, all optional) starts a session:
  ``201 {"session", "worker", "feed", "room", "push_url", "watch_url"}``; ``503`` with
  ``Retry-After`` when every worker is full or none is up;
- ``GET /sessions``: the sessions and their state; ``GET /sessions/{id}``: one;
- ``DELETE /sessions/{id}``: end it;
- ``POST /sessions/{id}/failover``: start a lost session again (201, or 503 if no room).

Run it in the process that called ``RenderPool.deploy`` (or holds its handle); placement stays
Serve's. Errors are JSON ``{"error": "..."}``.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from talkstream.cluster.pool import CapacityError, Lease, RenderPool, WorkerLostError

POOL_KEY = web.AppKey("pool", RenderPool)
RETRY_AFTER_S = 5


def _lease_json(lease: Lease) -> dict[str, Any]:
    return {
        "session": lease.session_id,
        "worker": lease.worker,
        "room": lease.started.get("room"),
        "feed": lease.feed,
        "push_url": lease.push_url,
        "watch_url": lease.started.get("watch_url"),
        "ended": lease.ended.is_set(),
        "end_reason": lease.end_reason,
        "lost": lease.lost,
        "stats": {k: v for k, v in lease.last_stats.items() if k not in ("event", "session")},
    }


def _err(status: int, reason: str, **headers: str) -> web.Response:
    return web.json_response({"error": reason}, status=status, headers=headers or None)


def gateway_app(pool: RenderPool) -> web.Application:
    # Leases that ended stay listed (until deleted) so that a lost one can be failed over.
    known: dict[str, Lease] = {}

    async def create(request: web.Request) -> web.Response:
        try:
            body = await request.json() if request.can_read_body else {}
        except ValueError:
            return _err(400, "the body is not JSON")
        if not isinstance(body, dict):
            return _err(400, "the body must be a JSON object")
        spec = {k: body[k] for k in ("id", "room", "duration_s") if body.get(k) is not None}
        if "id" in spec and str(spec["id"]) in known:
            return _err(409, f"session {spec['id']!r} exists")
        try:
            lease = await pool.start(spec)
        except CapacityError as e:
            return _err(503, str(e), **{"Retry-After": str(RETRY_AFTER_S)})
        except WorkerLostError as e:
            return _err(503, str(e), **{"Retry-After": "1"})
        known[lease.session_id] = lease
        return web.json_response(_lease_json(lease), status=201)

    def get_lease(request: web.Request) -> Lease:
        sid = request.match_info["id"]
        if sid not in known:
            raise web.HTTPNotFound(
                text=f'{{"error": "no session {sid!r}"}}', content_type="application/json"
            )
        return known[sid]

    async def listing(request: web.Request) -> web.Response:
        return web.json_response({"sessions": [_lease_json(x) for x in known.values()]})

    async def one(request: web.Request) -> web.Response:
        return web.json_response(_lease_json(get_lease(request)))

    async def delete(request: web.Request) -> web.Response:
        lease = get_lease(request)
        await lease.end()
        known.pop(lease.session_id, None)
        return web.json_response({"ended": lease.session_id})

    async def failover(request: web.Request) -> web.Response:
        lease = get_lease(request)
        if not lease.ended.is_set():
            return _err(409, f"session {lease.session_id!r} is running")
        try:
            new = await pool.failover(lease)
        except CapacityError as e:
            return _err(503, str(e), **{"Retry-After": str(RETRY_AFTER_S)})
        known[new.session_id] = new
        return web.json_response(_lease_json(new), status=201)

    app = web.Application()
    app[POOL_KEY] = pool
    app.router.add_post("/sessions", create)
    app.router.add_get("/sessions", listing)
    app.router.add_get("/sessions/{id}", one)
    app.router.add_delete("/sessions/{id}", delete)
    app.router.add_post("/sessions/{id}/failover", failover)
    return app


__all__ = ["gateway_app"]
