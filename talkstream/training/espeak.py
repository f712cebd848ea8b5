"""Speech with timed phonemes from libespeak-ng, through its C API (ctypes).

The ``espeak-ng`` command line can print phonemes, but only its library reports *when* each
phoneme starts in the audio: with ``espeakINITIALIZE_PHONEME_EVENTS`` every phoneme becomes an
``espeakEVENT_PHONEME`` event carrying its mnemonic and its position in the generated samples.
That timing is the ground truth the synthetic corpus builds visemes on.

The library is loaded lazily (Debian package ``libespeak-ng1``; its headers are not needed) and
initialised once per process in synchronous mode. libespeak-ng keeps global state and is not
thread-safe, so all in-process calls go through one lock.

That global state also makes results depend on history: the same request spoken twice in one
process differs by a few samples (see :mod:`talkstream.training._espeak_core`). With
``fresh_process=True`` a request runs in a new child process (about 25 ms more), which makes the
output a pure function of the request: the corpus uses that.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Final, cast

import numpy as np

from talkstream.errors import TalkstreamError
from talkstream.training import _espeak_core as core

__all__ = [
    "RATE_MAX_WPM",
    "RATE_MIN_WPM",
    "EspeakError",
    "EspeakEvent",
    "PhonemeSegment",
    "Utterance",
    "espeak_available",
    "espeak_sample_rate",
    "synthesize",
]

_EVENT_KINDS: Final = {
    core.EVENT_WORD: "word",
    core.EVENT_SENTENCE: "sentence",
    core.EVENT_MARK: "mark",
    core.EVENT_PLAY: "play",
    core.EVENT_END: "end",
    core.EVENT_MSG_TERMINATED: "msg_end",
    core.EVENT_PHONEME: "phoneme",
}

RATE_MIN_WPM: Final = 80  # espeakRATE_MINIMUM
RATE_MAX_WPM: Final = 450  # espeakRATE_MAXIMUM
_CHILD_TIMEOUT_S: Final = 120.0


class EspeakError(TalkstreamError):
    """libespeak-ng is missing, cannot start, or rejected a request (unknown voice...)."""


# --- results --------------------------------------------------------------------------------


@dataclass(frozen=True)
class EspeakEvent:
    """One timed event of an utterance.

    Attributes:
        kind: ``"phoneme"``, ``"word"``, ``"sentence"``, ``"end"`` (end of a sentence or
            clause), ``"msg_end"``, ``"mark"`` or ``"play"``.
        sample: position in the utterance's PCM (at :attr:`Utterance.sample_rate`) where the
            event's unit starts; clamped to ``[0, len(pcm)]``.
        text_position: 1-based character offset in the text (0 when not applicable).
        length: word length in characters (``"word"`` events), else 0.
        phoneme: the phoneme mnemonic (espeak's ASCII names, e.g. ``"aI"``, ``"tS"``, ``"_:"``)
            for ``"phoneme"`` events, else ``""``.
        number: word or sentence number for those events, else 0.
    """

    kind: str
    sample: int
    text_position: int
    length: int
    phoneme: str
    number: int


@dataclass(frozen=True)
class PhonemeSegment:
    """A phoneme with its interval in the audio, in seconds from the start of the PCM."""

    name: str
    start_s: float
    end_s: float

    @property
    def centre_s(self) -> float:
        """Midpoint of the interval."""
        return 0.5 * (self.start_s + self.end_s)


@dataclass
class Utterance:
    """Speech synthesised by :func:`synthesize`.

    Attributes:
        pcm: (N,) int16 mono samples.
        sample_rate: Hz (22050 for espeak-ng's own voices).
        events: timed events in the order espeak reported them (non-decreasing ``sample``).
        text, voice, rate_wpm, pitch: what was asked for.
    """

    pcm: np.ndarray
    sample_rate: int
    events: list[EspeakEvent]
    text: str
    voice: str
    rate_wpm: int
    pitch: int

    @property
    def duration_s(self) -> float:
        """Length of :attr:`pcm` in seconds."""
        return len(self.pcm) / self.sample_rate

    def phonemes(self) -> list[PhonemeSegment]:
        """Phoneme intervals: each lasts until the next phoneme (or the end of the audio).

        Pauses are phonemes too (``"_"``, ``"_:"``, ``"_!"``, ``"_|"``), so the intervals tile
        the speech. Zero-length entries (markers espeak reports at the same instant as the next
        phoneme, e.g. a language switch ``"(en)"``) are dropped.
        """
        sr = float(self.sample_rate)
        ph = [e for e in self.events if e.kind == "phoneme"]
        out: list[PhonemeSegment] = []
        for i, e in enumerate(ph):
            end = ph[i + 1].sample if i + 1 < len(ph) else len(self.pcm)
            if end > e.sample:
                out.append(PhonemeSegment(e.phoneme, e.sample / sr, end / sr))
        return out

    def words(self) -> list[tuple[str, float]]:
        """(word text, start time in seconds) of every ``"word"`` event."""
        # text_position counts characters (not bytes) from 1.
        return [
            (
                self.text[e.text_position - 1 : e.text_position - 1 + e.length],
                e.sample / self.sample_rate,
            )
            for e in self.events
            if e.kind == "word"
        ]


# --- the library ----------------------------------------------------------------------------


def _convert(raw: list[core.RawEvent], n: int, sample_rate: int) -> list[EspeakEvent]:
    out = []
    for kind, text_pos, length, ms, sample, name, number in raw:
        if kind not in _EVENT_KINDS:
            continue  # SAMPLERATE and list terminators are internal
        # audio_position is whole milliseconds (truncated from the sample count); the sample
        # field is the same position at full resolution. Use it when the two agree, which they
        # do in espeak-ng 1.51, and fall back to the documented milliseconds otherwise.
        from_ms = ms * sample_rate // 1000
        pos = sample if abs(sample - from_ms) <= sample_rate // 500 else from_ms  # 2 ms
        out.append(
            EspeakEvent(
                kind=_EVENT_KINDS[kind],
                sample=min(max(pos, 0), n),
                text_position=text_pos,
                length=length,
                phoneme=name,
                number=number,
            )
        )
    return out


_LOCK = threading.Lock()
_CORE: core.EspeakCore | None = None
_INIT_ERROR: EspeakError | None = None
_LIB_NAMES: tuple[str, ...] = core.LIB_NAMES


def _load_library() -> None:
    """dlopen libespeak-ng (a check; raises :class:`EspeakError` naming the Debian package)."""
    try:
        core.load_library(_LIB_NAMES)
    except core.CoreError as e:
        raise EspeakError(str(e)) from None


def _engine() -> core.EspeakCore:
    """The process-wide library (call with ``_LOCK`` held); a failed start is remembered."""
    global _CORE, _INIT_ERROR
    if _CORE is None:
        if _INIT_ERROR is not None:
            raise _INIT_ERROR
        try:
            _CORE = core.EspeakCore(_LIB_NAMES)
        except core.CoreError as e:
            _INIT_ERROR = EspeakError(str(e))
            raise _INIT_ERROR from None
    return _CORE


def _synth_in_child(
    text: str, voice: str, rate: int, pitch: int
) -> tuple[int, bytes, list[core.RawEvent]]:
    """Run one request through ``_espeak_core.py`` in a new interpreter (see module doc)."""
    request = json.dumps({"text": text, "voice": voice, "rate": rate, "pitch": pitch})
    script = str(Path(core.__file__).resolve())
    try:
        proc = subprocess.run(
            [sys.executable, "-I", script],
            input=request.encode("utf-8"),
            capture_output=True,
            timeout=_CHILD_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise EspeakError(f"espeak-ng child process timed out after {e.timeout:.0f} s") from None
    head, sep, pcm = proc.stdout.partition(b"\n")
    try:
        answer = json.loads(head.decode("utf-8")) if sep else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        answer = None
    if proc.returncode != 0 or not isinstance(answer, dict):
        err = proc.stderr.decode("utf-8", errors="replace").strip().splitlines()
        raise EspeakError(
            f"espeak-ng child process failed (exit {proc.returncode}): "
            f"{err[-1] if err else 'no output'}"
        )
    if not answer["ok"]:
        raise EspeakError(answer["message"])
    if answer["byteorder"] != sys.byteorder or len(pcm) != 2 * answer["n_samples"]:
        raise EspeakError("espeak-ng child process returned malformed audio")
    events = [cast(core.RawEvent, tuple(e)) for e in answer["events"]]
    return int(answer["sample_rate"]), pcm, events


def espeak_available() -> bool:
    """Whether libespeak-ng can be loaded and initialised in this process."""
    try:
        espeak_sample_rate()
    except EspeakError:
        return False
    return True


def espeak_sample_rate() -> int:
    """The output rate of libespeak-ng (22050 Hz for its own voices).

    Raises:
        EspeakError: the library is missing or fails to initialise.
    """
    with _LOCK:
        return _engine().sample_rate


def synthesize(
    text: str,
    voice: str = "en-us",
    rate_wpm: int = 175,
    pitch: int = 50,
    *,
    fresh_process: bool = False,
) -> Utterance:
    """Speak ``text`` with espeak-ng and return the PCM and the timed events.

    Args:
        text: UTF-8 text (plain, not SSML); one or more sentences.
        voice: an espeak-ng voice name (``espeak-ng --voices``), optionally with a variant,
            e.g. ``"en-us"``, ``"de"``, ``"fr-fr+f2"``.
        rate_wpm: speaking rate in words per minute, 80-450 (espeak's default is 175).
        pitch: base pitch, 0-100 (50 is the voice's normal pitch).
        fresh_process: synthesise in a new child process, so the result does not depend on
            what this process spoke before (bit-exact reproducible; about 25 ms slower).

    Returns:
        The :class:`Utterance` (22050 Hz int16 PCM and events with sample positions).

    Raises:
        ValueError: empty text or an out-of-range rate or pitch.
        EspeakError: libespeak-ng is missing, or the voice does not exist.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text must be a non-empty string, got {text!r}")
    if not RATE_MIN_WPM <= int(rate_wpm) <= RATE_MAX_WPM:
        raise ValueError(f"rate_wpm must be in {RATE_MIN_WPM}..{RATE_MAX_WPM}, got {rate_wpm}")
    if not 0 <= int(pitch) <= 100:
        raise ValueError(f"pitch must be in 0..100, got {pitch}")
    rate, pitch = int(rate_wpm), int(pitch)
    if fresh_process:
        sr, pcm_bytes, raw = _synth_in_child(text, voice, rate, pitch)
    else:
        with _LOCK:
            eng = _engine()
            try:
                pcm_bytes, raw = eng.synth(text, voice, rate, pitch)
            except core.CoreError as e:
                raise EspeakError(str(e)) from None
            sr = eng.sample_rate
    pcm = np.frombuffer(pcm_bytes, dtype=np.int16).copy()
    return Utterance(pcm, sr, _convert(raw, len(pcm), sr), text, voice, rate, pitch)
