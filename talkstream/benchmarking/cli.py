"""``talkstream bench``: latency, throughput and anchor baselines, as JSON, Markdown and PNG.

Registered by ``talkstream.cli`` through :func:`add_parser`. Importing this module is cheap
(argparse only); torch, PyAV, matplotlib and diffusers are imported when the command runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import logging
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from talkstream.config import Config
from talkstream.errors import TalkstreamError

log = logging.getLogger("talkstream.bench")

DEFAULT_OUT = Path("bench-out")
# ``--browser URL``: the glass-to-glass harness, talkstream.benchmarking.browser (its result is
# stored under "browser" in bench.json); its default session length in seconds.
BROWSER_DURATION_S = 20.0

NOISY_LOGGERS = ("onnx_ir", "onnxscript")
# Defaults of the full run and of --quick (a smoke run for tests and CI, seconds long).
NORMAL = {
    "iters": 50,
    "warmup": 5,
    "sessions": "1,4",
    "e2e_seconds": 4.0,
    "ticks": 8,
    "confirm_seconds": 2.0,
    "max_sessions": 64,
    "anchor_iters": 3,
}
QUICK = {
    "iters": 6,
    "warmup": 2,
    "sessions": "1,2",
    "e2e_seconds": 0.8,
    "ticks": 3,
    "confirm_seconds": 0.4,
    "max_sessions": 2,
    "anchor_iters": 1,
}

EPILOG = """\
outputs (under --out, default ./bench-out): bench.json (everything, raw samples included),
bench.md (the tables printed at the end), latency-<scenario>.png, throughput.png, e2e.png.

examples:
  talkstream bench                                  default: tiny on the CPU, < 2 min
  talkstream bench --quick                          smoke run, seconds
  talkstream bench --anchors                        + MuseTalk- and Wav2Lip-equivalents
  talkstream bench --memory                         + render peak RSS, 10 s vs 60 s clip
  talkstream bench --device cuda --preset base --dtype bfloat16 --sessions 1,8,32
  talkstream bench --backend torch,compiled --skip-unavailable
  talkstream bench --scenario-file my_scenarios.json
  talkstream bench --summarize bench-out            short table of every bench.json below
  talkstream bench --browser http://host:8080       glass-to-glass in headless Chromium
  talkstream bench --browser local --duration 30    ... against a server started here
