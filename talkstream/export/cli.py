"""``talkstream export`` (build and cache a backend's artifacts) and ``talkstream doctor``.

Registered by ``talkstream.cli`` through ``add_parser``; the handlers import torch, onnx and the
backends only when they run, so ``talkstream --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

AddArgs = Callable[[argparse.ArgumentParser], None]
MakeConfig = Callable[[argparse.Namespace], Any]

# CPU features that decide which kernels torch and onnxruntime pick on x86 and Arm.
_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
_ARM_FLAGS = ("asimd", "sve", "sve2", "bf16", "i8mm")


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    add_engine_args: AddArgs,
    engine_config: MakeConfig,
) -> None:
    """Register ``export`` and ``doctor`` on the ``talkstream`` subparsers."""
    e = sub.add_parser(
        "export",
        help="build and cache a backend's artifacts (ONNX graphs, TensorRT engines)",
        description="Export the per-frame networks for a backend and cache what it builds "
        "(keyed by model hash, shapes, precision and library versions), so that the first "
        "frame of a session does not pay for it. With --backend auto, the backend that "
        "--backend auto would run.",
    )
    add_engine_args(e)
    e.add_argument("--rebuild", action="store_true", help="rebuild even if cached")
    e.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help="largest batch the artifacts take (default: the engine's coalescing limit, "
        "max_batch_frames, so that serve finds what export built)",
    )
    e.add_argument(
        "--lookaheads",
        default=None,
        help="comma-separated motion lookaheads to build (default: --lookahead or the model's)",
    )
    e.add_argument(
        "--trt-plugins", action="store_true", help="TensorRT: embed the Triton kernels as plugins"
    )
    e.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the parity check of the built backend against eager PyTorch",
    )
    e.add_argument("--list", action="store_true", help="list the cached artifacts and exit")
    e.set_defaults(func=lambda a: _cmd_export(a, _engine_section(a, engine_config, "export")))

    d = sub.add_parser(
        "doctor",
        help="what this machine has: CPU, GPU, CUDA, and which backends can run (and why not)",
        description="Report CPU features, torch/CUDA/GPU, the kernel implementations, and for "
        "each backend whether it can run here; when not, the exact reason and what to install.",
    )
    add_engine_args(d)
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.set_defaults(func=lambda a: _cmd_doctor(a, _engine_section(a, engine_config, "doctor")))


# --- export -------------------------------------------------------------------------------------


def _engine_section(a: argparse.Namespace, engine_config: Any, command: str) -> Any:
    """The engine section, with the command's ``--set engine.KEY=VALUE`` values applied."""
    from talkstream.config import Config

    root = Config(engine=engine_config(a)).with_command_overrides(a.set, command)
    return root.engine


