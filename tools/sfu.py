#!/usr/bin/env python3
"""Start Janus (and simple-whip-server in front of it) on this machine, for trying ``publish``.

    python tools/sfu.py                     Janus: HTTP API on a free port (printed)
    python tools/sfu.py --whip --token T    + a WHIP endpoint publishing into room 1234

Janus's configuration is generated into a temporary folder (loopback HTTP API, the VideoRoom
plugin only, ICE on this machine's own address; see talkstream/publish/local.py) and removed
at exit. Needs ``apt-get install janus``; ``--whip`` needs ``make whip-server`` (Debian's
simple-whip-server JavaScript and its npm dependencies). Ctrl-C stops both.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from talkstream.errors import TalkstreamError
from talkstream.publish import janus
from talkstream.publish.local import LocalJanus, LocalWhipServer


async def _create_room(url: str, room: int) -> None:
    async with await janus.JanusSession.open(url) as s:
        await janus.ensure_room(await s.attach(), room)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--port", type=int, default=None, help="Janus HTTP port (default: a free one)")
    ap.add_argument("--room", type=int, default=1234, help="VideoRoom room to create (1234)")
    ap.add_argument("--whip", action="store_true", help="also run simple-whip-server")
    ap.add_argument("--token", default=None, help="Bearer token of the WHIP endpoint")
    ap.add_argument("--endpoint", default="talkstream", help="WHIP endpoint id (talkstream)")
    a = ap.parse_args()
    try:
        with LocalJanus(websockets=a.whip, http_port=a.port) as j:
            asyncio.run(_create_room(j.url, a.room))
            print(f"Janus HTTP API: {j.url}  (room {a.room}; log {j.log_path})", flush=True)
            print(
                f"  talkstream publish --janus {j.url} --room {a.room} --ice-local-only", flush=True
            )
            whip = None
            if a.whip:
                whip = LocalWhipServer(j).start()
                url = whip.create_endpoint(a.endpoint, a.room, token=a.token)
                tok = f" --token {a.token}" if a.token else ""
                print(f"WHIP endpoint: {url}", flush=True)
                print(f"  talkstream publish --whip {url}{tok} --ice-local-only", flush=True)
            try:
                signal.sigwait({signal.SIGINT, signal.SIGTERM})
            finally:
                if whip is not None:
                    whip.cleanup()
    except TalkstreamError as e:
        print(f"sfu: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    sys.exit(main())
