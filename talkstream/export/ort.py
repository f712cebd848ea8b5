"""The ``onnxruntime`` backend: the exported ONNX graphs (``talkstream.export.onnx``) on the CPU
execution provider, or the CUDA one (with IO binding) when ``onnxruntime-gpu`` provides it."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from talkstream.engine.checkpoint import Models
from talkstream.engine.denoiser import ReferenceFeatures
from talkstream.engine.runtime import LoadedModels, LoadOptions
from talkstream.engine.sampler import FewStepSampler
from talkstream.export.cache import ArtifactCache
from talkstream.export.common import (
    BaseBackend,
    OnnxGraphs,
    device_type,
    import_optional,
    reject_ref_batch,
    sampler_key,
)

__all__ = ["OnnxRuntimeBackend", "OnnxRuntimeModels"]


class OnnxRuntimeModels(LoadedModels):
    """The ONNX graphs in onnxruntime sessions (CPU provider, or CUDA with IO binding)."""

    name = "onnxruntime"

    def __init__(self, models: Models, options: LoadOptions) -> None:
        super().__init__(models, options)
        self.ort = import_optional("onnxruntime", "the onnxruntime backend", "export")
        self.cache = ArtifactCache(options.cache_dir)
        self.graphs = OnnxGraphs(models, self.cache, options)
        self._sessions: dict[str, tuple[Any, Any]] = {}
        self._lock = threading.Lock()
        self.cuda = self.device.type == "cuda"
        self.provider = "CUDAExecutionProvider" if self.cuda else "CPUExecutionProvider"
        default_la = models.motion.cfg.lookahead_frames
        for la in options.lookaheads or (default_la,):
            self._motion_session(la)
        if options.sampler is not None:
            self._loop_session(options.sampler)

    def _session(self, key: str, get: Callable[[], tuple[Any, Path]]) -> tuple[Any, Any]:
        with self._lock:
            hit = self._sessions.get(key)
            if hit is not None:
                return hit
            spec, path = get()
            opts = self.ort.SessionOptions()
            threads = self.options.threads or torch.get_num_threads()
            if key.startswith("motion") and self.options.ort_motion_one_thread:
                threads = 1
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            opts.execution_mode = self.ort.ExecutionMode.ORT_SEQUENTIAL
            opts.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            spin = self.options.ort_spinning
            opts.add_session_config_entry(
                "session.intra_op.allow_spinning", "0" if spin == "off" else "1"
            )
            if spin == "run":
                # Spin while a call runs; stop when it returns (between frames the cores belong
                # to paste-back, colour conversion and the encoder).
                opts.add_session_config_entry("session.force_spinning_stop", "1")
            providers: list[Any] = ["CPUExecutionProvider"]
            if self.cuda:
                # Run on torch's current stream: no cross-stream sync around IO binding.
                stream = torch.cuda.current_stream(self.device).cuda_stream
                cuda_opts = {
                    "device_id": self.device.index or 0,
                    "user_compute_stream": str(stream),
                }
                providers = [("CUDAExecutionProvider", cuda_opts), "CPUExecutionProvider"]
            sess = self.ort.InferenceSession(str(path), opts, providers=providers)
            self._sessions[key] = (sess, spec)
            return sess, spec

    def _motion_session(self, la: int) -> tuple[Any, Any]:
        return self._session(f"motion{la}", lambda: self.graphs.motion(la))

    def _loop_session(self, sampler: FewStepSampler) -> tuple[Any, Any]:
        key = sampler_key(sampler)
        return self._session(key, lambda: self.graphs.denoiser_loop(sampler))

    def _run(self, sess: Any, spec: Any, inputs: Sequence[Tensor], like: Tensor) -> Tensor:
        if self.cuda:
            return self._run_cuda(sess, spec, inputs, like)
        feeds = {}
        for name, t in zip(spec.inputs, inputs, strict=True):
            dtype = torch.int64 if name == "t" else torch.float32
            feeds[name] = t.detach().to("cpu", dtype).contiguous().numpy()
        (out,) = sess.run(list(spec.outputs), feeds)
        return torch.from_numpy(out).to(like.device, like.dtype)

    def _run_cuda(self, sess: Any, spec: Any, inputs: Sequence[Tensor], like: Tensor) -> Tensor:
        import numpy as np

        binding = sess.io_binding()
        keep = []  # the bound buffers must outlive the run
        for name, t in zip(spec.inputs, inputs, strict=True):
            dtype = torch.int64 if name == "t" else torch.float32
            buf = t.detach().to(self.device, dtype).contiguous()
            keep.append(buf)
            binding.bind_input(
                name, "cuda", self.device.index or 0,
                np.int64 if name == "t" else np.float32, tuple(buf.shape), buf.data_ptr(),
            )  # fmt: skip
        out_shape = (inputs[0].shape[0], *like.shape[1:])
        out = torch.empty(out_shape, dtype=torch.float32, device=self.device)
        binding.bind_output(
            spec.outputs[0], "cuda", self.device.index or 0, np.float32, out_shape, out.data_ptr()
        )
        sess.run_with_iobinding(binding)
        return out.to(like.dtype)

    def motion(self, windows: Tensor, neutral: Tensor, lookahead: int | None = None) -> Tensor:
        cfg = self.models.motion.cfg
        la = cfg.lookahead_frames if lookahead is None else lookahead
        self.models.motion.key_padding_mask(la, torch.device("cpu"))  # validates the range
        sess, spec = self._motion_session(la)
        like = windows.new_empty((windows.shape[0], *self.models.motion.head_shape))
        return self._run(sess, spec, (windows, neutral), like)

    def denoiser(self, x_t: Tensor, t: Tensor, landmarks: Tensor, ref: ReferenceFeatures) -> Tensor:
        reject_ref_batch(ref, self.name)
        sess, spec = self._session("step", self.graphs.denoiser_step)
        return self._run(sess, spec, (x_t, t, landmarks, ref.patches, *ref.levels), x_t)

    def sample(
        self, sampler: FewStepSampler, noise: Tensor, landmarks: Tensor, ref: ReferenceFeatures
    ) -> Tensor:
        reject_ref_batch(ref, self.name)
        sess, spec = self._loop_session(sampler)
        return self._run(sess, spec, (noise, landmarks, ref.patches, *ref.levels), noise)

    def describe(self) -> str:
        threads = self.options.threads or torch.get_num_threads()
        return (
            f"onnxruntime {self.ort.__version__} ({self.provider}, {threads} threads, "
            f"spinning {self.options.ort_spinning})"
        )

    def close(self) -> None:
        self._sessions.clear()
        self.cache.close()


class OnnxRuntimeBackend(BaseBackend):
    name = "onnxruntime"
    extra = "export"
    description = "ONNX Runtime on the exported graphs (CPU; CUDA with onnxruntime-gpu)"
    loaded_class = OnnxRuntimeModels

    def check(self, device: str, dtype: str) -> None:
        super().check(device, dtype)
        ort = import_optional("onnxruntime", "the onnxruntime backend", "export")
        for module in ("onnx", "onnxscript"):  # the exporter that makes the graphs
            import_optional(module, "the onnxruntime backend (ONNX export)", "export")
        if dtype != "float32":
            raise ValueError(
                f"the onnxruntime backend runs float32 graphs; dtype {dtype} was asked "
                "(use --dtype float32, or --backend compiled/tensorrt for lower precision)"
            )
        if device_type(device) == "cuda" and (
            "CUDAExecutionProvider" not in ort.get_available_providers()
        ):
            raise ValueError(
                "this onnxruntime has no CUDAExecutionProvider: install onnxruntime-gpu "
                "(it replaces the onnxruntime package)"
            )
