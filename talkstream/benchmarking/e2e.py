"""In-process end-to-end latency: audio sample into ``push_audio`` -> its frame ready.

A feeder thread pushes 20 ms chunks paced by a monotonic clock (real time, as a microphone
would), never waiting for the renderer; a worker thread renders frames as soon as they are due,
as the engine's inference worker does, then colour-converts and encodes them.

For frame ``t`` the audio sample that "moved its mouth" is taken to be the one at the frame's
presentation time, sample ``640 t`` (the sample that plays with the frame when audio and video
are in sync). Its latency splits into:

- ``audio_wait``: from that sample entering ``push_audio`` to the push that made frame ``t``
  computable: the algorithmic latency (lookahead + the motion token's future mel rows + half an
  STFT window), rounded up to whole 20 ms chunks. The configured ``lookahead_ms`` is shown as
  its own term, and ``algorithmic_ms`` (``Session.latency_s``) as the whole of it.
- ``compute``: from that push to the frame being ready (queueing behind earlier frames, motion,
  denoiser, paste-back).
- ``encode``: yuv420p conversion + VP8 encoding after the frame is ready, as ``serve`` sends it
  (``talkstream.benchmarking.encode``: the video track's conversion, aiortc's ``Vp8Encoder``).

``total`` = audio_wait + compute (frame ready); ``total_encoded`` adds encoding.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import torch

from talkstream.benchmarking.encode import VideoSender, serve_i420
from talkstream.benchmarking.runner import CHUNK_SAMPLES, SAMPLES_PER_FRAME, speech_pcm
from talkstream.benchmarking.timing import summarize
from talkstream.config import FPS, SAMPLE_RATE_HZ
from talkstream.engine.avatar import Avatar
from talkstream.engine.motion import rows_needed
from talkstream.engine.pipeline import Engine
from talkstream.kernels import reference_kernels

FRAME_MS = 1000 / FPS
CHUNK_S = CHUNK_SAMPLES / SAMPLE_RATE_HZ
# The first frames of a new session pay one-off costs (first windows, allocator growth):
# reported in the counts, left out of the percentiles.
WARMUP_FRAMES = 5


def run_e2e(
    engine: Engine,
    avatar: Avatar,
    *,
    seconds: float,
    encode: bool = True,
    seed: int = 0,
    lookahead: int | None = None,
    reference: bool = False,
) -> dict[str, Any]:
    """Stream ``seconds`` of speech in real time through one session; JSON-ready latencies."""
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    session = engine.session(avatar, seed=seed, lookahead=lookahead)
    st = session.streamer
    n_chunks = round(seconds / CHUNK_S)
    pcm = speech_pcm(n_chunks * CHUNK_SAMPLES)
    t_call = np.zeros(n_chunks)  # when each chunk's push_audio call began
    rows_after = np.zeros(n_chunks, dtype=np.int64)  # mel rows held after that push
    # Guards the streamer's row count against the worker taking windows at the same moment.
    lock = threading.Lock()
    wake = threading.Event()
    pushing_done = threading.Event()
    errors: list[BaseException] = []

    def feeder() -> None:
        try:
            t0 = time.perf_counter() + 0.05
            for k in range(n_chunks):
                due = t0 + k * CHUNK_S
                delay = due - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                chunk = pcm[k * CHUNK_SAMPLES : (k + 1) * CHUNK_SAMPLES]
                with lock:
                    t_call[k] = time.perf_counter()
                    session.push_audio(chunk, SAMPLE_RATE_HZ)
                    rows_after[k] = st.rows_received
                wake.set()
        except BaseException as e:  # reported by the caller, with its traceback
            errors.append(e)
        finally:
            pushing_done.set()
            wake.set()

    t_ready: dict[int, float] = {}
    t_encoded: dict[int, float] = {}
    enc = VideoSender(FPS) if encode else None
    thread = threading.Thread(target=feeder, name="bench-feeder", daemon=True)
    with torch.inference_mode(), reference_kernels(reference):
        thread.start()
        while True:
            wake.wait(0.1)
            wake.clear()
            with lock:
                items = session.take_ready()  # see runner.take_ready
            if not items:
                if pushing_done.is_set():
                    with lock:
                        if not session.has_ready():
                            break
                continue
            frames = session.compose(items, engine.render(items))  # render, paste
            now = time.perf_counter()
            for fr in frames:
                t_ready[fr.pts] = now
            if enc is not None:
                for fr in frames:
                    enc.send(serve_i420(fr.image), fr.pts)  # converted on the frame's device
                    t_encoded[fr.pts] = time.perf_counter()
    thread.join()
    if errors:
        raise errors[0]
    la = session.lookahead
    cfg = st.cfg
    total, wait, compute, enc_s, total_enc = [], [], [], [], []
    for t in sorted(t_ready):
        if t < WARMUP_FRAMES:
            continue
        k0 = (t * SAMPLES_PER_FRAME) // CHUNK_SAMPLES
        need = rows_needed(t, cfg, la)
        k1 = int(np.searchsorted(rows_after, need))  # first push after which the frame is due
        if k0 >= n_chunks or k1 >= n_chunks:
            continue
        total.append(t_ready[t] - t_call[k0])
        wait.append(t_call[k1] - t_call[k0])
        compute.append(t_ready[t] - t_call[k1])
        if t in t_encoded:
            enc_s.append(t_encoded[t] - t_ready[t])
            total_enc.append(t_encoded[t] - t_call[k0])
    if not total:
        raise ValueError(f"{seconds} s of audio gave no measurable frame; stream for longer")
    q = max(len(compute) // 4, 1)
    result: dict[str, Any] = {
        "seconds": seconds,
        "chunk_ms": CHUNK_S * 1e3,
        "frames": len(t_ready),
        "frames_measured": len(total),
        "warmup_frames": WARMUP_FRAMES,
        "lookahead_frames": la,
        "lookahead_ms": la * FRAME_MS,
        "algorithmic_ms": session.latency_s * 1e3,
        "total": summarize(total).to_dict(),
        "audio_wait": summarize(wait).to_dict(),
        "compute": summarize(compute).to_dict(),
        # Growing compute latency over the stream means the renderer fell behind real time.
        "compute_trend_ms": float(np.median(compute[-q:]) - np.median(compute[:q])) * 1e3,
        "samples_ms": {"total": [round(x * 1e3, 3) for x in total]},
    }
    if enc_s:
        result["encode"] = summarize(enc_s).to_dict()
        result["total_encoded"] = summarize(total_enc).to_dict()
    return result
