"""Outputs for people and tools: a JSON file, a Markdown report, PNG plots, a short summary.

The JSON holds everything (scenario definitions, warm-up, per-stage percentiles, the raw
samples, memory, machine); the Markdown is derived from it alone, so a stored JSON can be
re-rendered later (``render_markdown(json.load(...))``).
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SCHEMA = "talkstream-bench/1"
# The issue-3 target: tiny on the CPU, motion + one denoiser step + paste-back, one frame.
TARGET_CORE_MS = 25.0


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on (load average included: machines may be shared)."""
    import av
    import numpy as np
    import torch

    info: dict[str, Any] = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "av": av.__version__,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
        "cuda": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["cuda"] = {
            "device": torch.cuda.get_device_name(0),
            "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
            "cuda_runtime": torch.version.cuda,
        }
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(o: object) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()  # numpy scalars
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# -- Markdown ----------------------------------------------------------------------------------


def _f(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def backend_ran(r: dict[str, Any]) -> str:
    """The backend a scenario's result ran on (``auto`` resolved), or "-"."""
    return str(r.get("backend_name") or r.get("scenario", {}).get("backend") or "-")


def is_target_scenario(sc: dict[str, Any]) -> bool:
    """Issue 3's target configuration: tiny, 128 px, CPU, fp32, 1 step, one frame; on the
    backend ``serve`` picks (``auto``) or one named (the verdict line says which ran)."""
    return (
        sc["preset"] == "tiny"
        and sc["resolution"] in (None, 128)
        and sc["device"] == "cpu"
        and sc["dtype"] == "float32"
        and sc["steps"] == 1
        and sc["batch"] == 1
        and sc["sessions"] == 1
    )


def render_markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"# talkstream bench ({result['created']})", ""]
    gpu = m.get("cuda")
    lines.append(
        f"Machine: {m['cpu']} ({m['cpu_count']} CPUs, torch threads {m['torch_threads']})"
        + (f", GPU {gpu['device']} ({gpu['memory_gib']} GiB)" if gpu else ", no GPU")
        + f"; torch {m['torch']}, Python {m['python']}."
    )
    lines.append(
        f"Load average at start {m['load_avg_start']}, at end {m.get('load_avg_end', '-')} "
        "(a load above the CPU count means other work shared the machine)."
    )
    lines.append(f"Command: `{result['command']}`")
    lines.append("")
    scenarios = result.get("scenarios", [])
    if scenarios:
        lines += _scenario_section(scenarios)
    if result.get("e2e"):
        lines += _e2e_section(result["e2e"])
    if result.get("throughput"):
        lines += _throughput_section(result["throughput"])
    if result.get("anchors"):
        lines += _anchors_section(result["anchors"])
    if result.get("render_memory"):
        lines += _memory_section(result["render_memory"])
    if result.get("browser"):
        lines += [
            "## Browser glass-to-glass",
            "",
            "```",
            json.dumps(result["browser"], indent=1),
            "```",
            "",
        ]
    return "\n".join(lines).rstrip() + "\n"


def _scenario_section(scenarios: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## Scenarios",
        "",
        "Milliseconds per iteration (one iteration = the due frames of "
        "every session, `sessions x batch` frames, in one denoiser call).",
        "",
    ]
    rows = []
    for r in scenarios:
        if r["status"] != "ok":
            rows.append([r["name"], "-", f"{r['status']} (below)"] + ["-"] * 6)
            continue
        d, mem = r["derived"], r["memory"]
        dev = mem.get("device_peak_allocated_mib")
        rows.append(
            [
                r["name"],
                backend_ran(r),
                str(r["frames_per_iteration"]),
                _f(d["core"]["p50"]),
                _f(d["frame"]["p50"]),
                _f(d["frame"]["p99"]),
                _f(r["fps"], 1),
                _f(mem["host_peak_mib"], 0) + ("" if mem["host_peak_scope"] == "scenario" else "*"),
                _f(dev, 0) if dev is not None else "-",
            ]
        )
    lines += _table(
        [
            "scenario",
            "backend (ran)",
            "frames/iter",
            "core p50",
            "frame p50",
            "frame p99",
            "fps",
            "host peak MiB",
            "GPU peak MiB",
        ],
        rows,
    )
    not_run = [r for r in scenarios if r["status"] != "ok"]
    if not_run:
        # One line each: a reason may carry a multi-line library message.
        lines.append("")
        lines += [f"- {r['status']} {r['name']}: {' '.join(r['reason'].split())}" for r in not_run]
    lines += [
        "",
        "core = `Engine.render` (motion + denoiser) + `Session.compose` (paste-back); frame = "
        "everything from audio in to the VP8 packet `serve` sends; fps counts every session's "
        "frames.",
        "",
    ]
    for r in scenarios:
        if r["status"] != "ok":
            continue
        lines += _scenario_detail(r)
    target = [r for r in scenarios if r["status"] == "ok" and is_target_scenario(r["scenario"])]
    if target:
        p50 = target[0]["derived"]["core"]["p50"]
        verdict = "met" if p50 <= TARGET_CORE_MS else "not met"
        lines += [
            f"**Issue-3 target** (tiny, CPU, fp32, motion + 1 denoiser step + paste-back, "
            f"one frame; backend {backend_ran(target[0])}): median {p50:.2f} ms against "
            f"<= {TARGET_CORE_MS:.0f} ms: {verdict}.",
            "",
        ]
    return lines


