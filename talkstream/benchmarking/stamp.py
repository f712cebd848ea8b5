"""Frame-index stamps: follow one image from the renderer to the screen of a real browser.

A benchmark writes each image's frame index into its top-left corner (12 black or white cells
of 16x16 px, one per bit, away from the face) before the image is sent; the page reads the
index back from every frame it presents (``requestVideoFrameCallback``). Cells that large
survive VP8 and H.264 at any bitrate aiortc uses, so "when did frame i appear" is exact, with
no threshold on pixel change. Only benchmarks stamp; what users are sent is never marked.
"""

from __future__ import annotations

import numpy as np

STAMP_BITS = 12
STAMP_CELL = 16
STAMP_MODULO = 1 << STAMP_BITS  # indices wrap every 4096 frames (164 s at 25 fps)


def stamp(img: np.ndarray, index: int) -> None:
    """Write ``index`` (mod 4096) into the top-left corner of an RGB image, in place."""
    need = (STAMP_CELL, STAMP_BITS * STAMP_CELL)
    if img.shape[0] < need[0] or img.shape[1] < need[1]:
        raise ValueError(f"image {img.shape[1]}x{img.shape[0]} too small for a frame stamp")
    for b in range(STAMP_BITS):
        img[:STAMP_CELL, b * STAMP_CELL : (b + 1) * STAMP_CELL] = 255 if index >> b & 1 else 0


def read_stamp(img: np.ndarray) -> int:
    """The index (mod 4096) stamped into an RGB or grey image: each cell's centre pixel."""
    c = STAMP_CELL // 2
    row = img[c, c::STAMP_CELL][:STAMP_BITS]
    bright = (row.mean(axis=-1) if row.ndim == 2 else row) > 128
    return int(sum(1 << b for b, on in enumerate(bright) if on))


def unwrap(stamps: np.ndarray, latest_index: int) -> np.ndarray:
    """Full indices from stamps read in presentation order (mod 4096), given the highest
    index sent by then: steps back of more than half the range are wraps."""
    s = np.asarray(stamps, dtype=np.int64)
    if s.size == 0:
        return s
    steps = np.diff(s)
    wraps = np.concatenate([[0], np.cumsum(steps < -STAMP_MODULO // 2)])
    full = s + wraps * STAMP_MODULO
    # Place the run so that its last index is the latest sent one's, or just before it.
    return full + (latest_index - full[-1]) // STAMP_MODULO * STAMP_MODULO


# A page function: from now on, record [presentation time (ms, performance.now() clock), stamp]
# of every frame the <video> presents into window.__stamps; window.__stampsOn = false stops it.
STAMP_PROBE_JS = f"""
(selector) => {{
  const v = document.querySelector(selector);
  const bits = {STAMP_BITS}, cell = {STAMP_CELL};
  const c = document.createElement("canvas");
  c.width = bits * cell; c.height = cell;
  const g = c.getContext("2d", {{ willReadFrequently: true }});
  window.__stamps = [];
  window.__stampsOn = true;
  const step = (now, meta) => {{
    if (!window.__stampsOn) return;
    g.drawImage(v, 0, 0, bits * cell, cell, 0, 0, bits * cell, cell);
    const px = g.getImageData(0, 0, bits * cell, cell).data;
    let idx = 0;
    for (let b = 0; b < bits; b++) {{
      const i = 4 * ((cell >> 1) * bits * cell + b * cell + (cell >> 1));
      if (px[i] > 128) idx |= 1 << b;
    }}
    window.__stamps.push([meta.expectedDisplayTime || now, idx]);
    v.requestVideoFrameCallback(step);
  }};
  v.requestVideoFrameCallback(step);
}}
"""

__all__ = ["STAMP_BITS", "STAMP_CELL", "STAMP_PROBE_JS", "read_stamp", "stamp", "unwrap"]
