"""The GPU paths in one process: the GPU post stage, and the batched and compiled paths at
batch 1, 8 and 32 (the engine's coalescing limit). Part of ``benchmarks/gpu_suite.sh``.

    python benchmarks/gpu_paths.py --out DIR [--device cuda] [--preset tiny]
        [--batches 1,8,32] [--backends torch,compiled,tensorrt] [--iters 10] [--deadline-s 150]

Parts (each writes its result into DIR/gpu_paths.json as soon as it ends, so a time limit that
cuts the run short keeps what finished; a part that needs CUDA on a machine without it records
"skipped: no CUDA"):

- ``post``: ``Engine.render`` on the GPU returns CUDA crops; ``Compositor`` pastes them on the
  GPU through CuPy (when installed) and through torch, and ``compose.i420_host`` converts the
  frame there and copies only the planes to the host. Checked: the frames stay on the device
  until the I420 copy, and each GPU path's frame equals the host path's (numpy paste-back of the
  same crops) within 1 grey level. Timed per frame: paste, paste + I420-to-host, against the host
  path (copy the crop, numpy paste, swscale) on the same crops.
- ``batched/<backend>``: N sessions, each with its next frame due, rendered in one
  ``Engine.render`` and composed by each session (the engine worker's share of a tick), at every
  batch size: the first call at a size (compilation, CUDA-graph capture, TensorRT profile
  selection) apart from the steady calls; per call and per frame. For ``compiled``: whether a
  repeated size or one inside the same power-of-two bucket compiled again (torch._dynamo's
  graph counter). ``tensorrt`` must take batch 32 (its profile reaches the coalescing limit).

On the CPU (``--device cpu``, to test the script) the torch backend runs the batched part;
``post``, ``compiled`` and ``tensorrt`` are CUDA-only here and report "skipped: no CUDA".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from talkstream.benchmarking.encode import serve_i420
from talkstream.benchmarking.runner import (
    BackendUnavailable,
    check_backend,
    compose_all,
    prepare_bench_avatar,
    take_ready,
)
from talkstream.benchmarking.throughput import SessionPool
from talkstream.benchmarking.timing import summarize
from talkstream.config import FPS, EngineConfig
from talkstream.errors import TalkstreamError
from talkstream.runtime import load_engine

CUDA_ONLY = {"compiled", "tensorrt"}  # here: on the CPU they say nothing about the GPU suite


class Run:
    """The results so far, written to ``gpu_paths.json`` after every part."""

    def __init__(self, out: Path, deadline_s: float) -> None:
        self.out = out
        self.t_end = time.perf_counter() + deadline_s
        self.parts: dict[str, Any] = {}
        out.mkdir(parents=True, exist_ok=True)

    def left_s(self) -> float:
        return self.t_end - time.perf_counter()

    def record(self, name: str, result: dict[str, Any]) -> None:
        self.parts[name] = result
        status = result.get("status", "ok")
        print(f"{name}: {status}", flush=True)
        (self.out / "gpu_paths.json").write_text(json.dumps(self.parts, indent=1) + "\n")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ms(samples_s: list[float]) -> dict[str, Any]:
    return summarize(samples_s).to_dict()


# -- post ----------------------------------------------------------------------------------------


def part_post(args: argparse.Namespace, run: Run) -> dict[str, Any]:
    if not args.device.startswith("cuda"):
        return {"status": "skipped: no CUDA"}
    from talkstream.engine.compose import Compositor, i420_host
    from talkstream.engine.pipeline import Faces

    cfg = EngineConfig(preset=args.preset, device=args.device, dtype=args.dtype, backend="torch")
    engine = load_engine(cfg)
    try:
        dev = engine.device
        avatar = prepare_bench_avatar(engine, args.frame_size)
        n = 8
        pool = SessionPool(engine, avatar, seconds_per_session=2 * (args.iters + 4) / FPS + 2)
        feeders = pool.get(n)
        items = take_ready(feeders)
        with torch.inference_mode():
            faces = engine.render(items)
        sync(dev)
        crops = faces.crops
        result: dict[str, Any] = {
            "frames": n,
            "frame": [int(avatar.image.shape[1]), int(avatar.image.shape[0])],
            "crops_on_device": isinstance(crops, torch.Tensor) and crops.device.type == "cuda",
        }
        host_crops = crops.cpu().numpy() if isinstance(crops, torch.Tensor) else crops
        host = Compositor(avatar).frames(items, Faces(host_crops, faces.landmarks))
        ref = np.stack([f.image for f in host]).astype(np.int16)
        paths = ["torch"]
        try:
            import cupy  # noqa: F401

            paths.insert(0, "cupy")
        except ImportError:
            result["cupy"] = "not installed: only the torch GPU path runs"
        for path in paths:
            comp = Compositor(avatar, gpu=path)  # type: ignore[arg-type]
            frames = comp.frames(items, faces)
            sync(dev)
            on_dev = all(isinstance(f.image, torch.Tensor) and f.on_device for f in frames)
            got = np.stack([f.to_host() for f in frames]).astype(np.int16)
            paste_s, send_s = [], []
            for _ in range(args.iters):
                for i in range(n):
                    sync(dev)
                    t0 = time.perf_counter()
                    image = comp.paste(faces.crops[i])
                    sync(dev)
                    t1 = time.perf_counter()
                    h, w = image.shape[0] - image.shape[0] % 2, image.shape[1] - image.shape[1] % 2
                    i420_host(image[:h, :w], gpu=path)  # type: ignore[arg-type]
                    t2 = time.perf_counter()
                    paste_s.append(t1 - t0)
                    send_s.append(t2 - t0)
            result[path] = {
                "frames_stay_on_device": on_dev,
                "max_abs_diff_vs_host": int(np.abs(got - ref).max()),
                "paste_ms": ms(paste_s),
                "paste_to_i420_host_ms": ms(send_s),
            }
        host_comp = Compositor(avatar)
        paste_s, send_s = [], []
        for _ in range(args.iters):
            for i in range(n):
                sync(dev)
                t0 = time.perf_counter()
                crop = faces.crops[i].cpu().numpy() if isinstance(crops, torch.Tensor) else crops[i]
                image = host_comp.paste(crop)
                t1 = time.perf_counter()
                serve_i420(image)
                t2 = time.perf_counter()
                paste_s.append(t1 - t0)
                send_s.append(t2 - t0)
        result["host"] = {"paste_ms": ms(paste_s), "paste_to_i420_ms": ms(send_s)}
        ok = result["crops_on_device"] and all(
            result[p]["frames_stay_on_device"] and result[p]["max_abs_diff_vs_host"] <= 1
            for p in paths
        )
        result["status"] = "ok" if ok else "FAILED: a GPU frame left the device or differs"
        return result
    finally:
        engine.close()


# -- batched / compiled ----------------------------------------------------------------------------


def dynamo_graphs() -> int:
    """Graphs torch.compile has compiled so far in this process."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"].get("unique_graphs", 0))
    except Exception:  # private API: absent or renamed in another torch
        return -1


