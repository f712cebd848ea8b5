"""The ctypes binding of libespeak-ng, standard library only.

Used in-process by :mod:`talkstream.training.espeak`, and also run as a script (``python
_espeak_core.py``) in a fresh child process when a synthesis must not depend on what was spoken
before: libespeak-ng keeps hidden global state between calls (the pitch-flutter phase, a static
in wavegen.c's ``AdvanceParameters``; a glottal cycle counter; libc ``rand()`` for breathy voice
variants), so the same request gives slightly different samples and event positions depending
on the history of the process. A fresh process always starts from the same state. The script
imports nothing but the standard library, so a child starts in about 25 ms.

Struct layout and constants follow ``espeak-ng/speak_lib.h`` (API revision 12, espeak-ng 1.51).

Child protocol: one JSON request on stdin (``text``, ``voice``, ``rate``, ``pitch``); on stdout
one JSON line (``{"ok": true, "sample_rate": ..., "n_samples": ..., "events": [...]}`` or
``{"ok": false, "kind": ..., "message": ...}``) followed, on success, by the raw int16
little-endian PCM.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import sys
from typing import Any, Final

# speak_lib.h: espeak_EVENT_TYPE
EVENT_LIST_TERMINATED: Final = 0
EVENT_WORD: Final = 1
EVENT_SENTENCE: Final = 2
EVENT_MARK: Final = 3
EVENT_PLAY: Final = 4
EVENT_END: Final = 5
EVENT_MSG_TERMINATED: Final = 6
EVENT_PHONEME: Final = 7
EVENT_SAMPLERATE: Final = 8

_AUDIO_OUTPUT_SYNCHRONOUS: Final = 2
_INITIALIZE_PHONEME_EVENTS: Final = 0x0001
# Return an error instead of calling exit() when espeak-ng-data is missing.
_INITIALIZE_DONT_EXIT: Final = 0x8000
_POS_CHARACTER: Final = 1
_CHARS_UTF8: Final = 1
_PARAM_RATE: Final = 1
_PARAM_PITCH: Final = 3
_EE_OK: Final = 0

LIB_NAMES: Final = ("libespeak-ng.so.1", "libespeak-ng.so")
DEBIAN_HINT: Final = (
    "install the Debian/Ubuntu package 'libespeak-ng1' (apt-get install libespeak-ng1; "
    "the 'espeak-ng' package pulls it in too)"
)

# (type, text_position, length, audio_position_ms, sample, phoneme, number)
RawEvent = tuple[int, int, int, int, int, str, int]


class CoreError(Exception):
    """A failure, with ``kind`` one of "missing", "init", "voice", "synth"."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class _EventId(ctypes.Union):
    _fields_ = [
        ("number", ctypes.c_int),  # WORD, SENTENCE, END
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
        ("sample", ctypes.c_int),  # sample index (documented "internal use")
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


_SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event)
)


def load_library(names: tuple[str, ...] = LIB_NAMES) -> ctypes.CDLL:
    """dlopen libespeak-ng (raises ``CoreError("missing")`` naming the Debian package)."""
    candidates = list(names)
    found = ctypes.util.find_library("espeak-ng")
    if found:
        candidates.append(found)
    errors = []
    for name in candidates:
        try:
            return ctypes.CDLL(name)
        except OSError as e:
            errors.append(str(e))
    raise CoreError(
        "missing",
        "speech synthesis for the synthetic corpus needs the libespeak-ng shared library, "
        f"which was not found ({'; '.join(errors[:1])}); " + DEBIAN_HINT,
    )


class EspeakCore:
    """One initialised libespeak-ng. Not thread-safe: the caller serialises all calls."""

    def __init__(self, names: tuple[str, ...] = LIB_NAMES) -> None:
        lib = load_library(names)
        self.lib = lib
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
        rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS,  # espeak_Synth returns after the last callback
            0,  # buffer length: espeak's default (200 ms of audio per callback)
            None,  # data path: the compiled-in default (/usr/lib/<arch>/espeak-ng-data)
            _INITIALIZE_PHONEME_EVENTS | _INITIALIZE_DONT_EXIT,
        )
        if rate <= 0:
            raise CoreError(
                "init",
                "libespeak-ng failed to initialise (is its data, espeak-ng-data, installed?); "
                + DEBIAN_HINT,
            )
        self.sample_rate = int(rate)
        self._pcm: list[bytes] = []
        self._events: list[RawEvent] = []
        # Keep a reference: ctypes frees the C thunk when the Python object dies.
        self._callback = _SynthCallback(self._on_synth)
        lib.espeak_SetSynthCallback(self._callback)

    def _on_synth(self, wav: Any, n: int, events: Any) -> int:
        if n > 0 and wav:
            self._pcm.append(ctypes.string_at(wav, 2 * n))
        i = 0
        while events[i].type != EVENT_LIST_TERMINATED:
            ev = events[i]
            name = ""
            number = 0
            if ev.type == EVENT_PHONEME:
                name = bytes(ev.id.string).split(b"\0", 1)[0].decode("utf-8", errors="replace")
            elif ev.type in (EVENT_WORD, EVENT_SENTENCE, EVENT_END):
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

    def synth(self, text: str, voice: str, rate: int, pitch: int) -> tuple[bytes, list[RawEvent]]:
        """Synthesise; returns (int16 little-endian PCM bytes, raw events in order)."""
        lib = self.lib
        if lib.espeak_SetVoiceByName(voice.encode("utf-8")) != _EE_OK:
            raise CoreError(
                "voice",
                f"espeak-ng has no voice {voice!r}; list them with 'espeak-ng --voices' "
                "(a variant is added with '+', e.g. 'en-us+f3')",
            )
        # Parameters are set after the voice: selecting a voice resets them.
        lib.espeak_SetParameter(_PARAM_RATE, rate, 0)
        lib.espeak_SetParameter(_PARAM_PITCH, pitch, 0)
        self._pcm, self._events = [], []
        data = text.encode("utf-8")
        buf = ctypes.create_string_buffer(data)
        # Synchronous mode: this returns after every sample and event has been delivered (and
        # espeak_Synchronize is not needed; it belongs to the asynchronous modes).
        err = lib.espeak_Synth(buf, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        pcm, events = b"".join(self._pcm), self._events
        self._pcm, self._events = [], []
        if err != _EE_OK:
            raise CoreError("synth", f"espeak_Synth failed with error {err} for {text[:60]!r}")
        return pcm, events


def main() -> int:
    """Child-process entry: one request on stdin, the answer on stdout (see module doc)."""
    out = sys.stdout.buffer
    try:
        req = json.loads(sys.stdin.buffer.read().decode("utf-8"))
        core = EspeakCore()
        pcm, events = core.synth(req["text"], req["voice"], int(req["rate"]), int(req["pitch"]))
    except CoreError as e:
        out.write(json.dumps({"ok": False, "kind": e.kind, "message": str(e)}).encode() + b"\n")
        return 0
    header = {
        "ok": True,
        "sample_rate": core.sample_rate,
        "n_samples": len(pcm) // 2,
        "events": events,
        "byteorder": sys.byteorder,
    }
    out.write(json.dumps(header).encode("utf-8") + b"\n")
    out.write(pcm)
    out.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
