"""Frame-index stamps survive a real VP8 encoder and unwrap to the indices that were sent."""

from __future__ import annotations

import fractions

import numpy as np
import pytest

from talkstream.benchmarking.stamp import STAMP_MODULO, read_stamp, stamp, unwrap


def test_stamp_reads_back_and_leaves_the_rest_of_the_image() -> None:
    img = np.full((48, 640, 3), 77, np.uint8)
    stamp(img, 2901)
    assert read_stamp(img) == 2901
    assert read_stamp(img[..., 1]) == 2901  # grey
    assert (img[16:] == 77).all() and (img[:, 192:] == 77).all()
    stamp(img, 2901 + STAMP_MODULO)
    assert read_stamp(img) == 2901
    with pytest.raises(ValueError, match="too small"):
        stamp(np.zeros((8, 640, 3), np.uint8), 1)


def test_stamps_survive_vp8_at_a_low_bitrate() -> None:
    av = pytest.importorskip("av")
    enc = av.CodecContext.create("libvpx", "w")
    enc.width, enc.height, enc.pix_fmt = 640, 480, "yuv420p"
    enc.bit_rate = 150_000  # a third of aiortc's starting VP8 bitrate
    enc.time_base = fractions.Fraction(1, 25)
    dec = av.CodecContext.create("vp8", "r")
    rng = np.random.default_rng(0)
    sent = [4000 + 7 * i for i in range(40)]
    got: list[int] = []

    def drain(packets: list) -> None:
        for pkt in packets:
            got.extend(read_stamp(f.to_ndarray(format="rgb24")) for f in dec.decode(pkt))

    for i, index in enumerate(sent):
        img = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)  # worst case: noise
        stamp(img, index)
        frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p")
        frame.pts = i
        drain(enc.encode(frame))
    drain(enc.encode(None))
    assert got == [i % STAMP_MODULO for i in sent]


def test_unwrap_places_the_run_before_the_latest_index_sent() -> None:
    sent = np.arange(8180, 8200)
    assert unwrap(sent % STAMP_MODULO, 8203).tolist() == sent.tolist()
    # Repeats and skips, across a wrap.
    seen = np.array([4094, 4095, 4095, 1, 2], dtype=np.int64)
    assert unwrap(seen, 4096 + 5).tolist() == [4094, 4095, 4095, 4097, 4098]
    assert unwrap(np.array([], dtype=np.int64), 10).size == 0
