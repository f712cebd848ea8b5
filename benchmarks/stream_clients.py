"""Live WebRTC clients in a process of their own, for the concurrency scenario of
``benchmarks/stream_latency.py``: the server's capacity is measured without the clients'
decoders sharing its Python interpreter (and its GIL).

    python benchmarks/stream_clients.py URL N SECONDS

Prints one JSON line with the session ids once all N are connected, then, after SECONDS, one
with each client's received video fps over the last SECONDS - 2 s, and exits.
"""

from __future__ import annotations

import asyncio
import json
import sys

import numpy as np


def speechlike_signal() -> np.ndarray:
    """Voiced syllables (3 per second) on a 180 Hz buzz: speech-like, the same every run."""
    t = np.arange(48000 * 4) / 48000
    return (0.6 * np.sin(2 * np.pi * 180 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(
        np.float32
    )


async def run(url: str, n: int, seconds: float) -> None:
    import aiohttp

    from talkstream.streaming.client import SpeechTrack, connect
    from talkstream.streaming.sdp import use_loopback_ice

    use_loopback_ice()
    sig = speechlike_signal()
    async with aiohttp.ClientSession() as http:
        clients = [
            await connect(url, mic=SpeechTrack(sig, loop=True), session=http) for _ in range(n)
        ]
        print(json.dumps({"ids": [c.session_id for c in clients]}), flush=True)
        await asyncio.sleep(seconds)
        fps = [round(c.received.fps(last_s=seconds - 2.0), 2) for c in clients]
        print(json.dumps({"fps": fps}), flush=True)
        for c in clients:
            await c.close()


if __name__ == "__main__":
    asyncio.run(run(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
