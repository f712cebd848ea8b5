"""Janus and simple-whip-server on this machine, from a configuration we write ourselves.

:class:`LocalJanus` writes a minimal Janus 1.x configuration into a temporary folder (HTTP API on
loopback, WebSockets only when a WHIP front end needs it, only the VideoRoom plugin, ICE on one
local address, no event handlers or loggers) and runs ``janus -F folder`` until stopped.

ICE and loopback: Janus never gathers a candidate on a loopback interface (libnice skips them;
``ice_enforce_list = "127.0.0.1"`` leaves it with none and it falls back to every other
interface). So media between Janus and peers on this machine uses the machine's own first
non-loopback IPv4 address (:func:`local_ice_address`), which the kernel delivers over ``lo``
all the same: nothing leaves the machine. :func:`use_local_ice` makes aiortc gather on that
address only (as :func:`talkstream.streaming.sdp.use_loopback_ice` does for 127.0.0.1).
:class:`LocalWhipServer` runs the JavaScript of Debian's ``simple-whip-server`` with node, from
the folder ``make whip-server`` fills (the Debian package itself conflicts with the machine's
nodejs, so its files are unpacked and its npm dependencies installed beside them).

Used by the tests, the benchmark and ``tools/sfu.py``; production runs a configured Janus.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Self

from talkstream.errors import TalkstreamError

log = logging.getLogger(__name__)

JANUS_BIN = "janus"
JANUS_LIB = Path("/usr/lib/x86_64-linux-gnu/janus")
REPO_ROOT = Path(__file__).resolve().parents[2]
# Where ``make whip-server`` puts the app (src/, web/, node_modules/).
WHIP_SERVER_DIR_ENV = "TALKSTREAM_WHIP_SERVER_DIR"
DEFAULT_WHIP_SERVER_DIR = REPO_ROOT / "build" / "simple-whip-server" / "app"
START_TIMEOUT_S = 20.0


class LocalServerError(TalkstreamError):
    """A local Janus or WHIP server could not be started."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def janus_binary() -> str | None:
    """Path of the janus binary, or None when it is not installed."""
    return shutil.which(JANUS_BIN)


def janus_lib_dir() -> Path:
    """Janus's module folder (plugins/, transports/ ...): Debian's, or next to the binary."""
    if JANUS_LIB.is_dir():
        return JANUS_LIB
    binary = janus_binary()
    if binary:
        for cand in (Path(binary).resolve().parents[1] / "lib" / "janus",):
            if cand.is_dir():
                return cand
    raise LocalServerError(
        "Janus's plugin folder was not found: install Janus (apt-get install janus)"
    )


def local_ice_address() -> str | None:
    """This machine's first non-loopback, non-link-local IPv4 address (None if it has none)."""
    import ipaddress

    import ifaddr

    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str):
                addr = ipaddress.ip_address(ip.ip)
                if not (addr.is_loopback or addr.is_link_local or addr.is_unspecified):
                    return ip.ip
    return None