def part_batched(args: argparse.Namespace, run: Run, backend: str) -> dict[str, Any]:
    if backend in CUDA_ONLY and not args.device.startswith("cuda"):
        return {"status": "skipped: no CUDA"}
    dtype = args.dtype
    if backend == "tensorrt" and dtype == "bfloat16":
        dtype = "float16"
    try:
        check_backend(backend, args.device, dtype)
    except BackendUnavailable as e:
        return {"status": f"skipped: {e}"}
    batches = args.batches
    cfg = EngineConfig(
        preset=args.preset,
        device=args.device,
        dtype=dtype,
        backend=backend,
        max_batch_frames=max(batches),
    )
    t0 = time.perf_counter()
    engine = load_engine(cfg)
    result: dict[str, Any] = {
        "backend": engine.backend.describe(),
        "dtype": dtype,
        "load_s": round(time.perf_counter() - t0, 2),
        "batches": {},
    }
    try:
        dev = engine.device
        avatar = prepare_bench_avatar(engine, args.frame_size)
        # Every call takes one frame of each of the first N sessions.
        calls = len(batches) * (args.iters + 2) + 4
        pool = SessionPool(engine, avatar, seconds_per_session=calls / FPS + 2)

        def call(n: int) -> tuple[float, float]:
            feeders = pool.get(n)
            for f in feeders:
                f.feed(1)
            items = take_ready(feeders)
            assert len(items) == n, (len(items), n)
            sync(dev)
            t0 = time.perf_counter()
            faces = engine.render(items)
            sync(dev)
            t1 = time.perf_counter()
            compose_all(feeders, items, faces)
            sync(dev)
            return t1 - t0, time.perf_counter() - t0

        with torch.inference_mode():
            for n in batches:
                if run.left_s() < 5:
                    result["batches"][str(n)] = {"status": "skipped: out of time"}
                    continue
                g0 = dynamo_graphs()
                first_render, first_tick = call(n)
                g1 = dynamo_graphs()
                render_s, tick_s = [], []
                for _ in range(args.iters):
                    if run.left_s() < 2:
                        break
                    r, t = call(n)
                    render_s.append(r)
                    tick_s.append(t)
                g2 = dynamo_graphs()
                entry: dict[str, Any] = {
                    "first_call_ms": round(first_tick * 1e3, 2),
                    "first_render_ms": round(first_render * 1e3, 2),
                }
                if render_s:
                    entry.update(
                        render_ms=ms(render_s),
                        tick_ms=ms(tick_s),
                        render_ms_per_frame=round(float(np.median(render_s)) * 1e3 / n, 3),
                        fps_worker_alone=round(n / float(np.median(tick_s)), 1),
                    )
                if backend == "compiled" and g0 >= 0:
                    entry["graphs_compiled_first_call"] = g1 - g0
                    entry["graphs_compiled_steady"] = g2 - g1  # must be 0: no recompiles
                result["batches"][str(n)] = entry
                print(f"  {backend} batch {n}: {json.dumps(entry)[:200]}", flush=True)
            if backend == "compiled" and run.left_s() > 10 and 8 in batches:
                # 7 pads to the bucket of 8: a size inside a compiled bucket must not recompile.
                g0 = dynamo_graphs()
                call(7)
                result["recompiled_for_7_after_8"] = dynamo_graphs() - g0
        steady = [e for e in result["batches"].values() if "graphs_compiled_steady" in e]
        recompiles = any(e["graphs_compiled_steady"] > 0 for e in steady) or (
            result.get("recompiled_for_7_after_8", 0) > 0
        )
        done = all("render_ms" in e for e in result["batches"].values())
        result["status"] = (
            "FAILED: compiled recompiles for a size it has seen"
            if recompiles
            else ("ok" if done else "partial: out of time")
        )
        return result
    finally:
        engine.close()