def _cmd_export(a: argparse.Namespace, cfg: Any) -> int:
    import time

    import torch

    from talkstream.engine.checkpoint import Models, load_checkpoint
    from talkstream.engine.pipeline import default_checkpoint, make_sampler
    from talkstream.engine.runtime import LoadOptions
    from talkstream.export.backends import get_backend, select_backend
    from talkstream.export.cache import ArtifactCache

    cache_root = cfg.avatar.cache_dir
    if a.list:
        if cache_root is None:
            print("no cache directory (--no-cache): nothing is cached")
            return 0
        cache = ArtifactCache(cache_root)
        n = 0
        for entry in cache.entries():
            size = sum(f.stat().st_size for f in entry.path.iterdir() if f.is_file())
            print(f"{entry.path.relative_to(cache.root)}  {size / 1e6:.1f} MB")
            n += 1
        print(f"{n} artifacts under {cache.root}")
        return 0

    name = cfg.backend
    if name == "auto":
        sel = select_backend(cfg.device, cfg.dtype)
        print(sel.explain())
        name = sel.name
    if cache_root is None:
        print("warning: --no-cache: artifacts go to a temporary directory and are not kept")
    path = cfg.checkpoint or default_checkpoint(cfg.preset)
    if path is not None:
        models = load_checkpoint(path, "cpu")
    else:
        print(f"warning: no trained checkpoint for preset {cfg.preset!r}: exporting random weights")
        models = Models.random_init(cfg.preset, sampler=cfg.sampler)
    sampler = make_sampler(models, cfg)
    if a.lookaheads:
        lookaheads = tuple(int(x) for x in a.lookaheads.split(","))
    elif cfg.lookahead_frames is not None:
        lookaheads = (cfg.lookahead_frames,)
    else:
        lookaheads = (models.motion.cfg.lookahead_frames,)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)

    t0 = time.perf_counter()
    print(f"[export] backend {name}, preset {models.preset}, device {cfg.device}, {cfg.dtype}")
    # The engine's own load options (max_batch, precision, cache), so that what is built here
    # is what load_engine finds in the cache.
    extra = {} if a.max_batch is None else {"max_batch": a.max_batch}
    options = LoadOptions.from_config(
        cfg,
        sampler,
        lookaheads=lookaheads,
        rebuild=a.rebuild,
        trt_plugins=a.trt_plugins,
        progress=lambda msg: print(f"[export] {msg}", flush=True),
        **extra,
    )
    loaded = get_backend(name).load(models, options=options)
    try:
        print(f"[export] ready in {time.perf_counter() - t0:.1f} s: {loaded.describe()}")
        if not a.no_verify:
            errs = _verify(loaded, models, sampler, lookaheads, cfg.device)
            worst = max(errs.values())
            for what, err in errs.items():
                print(f"[export] parity vs eager, {what}: max abs error {err:.2e}")
            # Images live in [-1, 1]: 1e-2 is about one 8-bit level; fp16 engines sit below it.
            if worst > 2e-2:
                print(f"talkstream: error: {name} differs from eager by {worst:.2e}")
                return 1
    finally:
        loaded.close()
    if cache_root is not None:
        print(f"[export] artifacts cached under {Path(cache_root) / 'artifacts'}")
    return 0


def _verify(
    loaded: Any, models: Any, sampler: Any, lookaheads: tuple[int, ...], device: str
) -> dict[str, float]:
    import torch

    from talkstream.export.onnx import example_inputs, motion_spec, reference_inputs

    errs: dict[str, float] = {}
    dev = torch.device(device)
    motion = models.motion.to(dev).eval()
    den = models.denoiser.eval()
    with torch.inference_mode():
        for la in lookaheads:
            inp = example_inputs(motion_spec(la), motion=motion, batch=1, seed=1)
            w, n = inp["windows"].to(dev), inp["neutral"].to(dev)
            got = loaded.motion(w, n, la).float()
            errs[f"motion (lookahead {la})"] = float((got - motion(w, n, la).float()).abs().max())
        ref = reference_inputs(den)
        dt = next(den.parameters()).dtype
        s = den.cfg.image_size
        gen = torch.Generator().manual_seed(2)
        noise = torch.randn(1, 3, s, s, generator=gen).to(dev, dt)
        lm = (torch.rand(1, den.cfg.n_landmarks, 2, generator=gen) * 1.2 - 0.6).to(dev, dt)
        got = loaded.sample(sampler, noise, lm, ref).float()
        want = sampler.sample(den, noise, landmarks=lm, ref=ref).float()
        errs[f"denoiser ({sampler.steps} steps)"] = float((got - want).abs().max())
    return errs


# --- doctor -------------------------------------------------------------------------------------


def _cpu_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "model": platform.processor() or "unknown",
    }
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and info["model"] in ("unknown", platform.machine()):
            info["model"] = value.strip()
        elif key in ("flags", "Features"):
            flags.update(value.split())
    info["features"] = [f for f in (*_CPU_FLAGS, *_ARM_FLAGS) if f in flags]
    return info


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except ImportError:
        return None
    except Exception as e:  # a broken install must show up in the report, not crash it
        return f"import failed: {type(e).__name__}: {e}"
    return str(getattr(mod, "__version__", "installed"))


