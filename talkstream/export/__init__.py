"""Export and backends: how the per-frame networks run fast on each machine.

- ``talkstream.export.onnx``: ONNX graphs of the motion model and the denoiser (step and loop).
- ``talkstream.export.backends``: the backend protocol and ``torch``/``compiled``/``onnxruntime``
  backends, ``--backend auto``.
- ``talkstream.export.tensorrt``/``trt_plugins``: TensorRT engines and the kernels as plugins.
- ``talkstream.export.cache``: the keyed cache of built artifacts.
- ``talkstream.export.cli``: ``talkstream export`` and ``talkstream doctor``.

Nothing is imported here: the engine imports ``backends`` alone, and the optional libraries
(onnx, onnxruntime, tensorrt) are imported only by the code that needs them.
"""
