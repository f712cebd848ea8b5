"""Render workers on many machines, with sessions placed by Ray Serve (docs/deploy.md).

- :mod:`talkstream.cluster.worker`: the Serve deployment. Each replica (one per machine, GPU or
  CPU box) loads the engine once and renders up to ``max_sessions`` presenters, each published
  into the SFU (Janus) encoded once, with its own push API for speech;
- :mod:`talkstream.cluster.pool`: the caller's side: a session is one long streaming Serve
  request, so Serve's router places it on the least-loaded replica; a full pool refuses at once
  (:class:`~talkstream.cluster.pool.CapacityError`), a lost worker ends its sessions with the
  reason, and the slot comes back with the replica Serve restarts;
- :mod:`talkstream.cluster.gateway`: the same over HTTP (201 / 503 with Retry-After).

Ray is imported only by these modules (the ``cluster`` extra).
"""