def _scenario_detail(r: dict[str, Any]) -> list[str]:
    w = r["warmup"]
    load = ""
    if w.get("model_load_s") is not None:
        load = (
            f"model load {w['model_load_s']:.3f} s, engine + backend load "
            f"{w['backend_load_s']:.3f} s, "
        )
    lines = [
        f"### {r['name']}",
        "",
        f"Backend: {r.get('backend', '-')}"
        + (" (whole sampler loop in one call)" if r.get("sampler_fused") else "")
        + f"; weights: {r['weights']}; timing: {r['timing']}; "
        f"{r['derived']['frame']['n']} measured iterations.",
        "",
        f"Warm-up (excluded): {load}avatar prep {w['avatar_prepare_s']:.3f} s, reference "
        f"encoding {w['reference_encode_s']:.3f} s, first iteration "
        f"{w['first_iteration_ms']:.1f} ms, then {w['warmup_iterations']} warm-up iterations "
        f"(mean {_f(w['warmup_mean_ms'], 1)} ms).",
        "",
    ]
    rows = []
    for name in r["stage_order"]:
        s = r["stages"][name]
        rows.append([name, _f(s["p50"]), _f(s["p90"]), _f(s["p99"]), _f(s["mean"])])
    labels = {
        "core": "**core** (render + post)",
        "send": "send (i420 + vp8)",
        "frame": "**frame** (whole iteration, audio in to VP8 packet out)",
        "unattributed": "unattributed (frame - stages)",
    }
    for key, label in labels.items():
        s = r["derived"].get(key)
        if s:
            rows.append([label, _f(s["p50"]), _f(s["p90"]), _f(s["p99"]), _f(s["mean"])])
    lines += _table(["stage", "p50 ms", "p90 ms", "p99 ms", "mean ms"], rows)
    lines += [
        "",
        f"fps {r['fps']:.1f} ({r['fps_per_session']:.1f} per session, real time needs 25); "
        f"host peak {r['memory']['host_peak_mib']:.0f} MiB ({r['memory']['host_peak_scope']})"
        + (
            f", GPU peak {r['memory']['device_peak_allocated_mib']:.0f} MiB allocated"
            if "device_peak_allocated_mib" in r["memory"]
            else ""
        )
        + ".",
        "",
    ]
    return lines


def _e2e_section(e: dict[str, Any]) -> list[str]:
    lines = [
        "## End-to-end latency (in process)",
        "",
        f"{e['seconds']:.1f} s of speech pushed in {e['chunk_ms']:.0f} ms chunks against the "
        f"clock; {e['frames_measured']} frames measured (first {e['warmup_frames']} left out). "
        "From the audio sample at a frame's presentation time entering `push_audio` to that "
        "frame being ready.",
        "",
    ]
    rows = [
        [
            "lookahead (configured, part of the algorithmic latency)",
            _f(e["lookahead_ms"], 1),
            "",
            "",
        ],
        ["algorithmic (lookahead + mel context + STFT)", _f(e["algorithmic_ms"], 1), "", ""],
    ]
    for key, label in (
        ("audio_wait", "audio wait (measured: algorithmic, in whole chunks)"),
        ("compute", "compute (push that made it due -> frame ready)"),
        ("total", "**total** (sample in -> frame ready)"),
        ("encode", "encode (i420 + VP8, as serve sends)"),
        ("total_encoded", "**total + encode**"),
    ):
        s = e.get(key)
        if s:
            rows.append([label, _f(s["p50"], 1), _f(s["p90"], 1), _f(s["p99"], 1)])
    lines += _table(["term", "p50 ms", "p90 ms", "p99 ms"], rows)
    lines += [
        "",
        f"Compute latency drift over the stream: {e['compute_trend_ms']:+.1f} ms (last quarter "
        "minus first; a steady rise means the renderer fell behind real time).",
        "",
    ]
    return lines


