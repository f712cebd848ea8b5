"""Browser glass-to-glass benchmark: ``talkstream bench --browser URL``.

Headless Chromium (driven by playwright) opens the talkstream web client at ``URL`` with
``?probe=1`` and presses *Start*. Its fake microphone loops a WAV of speech bursts separated by
silence (espeak-ng phrases, written into the output folder, or a WAV of your own). The page
records, on one clock (``performance.now()``): the level of its microphone and of the avatar's
voice every 5 ms, the change of the mouth region in every presented video frame, and the
presentation time of every frame. From those alone the benchmark computes

- presented, decoded and received frames per second (mean, and the worst 5 s);
- mic-to-mouth latency: from each speech onset at the microphone (its level rising above
  0.02 RMS after 0.4 s below 0.003) to the first onset of mouth motion after it in the decoded
  video (the mouth region's change, one-frame blips filtered out, rising 30 % of the way from
  stillness to typical speech motion after 0.3 s of stillness, and staying there); p50/p90
  over the bursts, and how many matched. Speech in the video's first second (the encoder's
  quality ramp) is not timed. The avatar's voice is timed the same way (mic-to-voice). The
  model's own anticipation is part of it: a lookahead lets the mouth open slightly before
  the sound it shapes;
- frames dropped by the decoder, freezes (gaps between presented frames longer than
  ``max(3 x median, median + 150 ms)``, Chromium's own definition), lost packets.

When the server is talkstream and serves ``/sessions/{id}/trace`` and ``/stats``, the server's
own timeline splits the latency: speech and motion onsets in media time map the microphone and
the video to it, giving the delay from the microphone capturing an instant to the display of
that instant's frame, and how early the model moves the mouth around a speech onset; beside
them, the server's declared budget (lookahead, jitter, compute), its measured render time and
skipped or repeated frames, and the receiver's RTT, jitter buffer and decode time.

``URL`` may also be ``local``: the harness then starts a talkstream server in this process on
127.0.0.1 (idle motion off; random weights get a landmark gain so mouth motion survives VP8,
see :func:`talkstream.benchmarking.local.local_engine`).

Needs the Python package ``playwright`` and a Chromium binary (``/usr/bin/chromium``, another
``chromium``/``google-chrome`` on ``PATH``, or ``$TALKSTREAM_CHROMIUM``); ``playwright install``
is never needed. Generating the speech needs ``espeak-ng`` unless a WAV is given.

The parts, each importable on its own:

- :mod:`.analysis`: onsets, latencies, frame rates, freezes from the page's records (pure numpy);
- :mod:`.speech`: the fake microphone's WAV (espeak-ng bursts) and its burst pattern;
- :mod:`.harness`: Chromium discovery and the playwright session (page scripts in ``js/``);
- :mod:`.report`: ``browser.json`` and the Markdown table;
- :mod:`.bench`: the command, tying them together;
- the local server and engine live in :mod:`talkstream.benchmarking.local` (shared with the
  tests and the benchmark scripts).
"""

from talkstream.benchmarking.browser.analysis import (
    MAX_LATENCY_S,
    NOMINAL_FPS,
    QUIET_BEFORE_ONSET_S,
    QUIET_RMS,
    SPEECH_RMS,
    analyse,
    best_offset,
    level_curve,
    match_answers,
    motion_onsets,
    onsets,
    pair_up,
    server_breakdown,
)
from talkstream.benchmarking.browser.bench import (
    DEFAULT_DURATION_S,
    LOCAL,
    SCHEMA,
    check_server,
    client_urls,
    run_browser_bench,
)
from talkstream.benchmarking.browser.harness import (
    CHROMIUM_ENV,
    CHROMIUM_FLAGS,
    FETCH_JSON_JS,
    INIT_JS,
    PLAYOUT_JS,
    POLL_JS,
    TAIL_S,
    check_browser_tools,
    find_chromium,
    record,
)
from talkstream.benchmarking.browser.report import render_markdown, write_outputs
from talkstream.benchmarking.browser.speech import make_speech_wav, prepare_mic_wav, speech_bursts
from talkstream.benchmarking.local import (
    LANDMARK_GAIN,
    local_engine,
    local_server,
    serve_in_background,
)

__all__ = [
    "CHROMIUM_ENV",
    "CHROMIUM_FLAGS",
    "DEFAULT_DURATION_S",
    "FETCH_JSON_JS",
    "INIT_JS",
    "LANDMARK_GAIN",
    "LOCAL",
    "MAX_LATENCY_S",
    "NOMINAL_FPS",
    "PLAYOUT_JS",
    "POLL_JS",
    "QUIET_BEFORE_ONSET_S",
    "QUIET_RMS",
    "SCHEMA",
    "SPEECH_RMS",
    "TAIL_S",
    "analyse",
    "best_offset",
    "check_browser_tools",
    "check_server",
    "client_urls",
    "find_chromium",
    "level_curve",
    "local_engine",
    "local_server",
    "make_speech_wav",
    "match_answers",
    "motion_onsets",
    "onsets",
    "pair_up",
    "prepare_mic_wav",
    "record",
    "render_markdown",
    "run_browser_bench",
    "serve_in_background",
    "server_breakdown",
    "speech_bursts",
    "write_outputs",
]