# What the optional parts of talkstream need: (name shown, module, distributions, extra, what
# it is for). Looked up without importing (pipecat, livekit and ray take seconds to import).
_COMPONENTS: tuple[tuple[str, str, tuple[str, ...], str, str], ...] = (
    ("dlib", "dlib", ("dlib-bin", "dlib"), "detect", "face detection on new photos"),
    (
        "face-recognition-models",
        "face_recognition_models",
        ("face-recognition-models", "face_recognition_models"),
        "detect",
        "the 68-point landmark model",
    ),
    ("aiohttp", "aiohttp", ("aiohttp",), "serve", "talkstream serve's web server"),
    ("aiortc", "aiortc", ("aiortc",), "serve", "WebRTC for talkstream serve"),
    ("pyaudio", "pyaudio", ("PyAudio", "pyaudio"), "live", "the microphone of talkstream live"),
    ("pyvirtualcam", "pyvirtualcam", ("pyvirtualcam",), "live", "talkstream live's camera"),
    ("pipecat", "pipecat", ("pipecat-ai",), "pipecat", "the pipecat voice-agent integration"),
    ("livekit", "livekit", ("livekit",), "livekit", "the LiveKit integration"),
    ("livekit-agents", "livekit.agents", ("livekit-agents",), "livekit", "LiveKit agents"),
    ("ray", "ray", ("ray",), "cluster", "render workers placed by Ray Serve"),
)
# Debian packages some components need beside their wheel.
_SYSTEM_HINTS = {
    "pyaudio": "on Debian/Ubuntu first: sudo apt-get install portaudio19-dev",
}


def _dist_version(dists: tuple[str, ...]) -> str | None:
    from importlib import metadata

    for d in dists:
        try:
            return metadata.version(d)
        except metadata.PackageNotFoundError:
            continue
    return None


def _component(
    name: str, module: str, dists: tuple[str, ...], extra: str, what: str
) -> dict[str, Any]:
    import importlib.util

    try:
        present = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing or broken
        present = False
    row: dict[str, Any] = {"for": what, "extra": extra, "installed": present, "version": None}
    if present:
        row["version"] = _dist_version(dists) or "installed"
        if name == "pyaudio":
            # The wheel imports only with the PortAudio shared library present.
            try:
                __import__("pyaudio")
            except Exception as e:  # an ImportError or OSError naming the missing library
                row["installed"] = False
                row["problem"] = f"import failed: {e}"
    if not row["installed"]:
        fix = f"pip install 'talkstream[{extra}]'"
        if name in _SYSTEM_HINTS:
            fix = f"{_SYSTEM_HINTS[name]}, then {fix}"
        row["install"] = fix
    return row


def _espeak_status() -> dict[str, Any]:
    """libespeak-ng (speech for the corpus and the tests) and its command-line tool."""
    import shutil

    from talkstream.training._espeak_core import CoreError, load_library

    row: dict[str, Any] = {
        "for": "speech synthesis (training corpus, tests)",
        "extra": None,
        "cli": shutil.which("espeak-ng"),
    }
    try:
        lib = load_library()
    except CoreError:
        row.update(installed=False, version=None)
    else:
        row.update(installed=True, version=getattr(lib, "_name", "libespeak-ng"))
    if not row["installed"]:
        row["install"] = "sudo apt-get install espeak-ng libespeak-ng1 (Debian/Ubuntu)"
    return row


def components_report() -> dict[str, dict[str, Any]]:
    """Each optional component: installed or not, its version, and how to install it."""
    rows = {c[0]: _component(*c) for c in _COMPONENTS}
    rows["espeak-ng"] = _espeak_status()
    return rows


