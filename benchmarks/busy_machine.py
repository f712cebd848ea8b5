"""Render and serve throughput on an idle machine and beside busy processes (issue 14).

    python benchmarks/busy_machine.py                      # render: idle vs 2 busy loops
    python benchmarks/busy_machine.py --serve              # also serve: fps a session gets
    python benchmarks/busy_machine.py --variants default,threads2,old --rounds 3

A "busy loop" is ``python -c 'while 1: pass'``: one process that never sleeps, as a browser tab
or a compiler would be. ``--busy 2`` (default) starts two, so on a 2-core machine every core
has one more runnable process than the render.

Render: ``talkstream render`` of a short clip in a subprocess, per variant (thread count and
OpenMP / onnxruntime spinning settings), idle and loaded; the figure is the command's own
"rendered in ... (N fps)" (model loading excluded). Serve: ``talkstream serve`` on a free port
with one WebRTC client (``benchmarks/stream_clients.py``, a process of its own); the figure is
the session's ``display_fps`` (fresh frames shown per second, repeats not counted) from
``/sessions/ID/stats`` at the end of the run, and the frames the engine rendered per second.

Each run is short (``--seconds`` of audio, default 4 s): the point is the ratio loaded/idle, and
on a shared machine ``uptime`` before and after is printed with the figures. The target is
``render`` on a loaded machine at most 3x slower than idle (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parent.parent

# name -> (extra render/serve flags, extra environment). "default" is what a user gets with no
# flags; the others pin what the defaults choose between.
VARIANTS: dict[str, tuple[list[str], dict[str, str]]] = {
    "default": ([], {}),
    "threads1": (["--threads", "1"], {}),
    "threads2": (["--threads", "2"], {}),
    # The behaviour before issue 14: torch's thread count (2 on 2 cores) and OpenMP's default
    # of spinning at barriers (talkstream sets OMP_WAIT_POLICY=PASSIVE only while torch is not
    # loaded yet: OLD_ENTRY loads it first).
    "old": (["--threads", "2"], {}),
    "spin": (["--threads", "2"], {"OMP_WAIT_POLICY": "ACTIVE"}),
}


ENTRY = ["-m", "talkstream.cli"]
OLD_ENTRY = ["-c", "import sys, torch; from talkstream.cli import main; sys.exit(main())"]


def _entry(variant: str) -> list[str]:
    return OLD_ENTRY if variant == "old" else ENTRY


def _speech(path: Path, seconds: float) -> None:
    t = np.arange(int(16000 * seconds)) / 16000
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t)
    sf.write(path, (0.3 * env * np.sin(2 * np.pi * 180 * t)).astype(np.float32), 16000)


@contextlib.contextmanager
def busy_loops(n: int) -> Iterator[None]:
    procs = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(n)]
    try:
        time.sleep(0.5)  # let the scheduler see them
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    env.update(extra)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def render_fps(variant: str, audio: Path, out_dir: Path, backend: str) -> dict[str, object]:
    flags, extra = VARIANTS[variant]
    out = out_dir / f"{variant}.mp4"
    cmd = [
        sys.executable, *_entry(variant), "render", "--audio", str(audio),
        "--out", str(out), "--no-progress", "--backend", backend, *flags,
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(extra), timeout=600)
    wall = time.perf_counter() - t0
    m = re.search(r"\(([\d.]+) fps\)", proc.stdout)
    if proc.returncode != 0 or m is None:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:], "wall_s": wall}
    hints = [ln for ln in proc.stderr.splitlines() if "other processes" in ln]
    return {"fps": float(m.group(1)), "wall_s": round(wall, 1), "hint": hints[:1]}


def serve_fps(variant: str, seconds: float, backend: str) -> dict[str, object]:
    flags, extra = VARIANTS[variant]
    cmd = [
        sys.executable, *_entry(variant), "serve", "--port", "0", "--ice-loopback-only",
        "--backend", backend, *flags,
    ]  # fmt: skip
    server = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(extra)
    )
    try:
        url = None
        assert server.stdout is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = server.stdout.readline()
            if not line:
                break
            m = re.search(r"(http://\S+/)", line)
            if m:
                url = m.group(1)
                break
        if url is None:
            return {"error": "the server did not start"}
        client = subprocess.Popen(
            [sys.executable, str(REPO / "benchmarks" / "stream_clients.py"), url, "1",
             str(seconds)],
            stdout=subprocess.PIPE, text=True, env=_env({}),
        )  # fmt: skip
        assert client.stdout is not None
        ids = json.loads(client.stdout.readline())["ids"]
        time.sleep(max(1.0, seconds - 1.0))
        with urllib.request.urlopen(f"{url}sessions/{ids[0]}/stats", timeout=10) as r:
            stats = json.loads(r.read())
        received = json.loads(client.stdout.readline())["fps"]
        client.wait(timeout=30)
        return {
            "display_fps": round(float(stats.get("display_fps", 0.0)), 1),
            "rendered_per_s": round(stats.get("frames_rendered", 0) / seconds, 1),
            "received_fps": received[0],
        }
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def _median_fps(runs: list[dict[str, object]]) -> float | None:
    fps = [float(r["fps"]) for r in runs if "fps" in r]  # type: ignore[arg-type]
    return round(float(np.median(fps)), 1) if fps else None


def _uptime() -> str:
    return "load average {:.2f}, {:.2f}, {:.2f}".format(*os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variants", default="default,threads2,old")
    p.add_argument("--seconds", type=float, default=4.0, help="audio per render run (4)")
    p.add_argument("--busy", type=int, default=2, help="busy loops in the loaded runs (2)")
    p.add_argument("--rounds", type=int, default=1, help="rounds of every variant (medians)")
    p.add_argument("--backend", default="torch", help="render backend (torch)")
    p.add_argument("--serve", action="store_true", help="also measure serve")
    p.add_argument("--serve-seconds", type=float, default=15.0)
    p.add_argument("--serve-backend", default="auto")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    a = p.parse_args()
    variants = a.variants.split(",")
    results: dict[str, object] = {"cpus": os.cpu_count(), "load_before": _uptime()}
    print(f"{os.cpu_count()} CPUs; {_uptime()}", flush=True)
    with tempfile.TemporaryDirectory() as d:
        audio = Path(d) / "speech.wav"
        _speech(audio, a.seconds)
        # Variants alternate within each round, idle then loaded: on a shared machine the
        # background load drifts, and paired runs see the same drift.
        runs: dict[str, dict[str, list[dict[str, object]]]] = {
            v: {"idle": [], "loaded": []} for v in variants
        }
        for r in range(a.rounds):
            for v in variants:
                runs[v]["idle"].append(render_fps(v, audio, Path(d), a.backend))
            with busy_loops(a.busy):
                for v in variants:
                    runs[v]["loaded"].append(render_fps(v, audio, Path(d), a.backend))
            print(
                f"round {r + 1}: "
                + "; ".join(
                    f"{v} idle {runs[v]['idle'][-1].get('fps')} loaded "
                    f"{runs[v]['loaded'][-1].get('fps')}"
                    for v in variants
                )
                + f" ({_uptime()})",
                flush=True,
            )
        rows = []
        for v in variants:
            med = {k: _median_fps(runs[v][k]) for k in ("idle", "loaded")}
            ratio = med["idle"] / med["loaded"] if med["idle"] and med["loaded"] else None
            hints = [h for run in runs[v]["loaded"] for h in run.get("hint") or []]  # type: ignore[attr-defined]
            rows.append({"variant": v, **runs[v], "median_fps": med, "slowdown": ratio})
            print(
                f"render {v:9s} median idle {med['idle']} fps, {a.busy} busy loops "
                f"{med['loaded']} fps"
                + (f" ({ratio:.1f}x slower)" if ratio else "")
                + (f"; hint: {hints[0]}" if hints else ""),
                flush=True,
            )
        results["render"] = rows
        if a.serve:
            srows = []
            for v in variants:
                idle_s = serve_fps(v, a.serve_seconds, a.serve_backend)
                with busy_loops(a.busy):
                    loaded_s = serve_fps(v, a.serve_seconds, a.serve_backend)
                srows.append({"variant": v, "idle": idle_s, "loaded": loaded_s})
                print(f"serve  {v:9s} idle {idle_s}, {a.busy} busy loops {loaded_s}", flush=True)
            results["serve"] = srows
    results["load_after"] = _uptime()
    print(_uptime())
    if a.json:
        a.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
