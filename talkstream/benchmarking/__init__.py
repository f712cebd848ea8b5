"""The benchmark harness behind ``talkstream bench``: latency, throughput and anchor baselines.

Light on import: the command registers through :mod:`talkstream.benchmarking.cli`, which imports
torch, PyAV and the optional plotting and anchor libraries only when the command runs.

Modules:
    scenario    the ``Scenario`` dataclass: what one measurement runs
    timing      per-stage timers (perf_counter on the host, CUDA events on a GPU) and percentiles
    memory      peak host memory (per scenario and of child processes), device memory
    runner      one scenario: warm-up, per-stage latency, fps, memory (the engine's own calls)
    encode      what serve does to a frame before it leaves: yuv420p, aiortc's VP8 encoder
    e2e         in-process end-to-end latency with real-time paced audio
    throughput  concurrent 25 fps sessions per device, frames of all sessions batched
    anchors     MuseTalk- and Wav2Lip-equivalents timed beside our model
    wav2lip     the Wav2Lip-equivalent generator (architecture only, for timing)
    render_memory  peak RSS of `talkstream render` children against clip length (--memory)
    report      JSON, Markdown and PNG outputs, and the summary of several runs
    browser     ``--browser URL``: glass-to-glass in headless Chromium (a package: analysis,
                speech, harness, report, bench)
    local       an engine and a server in this process, shared with the tests and scripts
    cli         the command: flags -> scenarios -> the parts above -> outputs
"""