@contextlib.contextmanager
def use_local_ice(address: str) -> Iterator[None]:
    """While inside, aiortc (aioice) gathers host candidates on ``address`` only.

    aioice has no option for this; its address lookup is swapped and restored on exit.
    """
    import aioice.ice

    saved = aioice.ice.get_host_addresses

    def only(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [address]

    aioice.ice.get_host_addresses = only
    try:
        yield
    finally:
        aioice.ice.get_host_addresses = saved


def _modules(folder: Path, keep: set[str]) -> str:
    """Comma-separated module files in ``folder`` that are not in ``keep`` (to disable)."""
    if not folder.is_dir():
        return ""
    names = sorted(p.name for p in folder.glob("libjanus_*.so"))
    return ",".join(n for n in names if n not in keep)


def janus_config(
    folder: Path,
    *,
    http_port: int,
    ws_port: int | None = None,
    rtp_ports: tuple[int, int] = (20000, 20999),
    ice_interface: str | None = None,
    debug_level: int = 3,
    session_timeout_s: int = 60,
    lib: Path | None = None,
) -> Path:
    """Write a Janus configuration into ``folder``; returns the main config file.

    Only what a publisher and its viewers need: the HTTP API (and WebSockets when ``ws_port``
    is given, for simple-whip-server) bound to loopback, the VideoRoom plugin, and ICE gathered
    on ``ice_interface`` only (default: :func:`local_ice_address`).
    """
    lib = lib or janus_lib_dir()
    ice_interface = ice_interface or local_ice_address()
    if not ice_interface:
        raise LocalServerError(
            "this machine has no IPv4 address besides loopback, and Janus gathers no ICE "
            "candidate on loopback: give it a network interface (or a dummy one)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    keep_transports = {"libjanus_http.so"} | ({"libjanus_websockets.so"} if ws_port else set())
    main = folder / "janus.jcfg"
    main.write_text(
        f"""general: {{
	configs_folder = "{folder}"
	plugins_folder = "{lib / "plugins"}"
	transports_folder = "{lib / "transports"}"
	events_folder = "{lib / "events"}"
	loggers_folder = "{lib / "loggers"}"
	debug_level = {debug_level}
	session_timeout = {session_timeout_s}
	server_name = "talkstream-local"
}}
media: {{
	rtp_port_range = "{rtp_ports[0]}-{rtp_ports[1]}"
}}
nat: {{
	nice_debug = false
	ignore_mdns = true
	ice_enforce_list = "{ice_interface}"
}}
plugins: {{
	disable = "{_modules(lib / "plugins", {"libjanus_videoroom.so"})}"
}}
transports: {{
	disable = "{_modules(lib / "transports", keep_transports)}"
}}
loggers: {{
	disable = "{_modules(lib / "loggers", set())}"
}}
events: {{
	broadcast = false
	disable = "{_modules(lib / "events", set())}"
}}
"""
    )
    (folder / "janus.transport.http.jcfg").write_text(
        f"""general: {{
	json = "plain"
	base_path = "/janus"
	http = true
	port = {http_port}
	ip = "127.0.0.1"
	https = false
}}
admin: {{
	admin_http = false
	admin_https = false
}}
"""
    )
    if ws_port:
        (folder / "janus.transport.websockets.jcfg").write_text(
            f"""general: {{
	json = "plain"
	ws = true
	ws_port = {ws_port}
	ws_ip = "127.0.0.1"
	wss = false
}}
admin: {{
	admin_ws = false
	admin_wss = false
}}
"""
        )
    # No rooms in the file: publishers create theirs through the API.
    (folder / "janus.plugin.videoroom.jcfg").write_text("general: {\n}\n")
    return main


def _get_json(url: str, timeout: float = 1.0) -> dict[str, object] | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            data = json.loads(r.read())
            return data if isinstance(data, dict) else None
    except (OSError, ValueError, urllib.error.URLError):
        return None


class _Process:
    """A child process that is ended (SIGTERM, then SIGKILL) on stop; its log in a file."""

    proc: subprocess.Popen[bytes] | None = None
    log_path: Path

    def _spawn(
        self, argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None
    ) -> None:
        logf = self.log_path.open("wb")
        try:
            self.proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C in a terminal reaches us, not the child
            )
        finally:
            logf.close()

    def log_tail(self, n: int = 15) -> str:
        with contextlib.suppress(OSError):
            lines = self.log_path.read_text(errors="replace").splitlines()
            return "\n".join(lines[-n:])
        return ""

    def stop(self, timeout: float = 5.0) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, timeout: float = START_TIMEOUT_S) -> Self:
        raise NotImplementedError

    def cleanup(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        et: type[BaseException] | None,
        e: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


class LocalJanus(_Process):
    """Janus on loopback, configured in a temporary folder.

    Usage: ``with LocalJanus() as j: j.url`` (``http://127.0.0.1:PORT/janus``). ``ws_url`` is
    set when ``websockets=True``.
    """

    def __init__(
        self,
        *,
        websockets: bool = False,
        http_port: int | None = None,
        debug_level: int = 3,
        session_timeout_s: int = 60,
        workdir: Path | None = None,
    ) -> None:
        binary = janus_binary()
        if binary is None:
            raise LocalServerError("the janus binary is not installed: apt-get install janus")
        self.binary = binary
        self.http_port = http_port or free_port()
        self.ws_port = free_port() if websockets else None
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="talkstream-janus-")
        self.dir = workdir or Path(self._tmp.name)  # type: ignore[union-attr]
        # A private RTP range per instance: instances side by side (tests) never collide.
        base = 20000 + (self.http_port % 400) * 100
        self.config = janus_config(
            self.dir / "conf",
            http_port=self.http_port,
            ws_port=self.ws_port,
            rtp_ports=(base, base + 99),
            debug_level=debug_level,
            session_timeout_s=session_timeout_s,
        )
        self.log_path = self.dir / "janus.log"
        self.url = f"http://127.0.0.1:{self.http_port}/janus"
        self.ice_address = local_ice_address()
        self.ws_url = f"ws://127.0.0.1:{self.ws_port}" if self.ws_port else None

    def start(self, timeout: float = START_TIMEOUT_S) -> LocalJanus:
        self._spawn(
            [self.binary, "-F", str(self.config.parent), "-C", str(self.config), "-o"],
            cwd=self.dir,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise LocalServerError(
                    f"janus exited at start (status {self.proc.returncode}): "
                    f"{self.log_tail(3).strip()}"
                )
            info = _get_json(self.url + "/info")
            if info and info.get("janus") == "server_info":
                plugins = info.get("plugins") or {}
                if "janus.plugin.videoroom" not in plugins:  # type: ignore[operator]
                    self.stop()
                    raise LocalServerError("janus started without its VideoRoom plugin")
                return self
            time.sleep(0.1)
        self.stop()
        raise LocalServerError(f"janus did not answer on {self.url} within {timeout:.0f} s")

    def stop(self, timeout: float = 5.0) -> None:
        super().stop(timeout)

    def cleanup(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def whip_server_dir() -> Path:
    return Path(os.environ.get(WHIP_SERVER_DIR_ENV) or DEFAULT_WHIP_SERVER_DIR)


def whip_server_missing() -> str | None:
    """Why simple-whip-server cannot run here, or None when it can."""
    if shutil.which("node") is None:
        return "node is not installed (apt-get install nodejs)"
    app = whip_server_dir()
    if not (app / "src" / "server.js").is_file():
        return f"simple-whip-server is not unpacked in {app}: run `make whip-server`"
    if not (app / "node_modules" / "express").is_dir():
        return f"simple-whip-server's npm dependencies are missing in {app}: run `make whip-server`"
    return None


class LocalWhipServer(_Process):
    """simple-whip-server (Debian's JavaScript, run with node) in front of a :class:`LocalJanus`.

    Its ``config.js`` is generated (the package's is a symlink into /etc); the REST API is at
    ``url`` (``http://127.0.0.1:PORT/whip``). :meth:`create_endpoint` is the server's own,
    non-standard call that maps an endpoint id to a VideoRoom room (and a token).
    """

    def __init__(self, janus: LocalJanus, *, port: int | None = None) -> None:
        why = whip_server_missing()
        if why:
            raise LocalServerError(why)
        if not janus.ws_url:
            raise LocalServerError(
                "simple-whip-server talks to Janus over WebSockets: "
                "start LocalJanus(websockets=True)"
            )
        self.janus = janus
        self.port = port or free_port()
        self._tmp = tempfile.TemporaryDirectory(prefix="talkstream-whip-")
        self.dir = Path(self._tmp.name)
        self.log_path = self.dir / "whip.log"
        self.url = f"http://127.0.0.1:{self.port}/whip"
        self.ice_servers: list[dict[str, str]] = []

    def _write_app(self) -> Path:
        """A private copy of the app whose config.js is ours (src/ is small; node_modules is
        linked)."""
        src_app = whip_server_dir()
        app = self.dir / "app"
        (app / "src").mkdir(parents=True)
        for f in ("server.js", "whip-janus.js"):
            shutil.copy(src_app / "src" / f, app / "src" / f)
        (app / "node_modules").symlink_to(src_app / "node_modules")
        if (src_app / "web").is_dir():
            (app / "web").symlink_to(src_app / "web")
        cfg = {
            "janus": {"address": self.janus.ws_url},
            "port": self.port,
            "rest": "/whip",
            "allowTrickle": True,
            "strictETags": False,
            "iceServers": self.ice_servers,
        }
        (app / "src" / "config.js").write_text("module.exports = " + json.dumps(cfg) + ";\n")
        return app

    def start(self, timeout: float = START_TIMEOUT_S) -> LocalWhipServer:
        node = shutil.which("node") or "node"
        app = self._write_app()
        env = dict(os.environ, NODE_ENV="production", DEBUG="whip:error,whip:warn,whip:info")
        self._spawn([node, "src/server.js"], cwd=app, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise LocalServerError(
                    f"simple-whip-server exited at start (status {self.proc.returncode}): "
                    f"{self.log_tail(3).strip()}"
                )
            # The REST API listens only after the server connected to Janus.
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(self.url + "/healthcheck", timeout=1.0) as r,
            ):
                if r.status == 200:
                    return self
            time.sleep(0.1)
        self.stop()
        raise LocalServerError(
            f"simple-whip-server did not answer on {self.url} in {timeout:.0f} s"
        )

    def create_endpoint(
        self,
        endpoint_id: str,
        room: int,
        *,
        token: str | None = None,
        ice_servers: list[dict[str, str]] | None = None,
    ) -> str:
        """Create endpoint ``endpoint_id`` publishing into ``room``; returns its WHIP URL."""
        body: dict[str, object] = {"id": endpoint_id, "room": room}
        if token:
            body["token"] = token
        if ice_servers is not None:
            body["iceServers"] = ice_servers
        req = urllib.request.Request(
            self.url + "/create",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=5.0) as r:
            if r.status != 200:
                raise LocalServerError(f"simple-whip-server refused the endpoint: {r.status}")
        return f"{self.url}/endpoint/{endpoint_id}"

    def cleanup(self) -> None:
        self.stop()
        self._tmp.cleanup()


__all__ = [
    "LocalJanus",
    "LocalServerError",
    "LocalWhipServer",
    "free_port",
    "janus_binary",
    "janus_config",
    "local_ice_address",
    "use_local_ice",
    "whip_server_missing",
]