def _throughput_section(t: dict[str, Any]) -> list[str]:
    lines = [
        "## Throughput (concurrent 25 fps sessions, batched)",
        "",
        "Tick = one `Engine.render` of the due frames of all sessions and each session's "
        "`compose` (paste-back), the inference worker's share (40 ms of audio went into each "
        f"session first, by the producers, not charged). Budget {t['budget_ms']:.0f} ms per "
        "tick at p90. The paced confirmation runs the sessions against the clock with a "
        "producer thread; a frame not ready within "
        f"{_confirm_deadline(t)} ms of its audio arriving counts as dropped. `sustained` is "
        "the headline's criterion: a session count is sustained when a paced run of it (or of "
        "more sessions) dropped nothing.",
        "",
    ]
    rows = [
        [
            str(p["sessions"]),
            _f(p["tick"]["p50"]),
            _f(p["tick"]["p90"]),
            _f(p["capacity_fps"], 1),
            _f(float(p["demand_fps"]), 0),
            "yes" if p["fits_budget"] else "no",
            sustained_verdict(t, p["sessions"]),
        ]
        for p in t["probes"]
    ]
    lines += _table(
        [
            "sessions",
            "tick p50 ms",
            "tick p90 ms",
            "capacity fps",
            "needed fps",
            "worker alone fits",
            "sustained",
        ],
        rows,
    )
    lines += ["", throughput_headline(t), ""]
    return lines


def sustained_verdict(t: dict[str, Any], n: int) -> str:
    """The table's ``sustained`` cell for ``n`` sessions: "yes" exactly when ``n`` is at most
    the headline's sessions per device, so a row never says more fit than the headline."""
    if n <= t["sessions_per_device"]:
        return "yes"
    runs = [c for c in t.get("confirmations", []) if c["sessions"] == n]
    if runs:
        c = runs[-1]
        return f"no ({c['frames_dropped']} dropped, {c['frames_late']} late)"
    return "no (not confirmed)" if n <= t.get("predicted_sessions", 0) else "no"


def throughput_headline(t: dict[str, Any]) -> str:
    """The sentence under the throughput table, with the sessions-per-device figure.

    The headline figure is the table's last ``sustained: yes`` (what held against the clock);
    what the inference worker fits alone (``worker alone fits``, unpaced) is named beside it
    when it is more, with the paced runs that fell short.
    """
    confirmed, predicted = t["sessions_per_device"], t["predicted_sessions"]
    conf = "; ".join(
        f"{c['sessions']} sessions for {c['seconds']:.1f} s: {c['frames_dropped']} dropped, "
        f"{c['frames_late']} late"
        for c in t["confirmations"]
    )
    paced = f" Paced confirmation: {conf}." if conf else ""
    if confirmed >= predicted:
        return (
            f"**Sessions per device: {confirmed}** ({t['fps']} fps in all), sustained against "
            "the clock in this process; the inference worker alone (unpaced search) fits "
            f"{predicted}.{paced}"
        )
    return (
        f"**Sessions per device: {confirmed}** ({t['fps']} fps in all), sustained against the "
        f"clock; the inference worker alone fits {predicted} (`worker alone fits`), but in the "
        "paced run some frames missed their deadline once the audio producers and the rest of "
        "the machine shared the CPU (see the load average above): the worker's figure is what "
        f"the model allows, the sustained one what this machine delivered now.{paced}"
    )


def _confirm_deadline(t: dict[str, Any]) -> str:
    for c in t.get("confirmations", []):
        if "deadline_ms" in c:
            return f"{c['deadline_ms']:.0f}"
    return "80"


def _anchors_section(a: dict[str, Any]) -> list[str]:
    lines = [
        "## Anchors (same machine, same run)",
        "",
        f"Per-frame network work, batch 1, {a['device']} {a['dtype']}, {a['iters']} timed "
        "iterations each (random weights; architectures as published).",
        "",
    ]
    rows = []
    for e in a["entries"]:
        if e.get("status") != "ok":
            rows.append([e["name"], "-", "-", "skipped: " + e.get("reason", ""), "-"])
            continue
        rows.append(
            [
                e["name"],
                str(e["size"]),
                _f(e["params_m"], 1),
                _f(e["time"]["p50"], 1),
                _f(e["time"]["p90"], 1),
            ]
        )
    lines += _table(["model", "output px", "params M", "p50 ms", "p90 ms"], rows)
    lines.append("")
    if a["ratios"]:
        lines += _table(
            ["output px", "anchor", "ours", "anchor / ours"],
            [[str(r["size"]), r["anchor"], r["ours"], f"{r['ratio']:.1f}x"] for r in a["ratios"]],
        )
        lines.append("")
    return lines


