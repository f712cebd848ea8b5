"""A 12 MP photo in `talkstream serve` and `talkstream render`: framing "call" against "full".

    python benchmarks/experiments/framing_12mp.py [--backend auto] [--frames-call 40]
        [--frames-full 6] [--render-seconds 2] [--out bench-out/framing_12mp.json]

The photo: scikit-image's astronaut enlarged to 3000x3000 (bicubic) and padded to 4000x3000 by
repeating its edges, saved as a JPEG (quality 92), so the path a user's phone photo takes is
measured: decode, detection (on a copy of at most 1024 px), framing, alignment.

For each framing (``call``: a 640x480 frame cut around the face; ``full``: the whole photo, the
behaviour before framing):

- ``prep``: ``load_avatar_source`` + ``prepare_avatar_source`` (decode, detect, check, frame,
  crop, mask), no cache;
- ``serve``: what `talkstream serve` does per displayed frame of one stream, one frame at a
  time: the engine's frame (motion, denoiser, paste-back into the frame), RGB -> yuv420p
  (PyAV, as ``streaming.tracks``), then aiortc's own encoder for the viewer: VP8 (what Chromium
  negotiates first) and, apart, H.264. fps = 1000 / median of (engine + yuv + VP8) per frame;
- ``render``: `talkstream render`'s ``render_to_file`` on the bundled sentence's first
  ``--render-seconds`` seconds (libx264 veryfast, crf 20): frames / wall seconds.

Prints a Markdown table and writes the raw samples as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from av import VideoFrame
from PIL import Image

from talkstream.config import AvatarConfig, Config, EngineConfig, RenderConfig
from talkstream.engine.avatar import default_image, load_avatar_source, prepare_avatar_source
from talkstream.engine.pipeline import Engine
from talkstream.engine.render import default_audio_path, render_to_file
from talkstream.runtime import load_engine


def make_photo(path: Path) -> None:
    big = Image.fromarray(default_image()).resize((3000, 3000), Image.Resampling.BICUBIC)
    arr = np.pad(np.asarray(big), ((0, 0), (500, 500), (0, 0)), mode="edge")  # (3000, 4000, 3)
    Image.fromarray(arr).save(path, quality=92)


def _ms(xs: list[float]) -> float:
    return round(1000.0 * statistics.median(xs), 2)


def _video_frame(yuv: np.ndarray, index: int) -> VideoFrame:
    vf = VideoFrame.from_ndarray(yuv, format="yuv420p")
    vf.pts = index * 3600  # 25 fps on the 90 kHz RTP clock, as streaming.tracks
    vf.time_base = Fraction(1, 90_000)
    return vf


def serve_frames(engine: Engine, avatar: Any, n: int, warmup: int) -> dict[str, list[float]]:
    """Per-frame times (s) of the serve path, one frame per engine call."""
    from aiortc.codecs.h264 import H264Encoder
    from aiortc.codecs.vpx import Vp8Encoder

    speech, rate = sf.read(default_audio_path(), dtype="float32")
    reps = int(np.ceil((n + warmup + 10) * 640 / len(speech)))
    session = engine.session(avatar)
    session.max_batch = 1
    session.push_audio(np.tile(speech, reps), rate)
    session.end_audio()
    vp8, h264 = Vp8Encoder(), H264Encoder()
    h, w = avatar.image.shape[:2]
    h, w = h - h % 2, w - w % 2
    out: dict[str, list[float]] = {"engine": [], "yuv": [], "vp8": [], "h264": []}
    for i in range(n + warmup):
        t0 = time.perf_counter()
        (frame,) = session.render_ready()
        t1 = time.perf_counter()
        rgb = VideoFrame.from_ndarray(np.ascontiguousarray(frame.image[:h, :w]), format="rgb24")
        yuv = rgb.reformat(format="yuv420p").to_ndarray()
        t2 = time.perf_counter()
        vp8.encode(_video_frame(yuv, i), force_keyframe=i == 0)
        t3 = time.perf_counter()
        h264.encode(_video_frame(yuv, i), force_keyframe=i == 0)
        t4 = time.perf_counter()
        if i >= warmup:
            for k, v in zip(out, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                out[k].append(v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="auto", help="engine backend (serve's default: auto)")
    ap.add_argument("--frames-call", type=int, default=40)
    ap.add_argument("--frames-full", type=int, default=6)
    ap.add_argument("--render-seconds", type=float, default=2.0)
    ap.add_argument("--out", type=Path, default=Path("bench-out/framing_12mp.json"))
    a = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="framing12mp-"))
    photo = tmp / "phone.jpg"
    make_photo(photo)
    speech, rate = sf.read(default_audio_path(), dtype="float32")
    clip = tmp / "clip.wav"
    sf.write(clip, speech[: int(a.render_seconds * rate)], rate)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "talkstream"
    engine = load_engine(EngineConfig(backend=a.backend, avatar=AvatarConfig(cache_dir=cache)))
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_avg_start": os.getloadavg(),
        "backend": engine.backend.name,
        "photo": f"{photo.stat().st_size} bytes JPEG, 4000x3000",
        "framings": {},
    }
    for framing, n in (("call", a.frames_call), ("full", a.frames_full)):
        acfg = AvatarConfig(framing=framing, crop_size=engine.crop_size)
        t0 = time.perf_counter()
        source = load_avatar_source(photo, None, acfg)
        avatar = prepare_avatar_source(source, acfg)
        prep_s = time.perf_counter() - t0
        engine.encode_avatar(avatar)
        times = serve_frames(engine, avatar, n, warmup=2)
        per_frame = [
            e + y + v for e, y, v in zip(times["engine"], times["yuv"], times["vp8"], strict=True)
        ]
        rcfg = Config(
            engine=EngineConfig(backend=a.backend, avatar=AvatarConfig(framing=framing)),
            render=RenderConfig(
                out=tmp / f"{framing}.mp4", image=photo, audio=clip, progress=False
            ),
        )
        res = render_to_file(rcfg, engine=engine)
        h, w = avatar.image.shape[:2]
        results["framings"][framing] = {
            "frame": f"{w}x{h}",
            "prep_s": round(prep_s, 2),
            "frames_measured": n,
            "engine_ms": _ms(times["engine"]),
            "yuv_ms": _ms(times["yuv"]),
            "vp8_ms": _ms(times["vp8"]),
            "h264_ms": _ms(times["h264"]),
            "serve_frame_ms": _ms(per_frame),
            "serve_fps": round(1.0 / statistics.median(per_frame), 1),
            "render_frames": res.frames,
            "render_fps": round(res.fps, 1),
            "raw_s": times,
        }
    results["load_avg_end"] = os.getloadavg()
    engine.close()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=1))
    print(f"backend {results['backend']}, load average {results['load_avg_start']}")
    print("| framing | frame | prep | engine | yuv | VP8 | H.264 | serve fps (VP8) | render fps |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k, r in results["framings"].items():
        print(
            f"| {k} | {r['frame']} | {r['prep_s']} s | {r['engine_ms']} ms | {r['yuv_ms']} ms | "
            f"{r['vp8_ms']} ms | {r['h264_ms']} ms | {r['serve_fps']} | {r['render_fps']} |"
        )


if __name__ == "__main__":
    main()