"""


def add_parser(
    sub: Any,
    add_engine_args: Callable[[argparse.ArgumentParser], None],
    engine_config: Callable[[argparse.Namespace], Any],
) -> None:
    """Register ``bench`` on the ``talkstream`` subcommands (argparse only; nothing heavy)."""
    p = sub.add_parser(
        "bench",
        help="measure latency, throughput and memory; compare with anchor models",
        description="Benchmark the engine: per-stage latency (p50/p90/p99) with warm-up "
        "reported apart, fps, peak memory, end-to-end latency with real-time audio, "
        "concurrent sessions per device, and (with --anchors) MuseTalk- and "
        "Wav2Lip-equivalent baselines timed in the same run.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    g = p.add_argument_group("scenarios")
    g.add_argument(
        "--backend",
        default="auto",
        help="backends for motion + denoiser, comma-separated, side by side: torch (eager), "
        "compiled, onnxruntime, tensorrt, auto (default auto: the one `serve` picks here, "
        "named in the report)",
    )
    g.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="face crop side in pixels (multiple of 16); default: the preset's",
    )
    g.add_argument("--batch", type=int, default=1, help="frames per session per call (1)")
    g.add_argument(
        "--sessions",
        default=None,
        help=f"concurrent sessions per scenario, comma-separated (default {NORMAL['sessions']})",
    )
    g.add_argument(
        "--kernels",
        choices=["ops", "reference", "both"],
        default="ops",
        help="custom ops (fused kernels where available), the plain torch references, or both "
        "side by side (default ops)",
    )
    g.add_argument(
        "--frame-size",
        default=None,
        metavar="WxH",
        help="output frame size, e.g. 1280x720 (default: the 512x512 photo)",
    )
    g.add_argument(
        "--no-encode",
        action="store_true",
        help="skip the yuv420p conversion and the VP8 encode (what serve sends)",
    )
    g.add_argument(
        "--iters", type=int, default=None, help=f"measured iterations ({NORMAL['iters']})"
    )
    g.add_argument(
        "--warmup", type=int, default=None, help=f"warm-up iterations ({NORMAL['warmup']})"
    )
    g.add_argument(
        "--scenario-file",
        type=Path,
        default=None,
        help="JSON list of scenario objects (fields of talkstream.benchmarking.scenario."
        "Scenario); replaces the scenarios built from the flags (--iters and --warmup, when "
        "given, still apply)",
    )
    g.add_argument(
        "--skip-unavailable",
        action="store_true",
        help="record scenarios whose backend cannot run here as skipped instead of failing",
    )
    g.add_argument(
        "--keep-going",
        action="store_true",
        help="record a scenario that fails as failed (with its error) and go on to the next; "
        "the exit status is then 1",
    )
    g = p.add_argument_group("what else to measure")
    g.add_argument(
        "--e2e-seconds",
        type=float,
        default=None,
        help=f"seconds of real-time audio for the end-to-end latency ({NORMAL['e2e_seconds']:g};"
        " 0 skips it)",
    )
    g.add_argument("--no-throughput", action="store_true", help="skip the sessions search")
    g.add_argument(
        "--max-sessions",
        type=int,
        default=None,
        help=f"largest session count the throughput search tries ({NORMAL['max_sessions']})",
    )
    g.add_argument(
        "--confirm-seconds",
        type=float,
        default=None,
        help="seconds of each paced confirmation run of the throughput search "
        f"({NORMAL['confirm_seconds']:g})",
    )
    g.add_argument(
        "--anchors",
        action="store_true",
        help="also time the MuseTalk-equivalent (needs diffusers) and the Wav2Lip-equivalent "
        "against ours at the same output sizes (slow on a CPU: about a minute)",
    )
    g.add_argument(
        "--anchor-iters",
        type=int,
        default=None,
        help=f"timed iterations per anchor model ({NORMAL['anchor_iters']})",
    )
    g.add_argument(
        "--memory",
        action="store_true",
        help="also measure the peak RSS of `talkstream render` on short and long clips "
        "(subprocesses; minutes on a CPU)",
    )
    g.add_argument(
        "--memory-clips",
        default="10,60",
        help="clip lengths in seconds for --memory, comma-separated (10,60)",
    )
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder ({DEFAULT_OUT})")
    g.add_argument("--no-plots", action="store_true", help="no PNG plots (no matplotlib needed)")
    g.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run of everything in seconds (few iterations; numbers are rough)",
    )
    g.add_argument(
        "--summarize",
        type=Path,
        default=None,
        metavar="DIR",
        help="print a short table of every bench.json under DIR and exit",
    )
    g = p.add_argument_group("browser glass-to-glass (runs only this)")
    g.add_argument(
        "--browser",
        default=None,
        metavar="URL",
        help="headless Chromium with a fake microphone against the talkstream server at URL: "
        "mic-to-mouth latency and received fps; 'local' starts a server here with the model "
        "flags (needs playwright and chromium)",
    )
    g.add_argument(
        "--duration",
        type=float,
        default=BROWSER_DURATION_S,
        metavar="S",
        help=f"seconds measured from the first frame ({BROWSER_DURATION_S:g})",
    )
    g.add_argument(
        "--speech-wav",
        type=Path,
        default=None,
        help="the fake microphone's loop: speech bursts separated by silence "
        "(default: espeak-ng phrases)",
    )
    add_engine_args(p)
    p.set_defaults(func=lambda ns: run_bench(ns, engine_config), browser=None)


# -- the command -------------------------------------------------------------------------------


def _opt(ns: argparse.Namespace, key: str) -> Any:
    value = getattr(ns, key, None)
    if value is not None:
        return value
    return (QUICK if ns.quick else NORMAL)[key]


def parse_int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise TalkstreamError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise TalkstreamError(f"{what} must be positive integers, got {text!r}")
    return values


def parse_frame_size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise TalkstreamError(f"--frame-size must look like 1280x720, got {text!r}")
    return int(parts[0]), int(parts[1])


def _measure_counts(ns: argparse.Namespace, d: Any) -> Any:
    """A file scenario's iteration counts: an explicit --iters/--warmup wins, then the file's,
    then the run's defaults (--quick's or the normal ones)."""
    if not isinstance(d, dict):
        return d  # Scenario.from_dict says what is wrong with it
    out = dict(d)
    for key in ("iters", "warmup"):
        if getattr(ns, key) is not None or key not in out:
            out[key] = _opt(ns, key)
    return out


def build_scenarios(ns: argparse.Namespace) -> list[Any]:
    """The scenarios the flags (or ``--scenario-file``) ask for."""
    from talkstream.benchmarking.scenario import Scenario

    if ns.scenario_file is not None:
        try:
            data = json.loads(Path(ns.scenario_file).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise TalkstreamError(f"cannot read scenario file {ns.scenario_file}: {e}") from None
        if isinstance(data, dict):
            data = data.get("scenarios")
        if not isinstance(data, list) or not data:
            raise TalkstreamError(
                f"{ns.scenario_file} must hold a non-empty JSON list of scenario objects "
                '(or {"scenarios": [...]})'
            )
        try:
            return [Scenario.from_dict(_measure_counts(ns, d)) for d in data]
        except (TypeError, ValueError) as e:
            raise TalkstreamError(f"{ns.scenario_file}: {e}") from None
    backends = [b.strip() for b in ns.backend.split(",") if b.strip()]
    sessions = parse_int_list(_opt(ns, "sessions"), "--sessions")
    kernels = ["ops", "reference"] if ns.kernels == "both" else [ns.kernels]
    out = []
    try:
        for backend in backends:
            for k in kernels:
                for n in sessions:
                    out.append(
                        Scenario(
                            preset=ns.preset,
                            backend=backend,
                            resolution=ns.resolution,
                            steps=ns.steps,
                            batch=ns.batch,
                            sessions=n,
                            device=ns.device,
                            dtype=ns.dtype,
                            kernels=k,
                            frame_size=parse_frame_size(ns.frame_size),
                            encode=not ns.no_encode,
                            iters=_opt(ns, "iters"),
                            warmup=_opt(ns, "warmup"),
                            seed=ns.seed,
                            lookahead=ns.lookahead,
                        )
                    )
    except (TypeError, ValueError) as e:
        raise TalkstreamError(str(e)) from None
    return out


def engine_cli_args(ns: argparse.Namespace) -> list[str]:
    """The model flags again, for ``talkstream render`` children (``--memory``)."""
    args = [
        "--preset",
        ns.preset,
        "--device",
        ns.device,
        "--dtype",
        ns.dtype,
        "--steps",
        str(ns.steps),
        "--seed",
        str(ns.seed),
    ]
    # The first backend asked for (render takes one).
    args += ["--backend", ns.backend.split(",")[0].strip() or "auto"]
    if ns.threads is not None:
        args += ["--threads", str(ns.threads)]
    if ns.checkpoint is not None:
        args += ["--checkpoint", str(ns.checkpoint)]
    if ns.lookahead is not None:
        args += ["--lookahead", str(ns.lookahead)]
    if ns.no_idle:
        args.append("--no-idle")
    for item in getattr(ns, "set", []):
        if item.split(".", 1)[0].strip() == "engine":
            args += ["--set", item]
    return args


def _command_line() -> str:
    argv = sys.argv
    if "bench" in argv:
        return "talkstream " + " ".join(shlex.quote(a) for a in argv[argv.index("bench") :])
    return "talkstream bench (called in-process; see options)"


def _options(ns: argparse.Namespace) -> dict[str, Any]:
    """The parsed flags, JSON-ready: with ``command``, exactly what was asked for."""
    out: dict[str, Any] = {}
    for key, value in sorted(vars(ns).items()):
        if callable(value):
            continue
        out[key] = str(value) if isinstance(value, Path) else value
    return out


def run_bench(ns: argparse.Namespace, engine_config: Callable[[argparse.Namespace], Any]) -> int:
    """Handler of ``talkstream bench``."""
    from talkstream.benchmarking.report import summarize_dir

    if ns.summarize is not None:
        sys.stdout.write(summarize_dir(ns.summarize))
        return 0
    plots_ok = ns.no_plots or importlib.util.find_spec("matplotlib") is not None
    if not plots_ok:
        log.warning(
            "matplotlib is not installed: no PNG plots this run (the tables and JSON are "
            "complete). Install it with: pip install 'talkstream[bench]'"
        )
    if ns.anchors and importlib.util.find_spec("diffusers") is None:
        log.warning(
            "diffusers is not installed: the MuseTalk-equivalent anchor will be skipped "
            "(pip install 'talkstream[bench]')"
        )
    # Validate every flag before loading anything: a typo fails in milliseconds.
    scenarios = build_scenarios(ns)
    for key in ("iters", "warmup", "max_sessions", "anchor_iters"):
        if _opt(ns, key) < (0 if key == "warmup" else 1):
            raise TalkstreamError(f"--{key.replace('_', '-')} must be positive")
    clips = [float(c) for c in parse_int_list(ns.memory_clips, "--memory-clips")]

    import os

    import torch

    from talkstream.benchmarking import report

    if not getattr(ns, "verbose", False):
        # The ONNX exporter's passes log every rewrite at INFO: hundreds of lines per backend
        # build that would bury the benchmark's own progress.
        for name in NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    # The config tree, built once: the shared engine section (each scenario overrides the
    # fields it names) and the bench section, the scenarios.
    root = Config(engine=engine_config(ns), bench=tuple(scenarios))
    root = root.with_command_overrides(getattr(ns, "set", []), "bench")
    base, scenarios = root.engine, list(root.bench)
    if base.threads is not None:
        torch.set_num_threads(base.threads)
    out_dir: Path = ns.out
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "schema": report.SCHEMA,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": _command_line(),
        "options": _options(ns),
        "machine": report.machine_info(),
        "scenarios": [],
    }

    def save() -> None:
        # After every part: a run cut short (a time limit, Ctrl-C) keeps what it measured.
        result["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
        report.write_json(result, out_dir / "bench.json")

    if getattr(ns, "browser", None):
        return _run_browser(ns, base, result, save)
    _run_local(ns, base, scenarios, clips, result, save)
    save()
    md = report.render_markdown(result)
    (out_dir / "bench.md").write_text(md)
    plots = report.write_plots(result, out_dir) if plots_ok and not ns.no_plots else []
    sys.stdout.write("\n" + md)
    print(
        f"\nwrote {out_dir / 'bench.json'}, {out_dir / 'bench.md'}"
        + (f" and {len(plots)} plots" if plots else "")
        + ("" if plots_ok else " (no plots: matplotlib is not installed)")
    )
    failed = [r["name"] for r in result["scenarios"] if r["status"] == "failed"]
    if failed:
        print(f"talkstream bench: {len(failed)} scenario(s) failed: {', '.join(failed)}")
        return 1
    return 0


def _run_local(
    ns: argparse.Namespace,
    base: Any,
    scenarios: list[Any],
    clips: list[float],
    result: dict[str, Any],
    save: Callable[[], None],
) -> None:
    from talkstream.benchmarking import runner

    for sc in scenarios:
        log.info("scenario %s: %d warm-up + %d iterations", sc.name, sc.warmup, sc.iters)
        try:
            r = runner.run_scenario(sc, base)
        except runner.BackendUnavailable as e:
            if not ns.skip_unavailable:
                raise
            log.warning("scenario %s skipped: %s", sc.name, e)
            r = runner.skipped(sc, str(e))
        except Exception as e:
            if not ns.keep_going:
                raise
            # Logged with its traceback, recorded as failed, and the exit status says so.
            log.exception("scenario %s failed", sc.name)
            r = runner.skipped(sc, f"{type(e).__name__}: {e}", status="failed")
        result["scenarios"].append(r)
        save()
        if r["status"] == "ok":
            log.info(
                "  core p50 %.2f ms, frame p50 %.2f ms, %.1f fps",
                r["derived"]["core"]["p50"],
                r["derived"]["frame"]["p50"],
                r["fps"],
            )
    ran = [sc for sc, r in zip(scenarios, result["scenarios"], strict=True) if r["status"] == "ok"]
    e2e_s = float(_opt(ns, "e2e_seconds"))
    if ran and (e2e_s > 0 or not ns.no_throughput):
        _run_streaming(ns, base, ran[0], e2e_s, result, save)
    if ns.anchors:
        from talkstream.benchmarking.anchors import run_anchors

        ref = ran[0] if ran else scenarios[0]
        runner.check_device(ref.device)
        iters = _opt(ns, "anchor_iters")
        log.info("anchors on %s %s (%d iterations each)", ref.device, ref.dtype, iters)
        result["anchors"] = run_anchors(
            device=ref.device, dtype=ref.dtype, steps=ref.steps, iters=iters
        )
        save()
    if ns.memory:
        from talkstream.benchmarking.render_memory import run_render_memory

        log.info("render peak memory on %s s clips", ", ".join(f"{c:g}" for c in clips))
        result["render_memory"] = run_render_memory(
            clips, engine_cli_args(ns), ns.out / "render-memory"
        )
        save()


def _run_streaming(
    ns: argparse.Namespace,
    base: Any,
    main: Any,
    e2e_s: float,
    result: dict[str, Any],
    save: Callable[[], None],
) -> None:
    """End-to-end latency and throughput on the first scenario's engine and backend."""
    import dataclasses

    from talkstream.benchmarking import runner
    from talkstream.benchmarking.e2e import run_e2e
    from talkstream.benchmarking.throughput import run_throughput

    sc = dataclasses.replace(main, sessions=1, batch=1, name="")
    handle = runner.build_engine(sc, base)
    engine = handle.engine
    reference = sc.kernels == "reference"
    try:
        avatar = runner.prepare_bench_avatar(engine, sc.frame_size)
        engine.encode_avatar(avatar)
        if e2e_s > 0:
            log.info("end-to-end latency: %.1f s of audio in real time", e2e_s)
            e2e = run_e2e(
                engine,
                avatar,
                seconds=e2e_s,
                encode=sc.encode,
                seed=sc.seed,
                lookahead=sc.lookahead,
                reference=reference,
            )
            result["e2e"] = {"scenario": sc.name, **e2e}
            save()
        if not ns.no_throughput:
            log.info("throughput: sessions search up to %d", _opt(ns, "max_sessions"))
            thr = run_throughput(
                engine,
                avatar,
                max_sessions=_opt(ns, "max_sessions"),
                ticks=_opt(ns, "ticks"),
                confirm_seconds=_opt(ns, "confirm_seconds"),
                seed=sc.seed,
                lookahead=sc.lookahead,
                reference=reference,
            )
            result["throughput"] = {"scenario": sc.name, **thr}
            save()
    finally:
        engine.close()


def _run_browser(
    ns: argparse.Namespace, base: Any, result: dict[str, Any], save: Callable[[], None]
) -> int:
    """``--browser URL``: the glass-to-glass harness alone; prints its table."""
    from talkstream.benchmarking.browser import render_markdown, run_browser_bench

    out_dir: Path = ns.out
    if not getattr(ns, "verbose", False):
        # ICE logs every candidate-pair check at INFO (a local server runs in this process).
        for name in ("aioice", "aiortc"):
            logging.getLogger(name).setLevel(logging.WARNING)
    log.info("browser glass-to-glass against %s for %g s", ns.browser, ns.duration)
    result["browser"] = run_browser_bench(
        ns.browser,
        out_dir,
        duration_s=ns.duration,
        speech_wav=ns.speech_wav,
        # A local server runs the first backend asked for.
        engine_config=dataclasses.replace(base, backend=ns.backend.split(",")[0].strip() or "auto"),
    )
    save()
    sys.stdout.write("\n" + render_markdown(result["browser"]))
    print(
        f"\nwrote {out_dir / 'bench.json'}, {out_dir / 'browser.json'}, "
        f"{out_dir / 'browser.md'} and {out_dir / 'browser-raw.json'}"
    )
    return 0
