"""Tests for the streaming log-mel frontend (talkstream.engine.audio)."""

from __future__ import annotations

import math
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from talkstream.config import AudioConfig
from talkstream.engine.audio import (
    AudioFileReader,
    MelFrontend,
    StreamingResampler,
    iter_audio_blocks,
    load_audio,
    log_mel,
    mel_filterbank,
    to_mono_float32,
)
from talkstream.errors import InputError

CFG = AudioConfig()
OUT_RATE_HZ = CFG.sample_rate_hz  # 16 kHz
N_MELS = CFG.n_mels  # 80
HOP = CFG.hop_samples  # 200


# --- helpers --------------------------------------------------------------------------------


def _speechlike(rate_hz: int, duration_s: float, channels: int | None, seed: int) -> np.ndarray:
    """Harmonics of a gliding pitch plus noise, float64 in about [-0.6, 0.6]."""
    rng = np.random.default_rng(seed)
    n = int(rate_hz * duration_s)
    t = np.arange(n) / rate_hz
    pitch_hz = 140.0 + 40.0 * np.sin(2.0 * np.pi * 1.3 * t)
    phase = 2.0 * np.pi * np.cumsum(pitch_hz) / rate_hz
    voiced = sum(np.sin(h * phase) / h for h in range(1, 12))
    mono = 0.25 * voiced + 0.05 * rng.standard_normal(n)
    if channels is None:
        return mono
    # Slightly different channels, so the downmix matters.
    return np.stack([mono * (1.0 - 0.1 * c) for c in range(channels)], axis=1)


