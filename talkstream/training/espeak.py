"""Speech with timed phonemes from libespeak-ng, through its C API (ctypes).

The ``espeak-ng`` command line can print phonemes, but only its library reports *when* each
phoneme starts in the audio: with ``espeakINITIALIZE_PHONEME_EVENTS`` every phoneme becomes an
``espeakEVENT_PHONEME`` event carrying its mnemonic and its position in the generated samples.
That timing is the ground truth the synthetic corpus builds visemes on.

The library is loaded lazily (Debian package ``libespeak-ng1``; its headers are not needed) and
initialised once per process in synchronous mode: ``espeak_Synth`` returns only after every
sample and event has been passed to the callback. libespeak-ng keeps global state and is not
thread-safe, so all calls go through one lock.

Struct layout and constants follow ``espeak-ng/speak_lib.h`` (API revision 12, espeak-ng 1.51).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from talkstream.errors import TalkstreamError

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

# --- speak_lib.h constants ------------------------------------------------------------------

_EVENT_LIST_TERMINATED: Final = 0
_EVENT_WORD: Final = 1
_EVENT_SENTENCE: Final = 2
_EVENT_MARK: Final = 3
_EVENT_PLAY: Final = 4
_EVENT_END: Final = 5
_EVENT_MSG_TERMINATED: Final = 6
_EVENT_PHONEME: Final = 7
_EVENT_SAMPLERATE: Final = 8

_EVENT_KINDS: Final = {
    _EVENT_WORD: "word",
    _EVENT_SENTENCE: "sentence",
    _EVENT_MARK: "mark",
    _EVENT_PLAY: "play",
    _EVENT_END: "end",
    _EVENT_MSG_TERMINATED: "msg_end",
    _EVENT_PHONEME: "phoneme",
}

_AUDIO_OUTPUT_SYNCHRONOUS: Final = 2
_INITIALIZE_PHONEME_EVENTS: Final = 0x0001
# Return an error instead of calling exit() when espeak-ng-data is missing.
_INITIALIZE_DONT_EXIT: Final = 0x8000
_POS_CHARACTER: Final = 1
_CHARS_UTF8: Final = 1
_PARAM_RATE: Final = 1
_PARAM_PITCH: Final = 3
_EE_OK: Final = 0

RATE_MIN_WPM: Final = 80  # espeakRATE_MINIMUM
RATE_MAX_WPM: Final = 450  # espeakRATE_MAXIMUM

_LIB_NAMES: Final = ("libespeak-ng.so.1", "libespeak-ng.so")
_DEBIAN_HINT: Final = (
    "install the Debian/Ubuntu package 'libespeak-ng1' (apt-get install libespeak-ng1; "
    "the 'espeak-ng' package pulls it in too)"
)


class _EventId(ctypes.Union):
    _fields_ = [
        ("number", ctypes.c_int),  # WORD, SENTENCE
        ("name", ctypes.c_char_p),  # MARK, PLAY
        ("string", ctypes.c_char * 8),  # PHONEME: UTF-8, NUL-terminated unless 8 bytes long
    ]


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),  # characters from the start of the text, 1-based
        ("length", ctypes.c_int),  # word length in characters (WORD events)
        ("audio_position", ctypes.c_int),  # ms from the start of the output
        ("sample", ctypes.c_int),  # sample index (documented "internal use"; see below)
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


_SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event)
)


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


class _Espeak:
    """The process-wide libespeak-ng handle; use only under ``_LOCK``."""

    def __init__(self) -> None:
        self.lib = _load_library()
        lib = self.lib
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.POINTER(ctypes.c_uint),
            ctypes.c_void_p,
        ]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Synchronize.argtypes = []
        lib.espeak_Synchronize.restype = ctypes.c_int

        rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS,
            0,  # buffer length: 0 = espeak's default (200 ms per callback)
            None,  # data path: the compiled-in default (/usr/lib/<arch>/espeak-ng-data)
            _INITIALIZE_PHONEME_EVENTS | _INITIALIZE_DONT_EXIT,
        )
        if rate <= 0:
            raise EspeakError(
                "libespeak-ng failed to initialise (is its data, espeak-ng-data, installed?); "
                + _DEBIAN_HINT
            )
        self.sample_rate = int(rate)
        # The callback writes into the collector of the call in progress.
        self._pcm: list[np.ndarray] = []
        self._events: list[tuple[int, int, int, int, int, str, int]] = []
        # Keep a reference: ctypes frees the C thunk when the Python object dies.
        self._callback = _SynthCallback(self._on_synth)
        lib.espeak_SetSynthCallback(self._callback)

    def _on_synth(self, wav: Any, n: int, events: Any) -> int:
        if n > 0 and wav:
            self._pcm.append(np.ctypeslib.as_array(wav, shape=(n,)).astype(np.int16, copy=True))
        i = 0
        while events[i].type != _EVENT_LIST_TERMINATED:
            ev = events[i]
            name = ""
            number = 0
            if ev.type == _EVENT_PHONEME:
                raw = bytes(ev.id.string)
                name = raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")
            elif ev.type in (_EVENT_WORD, _EVENT_SENTENCE, _EVENT_END):
                number = int(ev.id.number)
            self._events.append(
                (
                    int(ev.type),
                    int(ev.text_position),
                    int(ev.length),
                    int(ev.audio_position),
                    int(ev.sample),
                    name,
                    number,
                )
            )
            i += 1
        return 0  # 0: continue synthesis

    def synth(self, text: str, voice: str, rate: int, pitch: int) -> Utterance:
        lib = self.lib
        if lib.espeak_SetVoiceByName(voice.encode("utf-8")) != _EE_OK:
            raise EspeakError(
                f"espeak-ng has no voice {voice!r}; list them with 'espeak-ng --voices' "
                "(a variant is added with '+', e.g. 'en-us+f3')"
            )
        # Parameters are set after the voice: selecting a voice resets them.
        lib.espeak_SetParameter(_PARAM_RATE, rate, 0)
        lib.espeak_SetParameter(_PARAM_PITCH, pitch, 0)
        self._pcm = []
        self._events = []
        data = text.encode("utf-8")
        buf = ctypes.create_string_buffer(data)
        err = lib.espeak_Synth(buf, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if err != _EE_OK:
            raise EspeakError(f"espeak_Synth failed with error {err} for text {text[:60]!r}")
        lib.espeak_Synchronize()
        pcm = np.concatenate(self._pcm) if self._pcm else np.zeros(0, dtype=np.int16)
        events = [self._convert(e, len(pcm)) for e in self._events if e[0] in _EVENT_KINDS]
        self._pcm, self._events = [], []
        return Utterance(pcm, self.sample_rate, events, text, voice, rate, pitch)

    def _convert(self, e: tuple[int, int, int, int, int, str, int], n: int) -> EspeakEvent:
        kind, text_pos, length, ms, sample, name, number = e
        # audio_position is whole milliseconds (truncated from the sample count); the sample
        # field is the same position at full resolution. Use it when the two agree, which they
        # do in espeak-ng 1.51, and fall back to the documented milliseconds otherwise.
        from_ms = ms * self.sample_rate // 1000
        tolerance = self.sample_rate // 500  # 2 ms
        pos = sample if abs(sample - from_ms) <= tolerance else from_ms
        return EspeakEvent(
            kind=_EVENT_KINDS[kind],
            sample=min(max(pos, 0), n),
            text_position=text_pos,
            length=length,
            phoneme=name,
            number=number,
        )


_LOCK = threading.Lock()
_ENGINE: _Espeak | None = None
_INIT_ERROR: EspeakError | None = None


def _load_library() -> ctypes.CDLL:
    names: list[str] = list(_LIB_NAMES)
    found = ctypes.util.find_library("espeak-ng")
    if found:
        names.append(found)
    errors = []
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError as e:
            errors.append(str(e))
    raise EspeakError(
        "speech synthesis for the synthetic corpus needs the libespeak-ng shared library, "
        f"which was not found ({'; '.join(errors[:1])}); " + _DEBIAN_HINT
    )


def _engine() -> _Espeak:
    """The initialised library (call with ``_LOCK`` held); a failed start is remembered."""
    global _ENGINE, _INIT_ERROR
    if _ENGINE is None:
        if _INIT_ERROR is not None:
            raise _INIT_ERROR
        try:
            _ENGINE = _Espeak()
        except EspeakError as e:
            _INIT_ERROR = e
            raise
    return _ENGINE


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


def synthesize(text: str, voice: str = "en-us", rate_wpm: int = 175, pitch: int = 50) -> Utterance:
    """Speak ``text`` with espeak-ng and return the PCM and the timed events.

    Args:
        text: UTF-8 text (plain, not SSML); one or more sentences.
        voice: an espeak-ng voice name (``espeak-ng --voices``), optionally with a variant,
            e.g. ``"en-us"``, ``"de"``, ``"fr-fr+f2"``.
        rate_wpm: speaking rate in words per minute, 80-450 (espeak's default is 175).
        pitch: base pitch, 0-100 (50 is the voice's normal pitch).

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
    with _LOCK:
        return _engine().synth(text, voice, int(rate_wpm), int(pitch))
