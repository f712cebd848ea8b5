"""The browser benchmark's outputs: ``browser.json`` and the Markdown table ``browser.md``."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def write_outputs(result: dict[str, Any], out_dir: Path) -> None:
    """``browser.json`` and ``browser.md`` in ``out_dir``."""
    (out_dir / "browser.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / "browser.md").write_text(render_markdown(result))


# ----------------------------------------------------------------------------- Markdown


def _v(x: Any, digits: int = 0, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}{unit}"
    return f"{x}{unit}"


def _pair(a: Any, b: Any, digits: int = 0, unit: str = "") -> str:
    return f"{_v(a, digits)} / {_v(b, digits)}{unit}"


def _rows(rows: Sequence[tuple[str, str]], header: tuple[str, str]) -> list[str]:
    return [f"| {header[0]} | {header[1]} |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]


def render_markdown(result: dict[str, Any]) -> str:
    """The result as a Markdown section: the client's view, then the server's split."""
    lat, fps, fr, cl = result["latency"], result["fps"], result["frames"], result["client"]
    mic = result["mic"]
    mm, mv = lat.get("mic_to_mouth_ms") or {}, lat.get("mic_to_voice_ms") or {}
    av = lat.get("av_offset_ms") or {}
    chrome = result["browser"]["user_agent"].split("Chrome/")[-1].split()[0]
    ms = " ms"
    rows = [
        ("connect (Start to connected)", _v(result["connect_ms"], 0, ms)),
        ("first frame (Start to first frame)", _v(result["first_frame_ms"], 0, ms)),
        (
            "presented fps, mean / worst 5 s",
            _pair(fps["presented_mean"], fps["presented_worst_5s"], 1),
        ),
        ("decoded fps, mean / worst 5 s", _pair(fps["decoded_mean"], fps["decoded_worst_5s"], 1)),
        ("received fps", _v(fps["received_mean"], 1)),
        ("**mic-to-mouth p50 / p90**", f"**{_pair(mm.get('p50'), mm.get('p90'), 0, ms)}**"),
        ("speech bursts matched (mouth)", f"{lat['matched']} of {lat['bursts_at_mic']}"),
        ("mic-to-voice p50 / p90", _pair(mv.get("p50"), mv.get("p90"), 0, ms)),
        ("mouth onset minus voice onset, p50", _v(av.get("p50"), 0, ms)),
        (
            "frames presented / decoded / received",
            f"{fr['presented']} / {_v(fr.get('decoded'))} / {_v(fr.get('received'))}",
        ),
        ("frames dropped by the decoder", _v(fr.get("dropped_by_decoder"))),
        (
            f"freezes (gaps > {_v(fr.get('freeze_threshold_ms'), 0, ms)}), total",
            f"{_v(fr.get('freezes'))}, {_v(fr.get('frozen_s'), 2, ' s')}",
        ),
        ("longest gap between frames", _v(fr.get("longest_gap_ms"), 0, ms)),
        (
            "packets lost / NACKs / PLIs",
            f"{_v(fr.get('packets_lost'))} / {_v(fr.get('nacks'))} / {_v(fr.get('plis'))}",
        ),
        (
            "RTT / video jitter buffer / decode",
            f"{_v(cl.get('rtt_ms'), 1)} / {_v(cl.get('video_jitter_buffer_ms'), 1)} / "
            f"{_v(cl.get('decode_ms'), 1)} ms",
        ),
    ]
    lines = [
        f"## Browser glass-to-glass: {result['url']}",
        "",
        f"{_who(result)}; {result['created']}; load average {result['load_avg']}.",
        f"Headless Chromium {chrome}, fake microphone looping {Path(mic['path']).name} "
        f"({mic['loop_s']:g} s, {len(mic['onsets_in_loop_s'])} speech bursts per loop); "
        f"{result['duration_s']:g} s measured from the first frame.",
        "",
        *_rows(rows, ("measure", "value")),
        "",
    ]
    ss = result.get("server_side")
    if ss:
        b = ss.get("budget_ms", {})
        st = ss.get("stats") or {}
        lead = ss.get("motion_onset_vs_speech_ms") or {}
        mapped = ss.get("mapped_bursts") or {}
        receiver = _sum(cl.get("video_jitter_buffer_ms"), cl.get("decode_ms"))
        terms = [
            ("lookahead (algorithmic)", _v(b.get("algorithmic"), 0)),
            ("input jitter budget", _v(b.get("jitter"), 0)),
            (
                f"compute budget (render measured: {_v(st.get('render_ms'), 1, ms)})",
                _v(b.get("compute"), 0),
            ),
            ("network (RTT / 2)", _v(ss.get("network_half_rtt_ms"), 1)),
            ("receiver jitter buffer + decode", _v(receiver, 0)),
            (
                "unaccounted (encode, audio capture and send, pacing)",
                _v(ss.get("unaccounted_ms"), 0),
            ),
            (
                "**= mic capture of an instant to display of its frame**",
                _v(ss.get("mic_to_frame_ms"), 0),
            ),
            ("model's motion onset vs speech onset, p50 (- = early)", _v(lead.get("p50"), 0)),
        ]
        lines += [
            "Server side (its trace on the media timeline, and its stats):",
            "",
            *_rows(terms, ("term", "ms")),
            "",
            f"Server frames rendered / skipped / repeated: {_v(st.get('frames_rendered'))} / "
            f"{_v(st.get('frames_skipped'))} / {_v(st.get('frames_repeated'))}; fresh fps "
            f"{_v(st.get('display_fps'), 1)}; bursts mapped to the server's timeline, "
            f"mic / video: {_v(mapped.get('mic'))} / {_v(mapped.get('video'))}.",
            "",
        ]
    for note in result.get("notes", []):
        lines.append(f"- note: {note}")
    return "\n".join(lines).rstrip() + "\n"


def _who(result: dict[str, Any]) -> str:
    """What served the session, in words."""
    local, srv = result.get("local_server"), result.get("server")
    if local:
        gain = local.get("landmark_gain")
        weights = f", random weights (landmark gain {gain:g})" if local["random_weights"] else ""
        return f"talkstream {local['preset']}{weights}, served in this process, idle motion off"
    if srv:
        weights = ", random weights" if srv.get("random_weights") else ""
        return f"talkstream {srv.get('preset')}{weights}"
    return "server"


def _sum(*xs: Any) -> float | None:
    if any(x is None for x in xs):
        return None
    return float(sum(xs))