def _memory_section(m: dict[str, Any]) -> list[str]:
    lines = ["## `talkstream render` peak memory against clip length", ""]
    rows = [
        [
            f"{c['clip_s']:.0f} s",
            str(c.get("returncode")),
            _f(c.get("max_rss_mib"), 1),
            _f(c.get("wall_s"), 1),
        ]
        for c in m["runs"]
    ]
    lines += _table(["clip", "exit", "peak RSS MiB", "wall s"], rows)
    if m.get("growth_mib") is not None:
        lines += [
            "",
            f"Growth from the shortest to the longest clip: {m['growth_mib']:+.1f} MiB "
            f"({m['growth_ratio']:.3f}x): {'flat' if m['flat'] else 'NOT flat'}.",
        ]
    lines.append("")
    return lines


# -- plots -------------------------------------------------------------------------------------


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def write_plots(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """PNG plots: latency distribution per stage (one per scenario), fps against sessions,
    end-to-end latency. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # no display; also keeps a GUI backend out of a headless run
    import matplotlib.pyplot as plt

    written: list[Path] = []
    for r in result.get("scenarios", []):
        if r["status"] != "ok":
            continue
        samples = r["samples_ms"]
        names = [n for n in (*r["stage_order"], "core") if n in samples]
        data = [samples[n] for n in names]
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.6))
        ax.boxplot(data, orientation="horizontal", whis=(1, 99), showfliers=True)
        ax.set_yticks(range(1, len(names) + 1), names)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("ms per iteration (log scale; whiskers p1-p99)")
        ax.set_title(f"{r['name']}: latency per stage ({len(data[0])} iterations)", fontsize=9)
        ax.grid(axis="x", which="both", alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"latency-{_safe(r['name'])}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    t = result.get("throughput")
    if t and t["probes"]:
        xs = [p["sessions"] for p in t["probes"]]
        cap = [p["capacity_fps"] for p in t["probes"]]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(xs, cap, "o-", label="capacity (unpaced, frames/s)")
        ax.plot(xs, [25 * x for x in xs], "--", label="needed: 25 fps x sessions")
        if t["sessions_per_device"]:
            ax.axvline(
                t["sessions_per_device"],
                color="g",
                alpha=0.5,
                label=f"sustained: {t['sessions_per_device']} sessions",
            )
        if max(xs) >= 8 * min(xs):
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])  # the probed counts, whatever the scale
        ax.minorticks_off()
        ax.set_xlabel("concurrent sessions (frames batched into one call)")
        ax.set_ylabel("frames per second")
        ax.set_title("fps against concurrent sessions", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / "throughput.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    e = result.get("e2e")
    if e and e.get("samples_ms", {}).get("total"):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.hist(e["samples_ms"]["total"], bins=30)
        ax.axvline(e["algorithmic_ms"], color="r", alpha=0.6, label="algorithmic latency")
        ax.set_xlabel("audio sample in -> frame ready (ms)")
        ax.set_ylabel("frames")
        ax.set_title("end-to-end latency", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / "e2e.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


# -- summary of several runs -------------------------------------------------------------------


def summarize_dir(root: Path) -> str:
    """A short table over every ``bench.json`` under ``root`` (the GPU suite's last output)."""
    files = sorted(root.rglob("bench.json"))
    if not files:
        return f"no bench.json under {root}\n"
    rows = []
    for f in files:
        try:
            r = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            rows.append([str(f.parent.relative_to(root)), f"unreadable: {e}", "", "", "", ""])
            continue
        run = str(f.parent.relative_to(root)) or "."
        for s in r.get("scenarios", []):
            if s["status"] != "ok":
                rows.append([run, s["name"], s["status"], "", "", s.get("reason", "")[:60]])
                continue
            rows.append(
                [
                    run,
                    s["name"],
                    _f(s["derived"]["core"]["p50"]),
                    _f(s["derived"]["frame"]["p50"]),
                    _f(s["fps"], 1),
                    "",
                ]
            )
        t = r.get("throughput")
        if t:
            rows.append(
                [
                    run,
                    "throughput",
                    "",
                    "",
                    _f(float(t["fps"]), 0),
                    f"{t['sessions_per_device']} sessions/device"
                    + (
                        f" ({t['predicted_sessions']} by the worker alone)"
                        if t["sessions_per_device"] < t.get("predicted_sessions", 0)
                        else ""
                    ),
                ]
            )
        lat = r.get("e2e")
        if lat:
            rows.append([run, "e2e latency", "", "", "", f"total p50 {lat['total']['p50']:.1f} ms"])
        for a in (r.get("anchors") or {}).get("ratios", []):
            rows.append(
                [
                    run,
                    f"vs {a['anchor'].split(' ')[0]} @{a['size']}",
                    "",
                    "",
                    "",
                    f"{a['ratio']:.1f}x ({a['ours']})",
                ]
            )
    return (
        "\n".join(_table(["run", "what", "core p50 ms", "frame p50 ms", "fps", "note"], rows))
        + "\n"
    )