def doctor_report(device: str, dtype: str) -> dict[str, Any]:
    """Everything ``talkstream doctor`` prints, as a JSON-ready dict."""
    import torch

    from talkstream.export.backends import BACKENDS, select_backend
    from talkstream.kernels import kernel_implementation

    report: dict[str, Any] = {
        "python": sys.version.split()[0],
        "cpu": {**_cpu_info(), "torch_capability": torch.backends.cpu.get_cpu_capability()},
        "torch": {
            "version": torch.__version__,
            "threads": torch.get_num_threads(),
            "cuda_build": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(),
        },
        "gpus": [],
        "libraries": {
            m: _version(m) for m in ("triton", "onnx", "onnxscript", "onnxruntime", "tensorrt")
        },
    }
    report["libraries"]["cupy"] = _cupy_status()
    from talkstream.export.tensorrt import tensorrt_status

    trt_ok, trt_line = tensorrt_status()
    report["tensorrt"] = {"usable": trt_ok, "status": trt_line}
    report["components"] = components_report()
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            report["gpus"].append(
                {
                    "index": i,
                    "name": p.name,
                    "capability": f"{p.major}.{p.minor}",
                    "memory_gib": round(p.total_memory / 2**30, 1),
                }
            )
    if report["libraries"]["onnxruntime"] and not report["libraries"]["onnxruntime"].startswith(
        "import failed"
    ):
        import onnxruntime

        report["onnxruntime_providers"] = onnxruntime.get_available_providers()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if device not in devices:
        devices.append(device)
    report["kernels"] = {dev: kernel_implementation(dev) for dev in devices}
    report["backends"] = {}
    for dev in devices:
        rows = {}
        for name, backend in BACKENDS.items():
            ok, why = backend.available(dev, dtype)
            rows[name] = {"available": ok, "reason": why, "extra": backend.extra}
        report["backends"][dev] = rows
    try:
        sel = select_backend(device, dtype)
        report["auto"] = {"device": device, "backend": sel.name, "reason": sel.reason}
    except ValueError as e:
        report["auto"] = {"device": device, "backend": None, "reason": str(e)}
    return report


def _cupy_status() -> str | None:
    try:
        import cupy
    except ImportError:
        return None
    except Exception as e:  # CuPy without a matching CUDA runtime can fail at import
        return f"import failed: {type(e).__name__}: {e}"
    gpu = "a GPU" if cupy.cuda.is_available() else "no GPU"
    return f"{cupy.__version__} ({gpu})"


def _cmd_doctor(a: argparse.Namespace, cfg: Any) -> int:
    report = doctor_report(cfg.device, cfg.dtype)
    if a.json:
        print(json.dumps(report, indent=2))
        return 0
    cpu, tor = report["cpu"], report["torch"]
    print(f"python {report['python']}")
    print(f"cpu: {cpu['model']} ({cpu['machine']}, {cpu['cores']} cores)")
    print(f"  features: {' '.join(cpu.get('features', [])) or 'none detected'}")
    print(f"  torch kernels: {cpu['torch_capability']}, {tor['threads']} threads")
    cuda = f"CUDA {tor['cuda_build']}" if tor["cuda_build"] else "CPU-only build"
    print(f"torch {tor['version']} ({cuda}); CUDA available: {tor['cuda_available']}")
    for g in report["gpus"]:
        print(f"  gpu {g['index']}: {g['name']} (sm {g['capability']}, {g['memory_gib']} GiB)")
    print("libraries:")
    for name, version in report["libraries"].items():
        print(f"  {name:12s} {version or 'not installed'}")
    if "onnxruntime_providers" in report:
        print(f"  onnxruntime providers: {', '.join(report['onnxruntime_providers'])}")
    print(f"tensorrt: {report['tensorrt']['status']}")
    print("components:")
    missing = []
    for name, row in report["components"].items():
        if row["installed"]:
            print(f"  yes {name:24s}{row['version']}  ({row['for']})")
        else:
            print(f"  no  {name:24s}{row.get('problem', 'not installed')}  ({row['for']})")
            missing.append(f"{name}: {row['install']}")
    if missing:
        print("to install what is missing:")
        for line in missing:
            print(f"  {line}")
    print("kernels: " + ", ".join(f"{d}: {k}" for d, k in report["kernels"].items()))
    for dev, rows in report["backends"].items():
        print(f"backends on {dev} ({cfg.dtype}):")
        for name, row in rows.items():
            mark = "yes" if row["available"] else "no "
            why = "" if row["available"] else f"  {row['reason']}"
            print(f"  {mark} {name:12s}{why}")
    auto = report["auto"]
    print(f"--backend auto on {auto['device']}: {auto['backend']} ({auto['reason']})")
    return 0