def _chunk_sizes(spec: str, rate_hz: int, n: int) -> list[int]:
    """Chunk sizes (in input samples) covering ``n`` samples."""
    if spec == "random":
        rng = np.random.default_rng(1234)
        # 0 and 1-sample chunks included; up to 100 ms.
        sizes = [int(s) for s in rng.integers(0, rate_hz // 10, size=4 * n // (rate_hz // 20))]
        sizes[:6] = [0, 1, 1, 2, 0, 3]
    else:
        ms = int(spec.removesuffix("ms"))
        sizes = [rate_hz * ms // 1000] * (n // (rate_hz * ms // 1000) + 1)
    out, total = [], 0
    for s in sizes:
        if total >= n:
            break
        out.append(s)
        total += s
    if total < n:
        out.append(n - total)
    return out


def _stream(
    push: Callable[[np.ndarray], np.ndarray],
    flush: Callable[[], np.ndarray],
    data: np.ndarray,
    sizes: list[int],
) -> np.ndarray:
    parts, pos = [], 0
    for s in sizes:
        parts.append(push(data[pos : pos + s]))
        pos += s
    parts.append(flush())
    return np.concatenate(parts)


def _resample_whole(x: np.ndarray, in_rate_hz: int, out_rate_hz: int) -> np.ndarray:
    r = StreamingResampler(in_rate_hz, out_rate_hz)
    return np.concatenate([r.push(x), r.flush()])


# --- streamed == whole ----------------------------------------------------------------------

SOURCES = {
    # (rate, channels or None for 1-D, dtype)
    "16k-mono-float32": (16_000, None, np.float32),
    "48k-stereo-int16": (48_000, 2, np.int16),
    "44k1-mono-float64": (44_100, None, np.float64),
}


@pytest.mark.parametrize("chunking", ["10ms", "20ms", "37ms", "random"])
@pytest.mark.parametrize("source", list(SOURCES))
def test_streamed_frames_equal_whole_file(source: str, chunking: str) -> None:
    rate_hz, channels, dtype = SOURCES[source]
    signal = _speechlike(rate_hz, 1.3, channels, seed=7)
    pcm = (signal * 32767).astype(np.int16) if dtype == np.int16 else signal.astype(dtype)

    whole_16k = _resample_whole(to_mono_float32(pcm), rate_hz, OUT_RATE_HZ)
    expected = log_mel(whole_16k)

    frontend = MelFrontend()
    sizes = _chunk_sizes(chunking, rate_hz, pcm.shape[0])
    streamed = _stream(lambda chunk: frontend.push(chunk, rate_hz), frontend.flush, pcm, sizes)

    assert expected.shape == (math.ceil(whole_16k.shape[0] / HOP), N_MELS)
    assert streamed.dtype == np.float32
    assert streamed.shape == expected.shape
    np.testing.assert_array_equal(streamed, expected)  # bitwise
    assert frontend.frames_emitted == expected.shape[0]
    assert frontend.samples_received_16k == whole_16k.shape[0]
    # Not trivially equal: real spectra, well above the log floor (log(1e-5) = -11.5).
    assert np.isfinite(streamed).all()
    assert streamed.max() > -2.0
    assert streamed.std() > 1.0


def test_frames_are_emitted_as_soon_as_complete() -> None:
    # Frame i needs samples up to i*200 + 399 (16 kHz, no resampling).
    frontend = MelFrontend()
    x = _speechlike(16_000, 0.1, None, seed=3).astype(np.float32)
    assert frontend.push(x[:399], 16_000).shape == (0, N_MELS)
    assert frontend.push(x[399:400], 16_000).shape == (1, N_MELS)  # sample 399 arrived
    assert frontend.push(x[400:599], 16_000).shape == (0, N_MELS)
    assert frontend.push(x[599:600], 16_000).shape == (1, N_MELS)
    assert frontend.push(np.zeros(0, np.float32), 16_000).shape == (0, N_MELS)
    assert frontend.frames_emitted == 2
    assert frontend.latency_samples_16k == 400


def test_latency_includes_resampler_lookahead() -> None:
    frontend = MelFrontend()
    frontend.push(np.zeros(480, np.int16), 48_000)
    lookahead_in = StreamingResampler(48_000, 16_000).latency_samples
    assert lookahead_in > 0
    assert frontend.latency_samples_16k == 400 + math.ceil(lookahead_in / 3)


@pytest.mark.parametrize("n", [0, 1, 199, 200, 201, 399, 400, 401, 1000, 16_000, 16_001])
def test_frame_count(n: int) -> None:
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32) * 0.1
    expected_frames = math.ceil(n / HOP)
    assert log_mel(x).shape == (expected_frames, N_MELS)
    frontend = MelFrontend()
    streamed = _stream(lambda c: frontend.push(c, 16_000), frontend.flush, x, [77] * (n // 77 + 1))
    assert streamed.shape == (expected_frames, N_MELS)
    np.testing.assert_array_equal(streamed, log_mel(x))


def test_non_default_config_streams_identically() -> None:
    # Odd window, and a window shorter than the hop (samples between frames are skipped).
    x = _speechlike(16_000, 0.5, None, seed=5).astype(np.float32)
    for cfg in (
        AudioConfig(n_fft=401, hop_samples=160, n_mels=40),
        AudioConfig(n_fft=128, hop_samples=200, n_mels=16, fmax_hz=7000.0),
    ):
        frontend = MelFrontend(cfg)
        parts = [frontend.push(x[i : i + 13], 16_000) for i in range(0, x.shape[0], 13)]
        streamed = np.concatenate([*parts, frontend.flush()])
        expected = log_mel(x, cfg)
        assert expected.shape == (math.ceil(x.shape[0] / cfg.hop_samples), cfg.n_mels)
        np.testing.assert_array_equal(streamed, expected)


def test_streaming_memory_stays_flat() -> None:
    # 10 s of 48 kHz stereo in 20 ms chunks. Keeping the stream would take 640 kB at 16 kHz
    # float32; the frontend's buffers are fixed at construction, and a push allocates only
    # small temporaries.
    frontend = MelFrontend()
    rng = np.random.default_rng(0)
    chunk = (rng.standard_normal((960, 2)) * 3000).astype(np.int16)
    frontend.push(chunk, 48_000)  # warm up: filter tables, buffers
    tracemalloc.start()
    try:
        for _ in range(500):
            frontend.push(chunk, 48_000)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert frontend.frames_emitted > 790  # 10 s at 80 frames/s, minus the lookahead
    assert peak_bytes < 200_000


def test_flush_and_rate_errors() -> None:
    frontend = MelFrontend()
    frontend.push(np.zeros(960, np.int16), 48_000)
    with pytest.raises(ValueError, match=r"48000 Hz.*16000 Hz"):
        frontend.push(np.zeros(320, np.int16), 16_000)
    with pytest.raises(ValueError, match="positive integer"):
        MelFrontend().push(np.zeros(10, np.float32), 0)
    tail = frontend.flush()
    assert tail.shape == (math.ceil(320 / HOP), N_MELS)  # 960 samples at 48k -> 320 at 16k
    assert frontend.flush().shape == (0, N_MELS)  # a second flush is a no-op
    with pytest.raises(RuntimeError, match="after flush"):
        frontend.push(np.zeros(960, np.int16), 48_000)


def test_flush_without_push_gives_no_frames() -> None:
    frontend = MelFrontend()
    assert frontend.flush().shape == (0, N_MELS)
    assert frontend.frames_emitted == 0


# --- resampler ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("in_rate_hz", "out_rate_hz"),
    [(48_000, 16_000), (44_100, 16_000), (16_000, 48_000), (8_000, 16_000), (44_101, 16_000)],
)
def test_resampler_chunking_invariance(in_rate_hz: int, out_rate_hz: int) -> None:
    rng = np.random.default_rng(in_rate_hz)
    x = (rng.standard_normal(in_rate_hz // 2 + 123) * 0.3).astype(np.float32)
    whole = _resample_whole(x, in_rate_hz, out_rate_hz)
    assert whole.dtype == np.float32
    assert whole.shape == (math.ceil(x.shape[0] * out_rate_hz / in_rate_hz),)
    for sizes in (
        [1] * 300 + [x.shape[0]],
        [in_rate_hz // 100] * 60,
        [int(s) for s in rng.integers(0, 2000, size=200)],
    ):
        r = StreamingResampler(in_rate_hz, out_rate_hz)
        np.testing.assert_array_equal(_stream(r.push, r.flush, x, sizes), whole)


def test_resampler_keeps_a_1khz_sine() -> None:
    # The filter is symmetric around the exact output position: no delay, so the output
    # should be the same sine sampled at 16 kHz, to within 1% of its amplitude.
    t = np.arange(48_000) / 48_000
    x = (0.5 * np.sin(2.0 * np.pi * 1000.0 * t)).astype(np.float32)
    y = _resample_whole(x, 48_000, 16_000)
    assert y.shape == (16_000,)
    k = np.arange(16_000)
    ideal = 0.5 * np.sin(2.0 * np.pi * 1000.0 * k / 16_000)
    steady = slice(2000, 14_000)  # away from the zero padding at both ends
    assert np.abs(y[steady] - ideal[steady]).max() < 0.005
    rms = np.sqrt(np.mean(y[steady].astype(np.float64) ** 2))
    assert rms == pytest.approx(0.5 / np.sqrt(2.0), rel=0.01)
    # Frequency: the spectral peak of 0.75 s (1.33 Hz bins) is at 1000 Hz.
    segment = y[steady].astype(np.float64)
    spectrum = np.abs(np.fft.rfft(segment * np.hanning(segment.shape[0])))
    peak_hz = np.argmax(spectrum) * 16_000 / segment.shape[0]
    assert peak_hz == pytest.approx(1000.0, rel=0.01)


def test_resampler_attenuates_above_nyquist() -> None:
    # A 10 kHz tone cannot exist at 16 kHz; it would alias to 6 kHz if not filtered.
    t = np.arange(48_000) / 48_000
    x = (0.5 * np.sin(2.0 * np.pi * 10_000.0 * t)).astype(np.float32)
    y = _resample_whole(x, 48_000, 16_000)[2000:14_000].astype(np.float64)
    in_rms = 0.5 / np.sqrt(2.0)
    attenuation_db = 20.0 * np.log10(np.sqrt(np.mean(y**2)) / in_rms)
    assert attenuation_db < -40.0


def test_resampler_identity_and_validation() -> None:
    r = StreamingResampler(16_000, 16_000)
    assert r.latency_samples == 0
    x = np.array([0.1, -0.2, 0.3], dtype=np.float32)
    y = r.push(x)
    np.testing.assert_array_equal(y, x)
    assert y is not x
    assert r.flush().shape == (0,)
    for bad in (0, -16_000, 16_000.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            StreamingResampler(bad, 16_000)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        StreamingResampler(48_000, 16_000).push(np.zeros((10, 2), np.float32))
    done = StreamingResampler(48_000, 16_000)
    done.flush()
    with pytest.raises(RuntimeError, match="after flush"):
        done.push(np.zeros(10, np.float32))


# --- mel ------------------------------------------------------------------------------------


def test_mel_filterbank_shape_and_area() -> None:
    fb = mel_filterbank(CFG)
    assert fb.shape == (80, 401)
    assert fb.dtype == np.float64
    assert (fb >= 0.0).all()
    # Slaney area normalisation: every triangle has unit area in Hz (bins are 20 Hz apart).
    areas = fb.sum(axis=1) * (CFG.sample_rate_hz / CFG.n_fft)
    np.testing.assert_allclose(areas, 1.0, rtol=0.05)
    peaks = np.argmax(fb, axis=1)
    assert (np.diff(peaks) >= 0).all()
    assert fb[:, : int(55 / 20)].sum() == 0.0  # nothing below fmin = 55 Hz
    assert fb[:, int(np.ceil(7600 / 20)) + 1 :].sum() == 0.0  # nothing above fmax = 7600 Hz


def test_1khz_sine_peaks_in_the_right_mel_bin() -> None:
    # Slaney: mel(55 Hz) = 55 * 3 / 200 = 0.825; mel(7600 Hz) = 15 + 27 ln(7.6) / ln(6.4).
    # Centres are equally spaced in between (82 points, 80 inner); 1 kHz is 15 mel.
    mel_lo = 55.0 * 3.0 / 200.0
    mel_hi = 15.0 + 27.0 * np.log(7.6) / np.log(6.4)
    step = (mel_hi - mel_lo) / 81
    expected_bin = round((15.0 - mel_lo) / step) - 1
    assert expected_bin == 25  # centre 989.7 Hz; its neighbours sit at 953.8 and 1026.8 Hz
    t = np.arange(16_000) / 16_000
    x = (0.3 * np.sin(2.0 * np.pi * 1000.0 * t)).astype(np.float32)
    mel = log_mel(x)[10:-10]  # skip the edge frames
    assert (np.argmax(mel, axis=1) == expected_bin).all()
    # And the peak stands far above the far bands (the floor is log(1e-5) = -11.5).
    assert mel[:, expected_bin].mean() - mel[:, 70].mean() > 8.0


def test_log_mel_of_silence_is_the_floor() -> None:
    out = log_mel(np.zeros(1000, np.float32))
    assert out.shape == (5, N_MELS)
    np.testing.assert_array_equal(out, np.float32(np.log(CFG.log_floor)))


def test_log_mel_validation() -> None:
    with pytest.raises(TypeError, match="int16"):
        log_mel(np.zeros(100, np.int16))
    with pytest.raises(ValueError, match="shape"):
        log_mel(np.zeros((100, 2), np.float32))
    with pytest.raises(ValueError, match="fmax_hz"):
        mel_filterbank(AudioConfig(fmax_hz=9000.0))


# --- mono conversion ------------------------------------------------------------------------


def test_to_mono_scales_each_dtype() -> None:
    i16 = np.array([-32768, 0, 16384, 32767], dtype=np.int16)
    np.testing.assert_array_equal(
        to_mono_float32(i16), np.array([-1.0, 0.0, 0.5, 32767 / 32768], dtype=np.float32)
    )
    i32 = np.array([-(2**31), 2**30, 0], dtype=np.int32)
    np.testing.assert_array_equal(to_mono_float32(i32), np.array([-1.0, 0.5, 0.0], np.float32))
    f64 = np.array([0.25, -0.75], dtype=np.float64)
    out = to_mono_float32(f64)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.array([0.25, -0.75], np.float32))
    f32 = np.array([0.1, 0.2], dtype=np.float32)
    assert to_mono_float32(f32) is not f32


def test_to_mono_downmixes_channel_last() -> None:
    stereo = np.array([[16384, -16384], [32767, 32767], [0, 8192]], dtype=np.int16)
    np.testing.assert_array_equal(
        to_mono_float32(stereo), np.array([0.0, 32767 / 32768, 0.125], dtype=np.float32)
    )
    three = np.array([[0.3, 0.6, 0.9]], dtype=np.float32)
    np.testing.assert_allclose(to_mono_float32(three), [0.6], rtol=1e-6)
    # A strided (non-contiguous) view works too.
    wide = np.arange(12, dtype=np.float64).reshape(3, 4) / 16
    np.testing.assert_array_equal(to_mono_float32(wide[:, ::2]), np.array([1, 5, 9]) / 16)
    assert to_mono_float32(np.zeros((0, 2), np.int16)).shape == (0,)


def test_to_mono_errors() -> None:
    with pytest.raises(TypeError, match=r"uint8.*int16, int32, float32 or float64"):
        to_mono_float32(np.zeros(10, np.uint8))
    with pytest.raises(TypeError, match="numpy array"):
        to_mono_float32([0.0, 1.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"3-D shape \(2, 2, 2\)"):
        to_mono_float32(np.zeros((2, 2, 2), np.float32))
    with pytest.raises(ValueError, match="empty channel dimension"):
        to_mono_float32(np.zeros((10, 0), np.int16))
    with pytest.raises(ValueError, match="channel-last"):
        to_mono_float32(np.zeros((2, 960), np.int16))  # channel-first by mistake


# --- files ----------------------------------------------------------------------------------


@pytest.fixture
def stereo_wav(tmp_path: Path) -> tuple[Path, np.ndarray]:
    data = (_speechlike(44_100, 0.5, 2, seed=11) * 0.8).astype(np.float32)
    path = tmp_path / "voice.wav"
    sf.write(path, data, 44_100, subtype="FLOAT")  # float WAV: read back bit-exactly
    return path, data


def test_audio_file_reader(stereo_wav: tuple[Path, np.ndarray]) -> None:
    path, data = stereo_wav
    with AudioFileReader(path) as reader:
        assert reader.sample_rate_hz == 44_100
        assert reader.num_frames == 22_050
        assert reader.channels == 2
        assert reader.duration_s == pytest.approx(0.5)
        blocks = list(reader.blocks(4096))
        assert [b.shape for b in blocks] == [(4096, 2)] * 5 + [(22_050 - 5 * 4096, 2)]
        assert all(b.dtype == np.float32 for b in blocks)
        np.testing.assert_array_equal(np.concatenate(blocks), data)
        # blocks() starts over from the beginning each time.
        np.testing.assert_array_equal(next(reader.blocks(10)), data[:10])
    with pytest.raises(RuntimeError, match="closed"):
        next(reader.blocks(10))

    loaded, rate_hz = load_audio(str(path))
    assert rate_hz == 44_100
    assert loaded.shape == (22_050, 2)
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, data)
    np.testing.assert_array_equal(np.concatenate(list(iter_audio_blocks(path, 1000))), data)


def test_file_to_frames_matches_whole(stereo_wav: tuple[Path, np.ndarray]) -> None:
    path, data = stereo_wav
    frontend = MelFrontend()
    with AudioFileReader(path) as reader:
        parts = [frontend.push(block, reader.sample_rate_hz) for block in reader.blocks(1234)]
    parts.append(frontend.flush())
    expected = log_mel(_resample_whole(to_mono_float32(data), 44_100, 16_000))
    assert expected.shape == (40, N_MELS)  # 8000 samples at 16 kHz
    np.testing.assert_array_equal(np.concatenate(parts), expected)


def test_audio_file_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.wav"
    with pytest.raises(InputError, match=r"not found: .*nope\.wav"):
        AudioFileReader(missing)
    with pytest.raises(InputError, match="not found"):
        load_audio(missing)
    with pytest.raises(InputError, match="not found"):
        iter_audio_blocks(missing, 1024)  # raised at the call, not at the first next()

    text = tmp_path / "notes.txt"
    text.write_text("this is not audio\n" * 20)
    with pytest.raises(InputError, match=r"notes\.txt.*as audio") as info:
        AudioFileReader(text)
    assert isinstance(info.value, ValueError)  # TalkstreamError derives from ValueError

    with pytest.raises(InputError, match="is a directory"):
        AudioFileReader(tmp_path)

    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros((0, 1), np.float32), 16_000)
    with pytest.raises(InputError, match=r"empty\.wav.*no audio samples"):
        load_audio(empty)

    good = tmp_path / "ok.wav"
    sf.write(good, np.zeros((100, 1), np.float32), 16_000)
    with AudioFileReader(good) as reader, pytest.raises(ValueError, match="block_frames"):
        next(reader.blocks(0))
