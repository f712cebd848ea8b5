"""Export and backends: how the per-frame networks run fast on each machine.

Every backend implements the engine's runtime protocol (``talkstream.engine.runtime``:
``LoadedModels``, ``LoadOptions``); the engine never imports this package, the composition root
``talkstream.runtime.load_engine`` does.

- ``talkstream.export.backends``: the registry (``get_backend``, ``load_backend``) and
  ``--backend auto`` (``select_backend``).
- one backend per module: ``eager`` (``torch``), ``compiled`` (``torch.compile``), ``ort``
  (``onnxruntime``), ``tensorrt`` (TensorRT engines; ``trt_plugins``: the kernels as plugins).
- ``talkstream.export.common``: what the backends share (``BaseBackend``, batch padding,
  optional imports, ``OnnxGraphs``: the exported graphs onnxruntime and TensorRT run).
- ``talkstream.export.onnx``: ONNX graphs of the motion model and the denoiser (step and loop).
- ``talkstream.export.cache``: the keyed cache of built artifacts.
- ``talkstream.export.cli``: ``talkstream export`` and ``talkstream doctor``.

Nothing is imported here, and the optional libraries (onnx, onnxruntime, tensorrt) are imported
only by the code that needs them.
"""