# -- main ------------------------------------------------------------------------------------------


def markdown(parts: dict[str, Any]) -> str:
    lines = ["## GPU paths (benchmarks/gpu_paths.py)", ""]
    post = parts.get("post", {})
    lines.append(f"- post: {post.get('status')}")
    for path in ("cupy", "torch", "host"):
        p = post.get(path)
        if isinstance(p, dict):
            paste = p.get("paste_ms", {}).get("p50")
            send = (p.get("paste_to_i420_host_ms") or p.get("paste_to_i420_ms") or {}).get("p50")
            extra = ""
            if "max_abs_diff_vs_host" in p:
                extra = (
                    f", on device {p['frames_stay_on_device']}, "
                    f"max diff vs host {p['max_abs_diff_vs_host']}"
                )
            lines.append(f"  - {path}: paste p50 {paste} ms, paste + I420 p50 {send} ms{extra}")
    lines += ["", "| backend | batch | first call ms | render ms/frame | worker fps | graphs |"]
    lines.append("|---|---|---|---|---|---|")
    for name, p in parts.items():
        if not name.startswith("batched/"):
            continue
        backend = name.split("/", 1)[1]
        if not p.get("batches"):
            lines.append(f"| {backend} | - | {p.get('status')} | | | |")
            continue
        for n, e in p["batches"].items():
            graphs = e.get("graphs_compiled_first_call", "")
            if "graphs_compiled_steady" in e:
                graphs = f"{graphs} then {e['graphs_compiled_steady']}"
            lines.append(
                f"| {backend} | {n} | {e.get('first_call_ms', e.get('status'))} | "
                f"{e.get('render_ms_per_frame', '-')} | {e.get('fps_worker_alone', '-')} | "
                f"{graphs} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batches", default="1,8,32", help="batch sizes (frames per render call)")
    ap.add_argument("--backends", default="torch,compiled,tensorrt")
    ap.add_argument("--iters", type=int, default=10, help="steady calls per batch size")
    ap.add_argument("--frame-size", default=None, help="WxH output frame (default 512x512)")
    ap.add_argument("--deadline-s", type=float, default=150.0, help="stop starting new work after")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_paths: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    if args.frame_size:
        w, h = (int(v) for v in args.frame_size.lower().split("x"))
        args.frame_size = (w, h)
    run = Run(args.out, args.deadline_s)
    failed = False
    todo: list[tuple[str, Any]] = [("post", lambda: part_post(args, run))]
    for b in [b.strip() for b in args.backends.split(",") if b.strip()]:
        todo.append((f"batched/{b}", lambda b=b: part_batched(args, run, b)))
    for name, fn in todo:
        if run.left_s() < 5:
            run.record(name, {"status": "skipped: out of time"})
            continue
        try:
            res = fn()
        except (TalkstreamError, RuntimeError, ValueError, AssertionError) as e:
            res = {"status": f"FAILED: {type(e).__name__}: {e}"}
            res["traceback"] = traceback.format_exc()
        failed |= str(res.get("status", "")).startswith("FAILED")
        run.record(name, res)
    md = markdown(run.parts)
    (args.out / "gpu_paths.md").write_text(md)
    print(md)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
