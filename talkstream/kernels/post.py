"""Post-processing after the denoiser: paste the face crop back, convert to I420 for the encoder.

One code path for numpy (CPU) and CuPy (GPU): every function takes the array module from its
inputs (:func:`get_array_module`) and uses only operations both modules share. CuPy is imported
lazily and only when a CuPy array is passed in, so the CPU install never needs it. For a GPU
without CuPy, :func:`paste_back_torch` and :func:`rgb_to_i420_torch` do the same arithmetic on
torch tensors of any device (``talkstream.engine.compose`` picks the path from the frame's device).

The paste-back geometry (which crop pixels land on which frame pixels, and the feathered mask
resampled into the frame) depends only on the avatar, so it is computed once into a
:class:`PasteMap`; per frame, pasting is a gather, a weighted sum and a blend over the face's
bounding box.

Pixel convention: pixel ``i`` is centred on coordinate ``i`` in both the frame and the crop.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

# BT.601, limited ("video") range: Y in [16, 235], Cb/Cr in [16, 240]. Rows: Y, Cb, Cr;
# columns: R, G, B; applied to 8-bit values (hence the /255).
_BT601_LIMITED = (
    np.array(
        [
            [65.481, 128.553, 24.966],
            [-37.797, -74.203, 112.0],
            [112.0, -93.786, -18.214],
        ],
        dtype=np.float64,
    )
    / 255.0
)
_BT601_OFFSET = (16.0, 128.0, 128.0)
# Pixels per band in the CPU path of rgb_to_i420: ~200 KiB of float32 RGB, cache-sized.
_CPU_BAND_PIXELS = 16_384


def get_array_module(a: Any) -> ModuleType:
    """Return ``cupy`` if ``a`` is a CuPy array, else ``numpy``.

    Decided from the array's type, so numpy callers never import CuPy (a slow import that
    also needs a CUDA driver to be useful).
    """
    if type(a).__module__.split(".", 1)[0] == "cupy":
        import cupy  # lazy: optional, GPU only

        return cupy
    return np


def _to_module(a: Any, xp: ModuleType) -> Any:
    """Copy ``a`` into array module ``xp`` (numpy <-> cupy)."""
    if xp is np:
        if isinstance(a, np.ndarray):
            return a.copy()
        return a.get()  # cupy -> host
    return xp.array(a, copy=True)


def bilinear_taps(
    x: np.ndarray, y: np.ndarray, width: int, height: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear sampling taps of points ``(x, y)`` on a ``height`` x ``width`` grid.

    Indices are clamped to the grid, so sampling with them replicates the border for points
    outside it; ``inside`` tells which points lie within the pixel-centre hull
    ``[0, width-1] x [0, height-1]``.

    Args:
        x, y: sample coordinates, any matching shape ``(...)`` (numpy).
        width, height: grid size in pixels (at least 1 each).

    Returns:
        ``(index, weight, inside)``: int32 ``(4, N)`` flat indices ``row * width + col``
        (top-left, top-right, bottom-left, bottom-right), float32 ``(4, N)`` weights summing
        to 1, bool ``(N,)``; ``N = x.size``.
    """
    if width < 1 or height < 1:
        raise ValueError(f"grid must be at least 1x1, got width={width} height={height}")
    xf = np.asarray(x, dtype=np.float64).reshape(-1)  # (N,)
    yf = np.asarray(y, dtype=np.float64).reshape(-1)  # (N,)
    if xf.shape != yf.shape:
        raise ValueError(f"x and y must have the same size, got {xf.size} and {yf.size}")
    inside = (xf >= 0) & (xf <= width - 1) & (yf >= 0) & (yf <= height - 1)  # (N,)
    # Clamp before floor: far-away points must not overflow int32, and a point on or
    # beyond the last column gets fx = 0 on the clamped column (border replicate).
    xc = np.clip(xf, 0.0, width - 1)
    yc = np.clip(yf, 0.0, height - 1)
    x0 = np.minimum(np.floor(xc), max(width - 2, 0)).astype(np.int64)  # (N,)
    y0 = np.minimum(np.floor(yc), max(height - 2, 0)).astype(np.int64)  # (N,)
    fx = xc - x0  # (N,) in [0, 1]
    fy = yc - y0
    x1 = np.minimum(x0 + 1, width - 1)
    y1 = np.minimum(y0 + 1, height - 1)
    index = np.stack([y0 * width + x0, y0 * width + x1, y1 * width + x0, y1 * width + x1])
    weight = np.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy])
    return index.astype(np.int32), weight.astype(np.float32), inside  # (4, N), (4, N), (N,)


@dataclass
class PasteMap:
    """Precomputed geometry for pasting a face crop back into frames of one size.

    Attributes:
        bbox: ``(y0, y1, x0, x1)``, the half-open frame region the paste can change (pixels
            where the mask is non-zero); empty (``y0 == y1``) if the face is off-frame.
        src_index: int32 ``(4, h*w)`` flat indices into the ``S*S`` crop, bilinear taps of
            each bbox pixel, row-major over the bbox.
        src_weight: float32 ``(4, h*w)`` bilinear weights.
        alpha: float32 ``(h, w, 1)`` paste-back mask sampled into frame pixels, in [0, 1];
            0 where the pixel maps outside the crop.
        frame_hw: ``(H, W)`` of the frames this map is for.
        crop_size: ``S``, the side of the square crop.
    """

    bbox: tuple[int, int, int, int]
    src_index: Any
    src_weight: Any
    alpha: Any
    frame_hw: tuple[int, int]
    crop_size: int

    def to(self, xp: ModuleType) -> PasteMap:
        """Return a copy with the arrays in array module ``xp`` (``numpy`` or ``cupy``)."""
        return PasteMap(
            bbox=self.bbox,
            src_index=_to_module(self.src_index, xp),
            src_weight=_to_module(self.src_weight, xp),
            alpha=_to_module(self.alpha, xp),
            frame_hw=self.frame_hw,
            crop_size=self.crop_size,
        )

    def to_torch(self, device: Any) -> PasteMap:
        """Return a copy with the arrays as torch tensors on ``device`` (for
        :func:`paste_back_torch`); ``src_index`` becomes int64, the index type torch gathers with.
        """
        import torch  # lazy: this module stays importable without torch

        def tensor(a: Any, dtype: Any) -> Any:
            host = a.get() if get_array_module(a) is not np else np.asarray(a)
            return torch.as_tensor(np.array(host), dtype=dtype, device=device)

        return PasteMap(
            bbox=self.bbox,
            src_index=tensor(self.src_index, torch.int64),
            src_weight=tensor(self.src_weight, torch.float32),
            alpha=tensor(self.alpha, torch.float32),
            frame_hw=self.frame_hw,
            crop_size=self.crop_size,
        )


def _check_affine(m: Any, name: str) -> np.ndarray:
    arr = np.asarray(m, dtype=np.float64)
    if arr.shape != (2, 3):
        raise ValueError(f"{name} must be a (2, 3) affine matrix, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} has non-finite entries: {arr.tolist()}")
    if abs(np.linalg.det(arr[:, :2])) < 1e-12:
        raise ValueError(f"{name} is singular (not invertible): {arr.tolist()}")
    return arr


def invert_affine(m: np.ndarray) -> np.ndarray:
    """Inverse of a (2, 3) affine map ``p' = m[:, :2] @ p + m[:, 2]``, as a (2, 3) float64."""
    a = _check_affine(m, "affine")
    lin_inv = np.linalg.inv(a[:, :2])  # (2, 2)
    return np.concatenate([lin_inv, -lin_inv @ a[:, 2:]], axis=1)  # (2, 3)


def build_paste_map(
    frame_hw: tuple[int, int], frame_to_crop: np.ndarray, crop_mask: np.ndarray
) -> PasteMap:
    """Precompute where the crop lands in the frame (numpy; move it with :meth:`PasteMap.to`).

    Args:
        frame_hw: ``(H, W)`` of the full frames.
        frame_to_crop: (2, 3) affine mapping frame pixel ``(x, y)`` to crop pixel ``(x, y)``.
        crop_mask: (S, S) paste-back mask in crop space, values in [0, 1].

    Returns:
        The :class:`PasteMap`, with its bbox trimmed to frame pixels of non-zero alpha.
    """
    if len(frame_hw) != 2 or min(int(frame_hw[0]), int(frame_hw[1])) < 1:
        raise ValueError(f"frame_hw must be (H, W) with H, W >= 1, got {frame_hw}")
    h_frame, w_frame = int(frame_hw[0]), int(frame_hw[1])
    a = _check_affine(frame_to_crop, "frame_to_crop")
    mask = np.asarray(crop_mask)
    if mask.ndim != 2 or mask.shape[0] != mask.shape[1] or mask.shape[0] < 2:
        raise ValueError(f"crop_mask must be a square (S, S) array, got shape {mask.shape}")
    if not np.issubdtype(mask.dtype, np.floating):
        raise TypeError(f"crop_mask must be floating point in [0, 1], got dtype {mask.dtype}")
    s = mask.shape[0]

    # Frame bbox of the crop square (pixel edges at -0.5 and S-0.5), from its four corners.
    inv = invert_affine(a)
    corners = np.array([[-0.5, -0.5], [s - 0.5, -0.5], [-0.5, s - 0.5], [s - 0.5, s - 0.5]])
    fc = corners @ inv[:, :2].T + inv[:, 2]  # (4, 2) frame (x, y)
    x0 = int(np.clip(np.floor(fc[:, 0].min()), 0, w_frame))
    x1 = int(np.clip(np.ceil(fc[:, 0].max()) + 1, 0, w_frame))
    y0 = int(np.clip(np.floor(fc[:, 1].min()), 0, h_frame))
    y1 = int(np.clip(np.ceil(fc[:, 1].max()) + 1, 0, h_frame))

    def empty() -> PasteMap:
        return PasteMap(
            bbox=(0, 0, 0, 0),
            src_index=np.zeros((4, 0), np.int32),
            src_weight=np.zeros((4, 0), np.float32),
            alpha=np.zeros((0, 0, 1), np.float32),
            frame_hw=(h_frame, w_frame),
            crop_size=s,
        )

    if x1 <= x0 or y1 <= y0:
        return empty()

    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float64)  # (h, w) each
    u = a[0, 0] * xs + a[0, 1] * ys + a[0, 2]  # (h, w) crop x
    v = a[1, 0] * xs + a[1, 1] * ys + a[1, 2]  # (h, w) crop y
    index, weight, inside = bilinear_taps(u, v, s, s)  # (4, N), (4, N), (N,)
    m_flat = mask.astype(np.float32).reshape(-1)  # (S*S,)
    alpha = (weight * m_flat[index]).sum(axis=0)  # (N,)
    alpha = np.where(inside, np.clip(alpha, 0.0, 1.0), 0.0).reshape(ys.shape)  # (h, w)

    # Trim to the pixels the paste can change: per-frame work scales with the bbox.
    rows = np.flatnonzero(alpha.any(axis=1))
    cols = np.flatnonzero(alpha.any(axis=0))
    if rows.size == 0:
        return empty()
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    h, w = ys.shape
    keep = np.zeros((h, w), dtype=bool)
    keep[r0:r1, c0:c1] = True
    keep_flat = keep.reshape(-1)
    return PasteMap(
        bbox=(y0 + r0, y0 + r1, x0 + c0, x0 + c1),
        src_index=np.ascontiguousarray(index[:, keep_flat]),  # (4, h'*w')
        src_weight=np.ascontiguousarray(weight[:, keep_flat]),  # (4, h'*w')
        alpha=np.ascontiguousarray(alpha[r0:r1, c0:c1, None], dtype=np.float32),  # (h', w', 1)
        frame_hw=(h_frame, w_frame),
        crop_size=s,
    )


def _check_image(a: Any, name: str, *, dtypes: tuple[str, ...] = ("uint8",)) -> None:
    shape = getattr(a, "shape", None)
    dtype = getattr(a, "dtype", None)
    if shape is None or dtype is None:
        raise TypeError(f"{name} must be a numpy or cupy array, got {type(a).__name__}")
    if len(shape) != 3 or shape[2] != 3:
        raise ValueError(f"{name} must have shape (H, W, 3), got {tuple(shape)}")
    if str(dtype) not in dtypes:
        raise TypeError(f"{name} must have dtype {' or '.join(dtypes)}, got {dtype}")


def _check_paste_shapes(background: Any, face: Any, pmap: PasteMap) -> int:
    """The frame and face sizes ``pmap`` was built for; returns its crop size."""
    h_frame, w_frame = int(background.shape[0]), int(background.shape[1])
    if (h_frame, w_frame) != tuple(pmap.frame_hw):
        raise ValueError(
            f"background is {h_frame}x{w_frame} but the paste map was built for "
            f"{pmap.frame_hw[0]}x{pmap.frame_hw[1]} frames"
        )
    s = pmap.crop_size
    if tuple(face.shape) != (s, s, 3):
        raise ValueError(f"face must have shape ({s}, {s}, 3) for this paste map, got {face.shape}")
    return s


def paste_back(
    background: Any,
    face: Any,
    pmap: PasteMap,
    out: Any = None,
    *,
    out_has_background: bool = False,
) -> Any:
    """Blend a generated face crop into a full frame.

    ``out = alpha * bilinear(face) + (1 - alpha) * background`` inside ``pmap.bbox``,
    ``background`` elsewhere; rounded to nearest and clipped to uint8.

    Args:
        background: (H, W, 3) uint8 frame (numpy or cupy).
        face: (S, S, 3) crop, uint8 or float32 with values in [0, 255], same array module.
        pmap: the avatar's paste map, its arrays in the same array module (:meth:`PasteMap.to`).
        out: optional (H, W, 3) uint8 C-contiguous destination, written in place (may be
            ``background`` itself).
        out_has_background: ``out`` already holds ``background`` outside the bbox (e.g. a
            buffer reused across frames of a still background): only the bbox is written.

    Returns:
        ``out``, or a new array if ``out`` was None.
    """
    xp = get_array_module(background)
    _check_image(background, "background")
    _check_image(face, "face", dtypes=("uint8", "float32"))
    if get_array_module(face) is not xp:
        raise TypeError(
            f"face is a {get_array_module(face).__name__} array but background is a "
            f"{xp.__name__} array: use one array module"
        )
    if get_array_module(pmap.alpha) is not xp:
        raise TypeError(
            f"pmap arrays are not {xp.__name__} arrays: call pmap.to({xp.__name__}) once first"
        )
    s = _check_paste_shapes(background, face, pmap)
    if out is None:
        out = background.copy()
    else:
        if get_array_module(out) is not xp:
            raise TypeError(f"out must be a {xp.__name__} array like background")
        _check_image(out, "out")
        if tuple(out.shape) != tuple(background.shape):
            raise ValueError(
                f"out must have the background's shape {tuple(background.shape)}, "
                f"got {tuple(out.shape)}"
            )
        if not out_has_background and out is not background:
            out[...] = background

    y0, y1, x0, x1 = pmap.bbox
    if y1 <= y0 or x1 <= x0:
        return out
    face_flat = face.reshape(s * s, 3).astype(xp.float32, copy=False)  # (S*S, 3)
    # Gather the 4 taps and weight them: (4, N, 3) -> (N, 3). One fused expression keeps the
    # code identical for numpy and cupy.
    taps = face_flat[pmap.src_index]  # (4, N, 3)
    sampled = (taps * pmap.src_weight[:, :, None]).sum(axis=0)  # (N, 3)
    sampled = sampled.reshape(y1 - y0, x1 - x0, 3)  # (h, w, 3)
    bg = background[y0:y1, x0:x1].astype(xp.float32)  # (h, w, 3)
    blended = bg + pmap.alpha * (sampled - bg)  # (h, w, 3)
    out[y0:y1, x0:x1] = xp.clip(xp.rint(blended), 0, 255).astype(xp.uint8)
    return out


def rgb_to_i420(rgb: Any, out: Any = None) -> Any:
    """Convert RGB to planar I420 (YUV 4:2:0), BT.601 limited range, for the video encoder.

    Chroma is the 2x2 average (centred siting, as swscale's default). Works on numpy and cupy.

    Args:
        rgb: (H, W, 3) uint8, H and W even.
        out: optional (H * 3 // 2, W) uint8 C-contiguous destination: the Y plane (H rows),
            then the U and V planes (H/2 x W/2 each) packed row-major after it, the layout of
            PyAV's ``yuv420p`` ``to_ndarray``.

    Returns:
        ``out``, or a new (H * 3 // 2, W) uint8 array.
    """
    xp = get_array_module(rgb)
    _check_image(rgb, "rgb")
    h, w = int(rgb.shape[0]), int(rgb.shape[1])
    if h % 2 or w % 2:
        raise ValueError(f"I420 needs even height and width, got rgb of shape {tuple(rgb.shape)}")
    if out is None:
        out = xp.empty((h * 3 // 2, w), dtype=xp.uint8)
    else:
        if get_array_module(out) is not xp:
            raise TypeError(f"out must be a {xp.__name__} array like rgb")
        if tuple(out.shape) != (h * 3 // 2, w) or str(out.dtype) != "uint8":
            raise ValueError(
                f"out must be ({h * 3 // 2}, {w}) uint8, got {tuple(out.shape)} {out.dtype}"
            )
        if not out.flags.c_contiguous:
            raise ValueError(
                "out must be C-contiguous (the planes are written through a flat view)"
            )
    m = xp.asarray(_BT601_LIMITED, dtype=xp.float32)  # (3, 3)
    m_c = m[1:] * 0.25  # (2, 3): Cb, Cr rows, with the /4 of the 2x2 mean folded in
    y_plane = out.reshape(-1)[: h * w].reshape(h, w)  # views: out is C-contiguous
    n_c = (h // 2) * (w // 2)
    u_plane = out.reshape(-1)[h * w : h * w + n_c].reshape(h // 2, w // 2)
    v_plane = out.reshape(-1)[h * w + n_c :].reshape(h // 2, w // 2)
    # On the CPU, work in bands of rows: the float temporaries then stay in cache and are
    # not freshly mapped pages each call (3x faster at 720p). On the GPU one band is best
    # (fewer kernel launches). The code is the same either way.
    band = h if xp is not np else max(2, (_CPU_BAND_PIXELS // w) & ~1)
    for r0 in range(0, h, band):
        r1 = min(h, r0 + band)
        f = rgb[r0:r1].astype(xp.float32)  # (b, W, 3)
        y = f @ m[0] + _BT601_OFFSET[0]  # (b, W)
        y_plane[r0:r1] = xp.clip(xp.rint(y), 0, 255).astype(xp.uint8)
        # Sum RGB over 2x2 blocks first (the matrix is linear, so this equals averaging
        # Cb/Cr) and convert only a quarter of the pixels. Strided adds rather than
        # reshape(...).mean(axis=(1, 3)): numpy's strided mean is ~10x slower.
        rows = f[0::2] + f[1::2]  # (b/2, W, 3)
        quad = rows[:, 0::2] + rows[:, 1::2]  # (b/2, W/2, 3), 4x the block mean
        u = quad @ m_c[0] + _BT601_OFFSET[1]  # (b/2, W/2)
        v = quad @ m_c[1] + _BT601_OFFSET[2]  # (b/2, W/2)
        u_plane[r0 // 2 : r1 // 2] = xp.clip(xp.rint(u), 0, 255).astype(xp.uint8)
        v_plane[r0 // 2 : r1 // 2] = xp.clip(xp.rint(v), 0, 255).astype(xp.uint8)
    return out


# --- torch (any device) ------------------------------------------------------------------------
#
# The same arithmetic as paste_back and rgb_to_i420, in torch: the GPU path when CuPy is not
# installed (a torch CUDA tensor never leaves the device). Sums are spelled out in numpy's order
# (the 4 taps left to right, R + G + B), so on the CPU the result equals numpy's bit for bit;
# on a GPU float rounding may differ by one level.


def _is_torch(a: Any) -> bool:
    return type(a).__module__.split(".", 1)[0] == "torch"


def _check_tensor_image(a: Any, name: str, *, dtypes: tuple[str, ...] = ("torch.uint8",)) -> None:
    if not _is_torch(a):
        raise TypeError(f"{name} must be a torch tensor, got {type(a).__name__}")
    if a.dim() != 3 or a.shape[2] != 3:
        raise ValueError(f"{name} must have shape (H, W, 3), got {tuple(a.shape)}")
    if str(a.dtype) not in dtypes:
        raise TypeError(f"{name} must have dtype {' or '.join(dtypes)}, got {a.dtype}")


def paste_back_torch(
    background: Any,
    face: Any,
    pmap: PasteMap,
    out: Any = None,
    *,
    out_has_background: bool = False,
) -> Any:
    """:func:`paste_back` for torch tensors (any device, all on the same one).

    Args:
        background: (H, W, 3) uint8 tensor.
        face: (S, S, 3) uint8 or float32 tensor with values in [0, 255].
        pmap: the avatar's paste map as tensors on the same device (:meth:`PasteMap.to_torch`).
        out: optional (H, W, 3) uint8 destination tensor (may be ``background`` itself).
        out_has_background: ``out`` already holds ``background`` outside the bbox.

    Returns:
        ``out``, or a new tensor if ``out`` was None.
    """
    import torch

    _check_tensor_image(background, "background")
    _check_tensor_image(face, "face", dtypes=("torch.uint8", "torch.float32"))
    if not _is_torch(pmap.alpha):
        raise TypeError("pmap arrays are not torch tensors: call pmap.to_torch(device) once first")
    for name, a in (("face", face), ("pmap", pmap.alpha)):
        if a.device != background.device:
            raise ValueError(f"{name} is on {a.device} but background is on {background.device}")
    s = _check_paste_shapes(background, face, pmap)
    if out is None:
        out = background.clone()
    else:
        _check_tensor_image(out, "out")
        if tuple(out.shape) != tuple(background.shape) or out.device != background.device:
            raise ValueError(
                f"out must be a {tuple(background.shape)} tensor on {background.device}, "
                f"got {tuple(out.shape)} on {out.device}"
            )
        if not out_has_background and out is not background:
            out.copy_(background)

    y0, y1, x0, x1 = pmap.bbox
    if y1 <= y0 or x1 <= x0:
        return out
    face_flat = face.reshape(s * s, 3).to(torch.float32)  # (S*S, 3)
    w = pmap.src_weight[:, :, None]  # (4, N, 1)
    taps = face_flat[pmap.src_index]  # (4, N, 3)
    sampled = taps[0] * w[0] + taps[1] * w[1]  # (N, 3)
    sampled = sampled + taps[2] * w[2]
    sampled = sampled + taps[3] * w[3]
    sampled = sampled.reshape(y1 - y0, x1 - x0, 3)  # (h, w, 3)
    bg = background[y0:y1, x0:x1].to(torch.float32)  # (h, w, 3)
    blended = bg + pmap.alpha * (sampled - bg)  # (h, w, 3)
    out[y0:y1, x0:x1] = torch.round(blended).clamp_(0, 255).to(torch.uint8)
    return out


def rgb_to_i420_torch(rgb: Any, out: Any = None) -> Any:
    """:func:`rgb_to_i420` for a torch tensor (any device): (H, W, 3) uint8, H and W even.

    Args:
        rgb: (H, W, 3) uint8 tensor (a strided view, e.g. an even-sized slice, is fine).
        out: optional (H * 3 // 2, W) uint8 contiguous tensor on the same device.

    Returns:
        ``out``, or a new (H * 3 // 2, W) uint8 tensor: the Y plane, then U and V packed.
    """
    import torch

    _check_tensor_image(rgb, "rgb")
    h, w = int(rgb.shape[0]), int(rgb.shape[1])
    if h % 2 or w % 2:
        raise ValueError(f"I420 needs even height and width, got rgb of shape {tuple(rgb.shape)}")
    if out is None:
        out = torch.empty((h * 3 // 2, w), dtype=torch.uint8, device=rgb.device)
    elif (
        not _is_torch(out)
        or tuple(out.shape) != (h * 3 // 2, w)
        or out.dtype != torch.uint8
        or out.device != rgb.device
        or not out.is_contiguous()
    ):
        raise ValueError(
            f"out must be a contiguous ({h * 3 // 2}, {w}) uint8 tensor on {rgb.device}"
        )
    m = _M.tolist()  # float32 coefficients, as python floats (exact)
    m_c = _M_C.tolist()
    n_c = (h // 2) * (w // 2)
    flat = out.view(-1)
    y_plane = flat[: h * w].view(h, w)
    u_plane = flat[h * w : h * w + n_c].view(h // 2, w // 2)
    v_plane = flat[h * w + n_c :].view(h // 2, w // 2)
    f = rgb.to(torch.float32)  # (H, W, 3)
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    y = r * m[0][0] + g * m[0][1] + b * m[0][2] + _BT601_OFFSET[0]  # (H, W)
    y_plane.copy_(torch.round(y).clamp_(0, 255))
    rows = f[0::2] + f[1::2]  # (H/2, W, 3)
    quad = rows[:, 0::2] + rows[:, 1::2]  # (H/2, W/2, 3), 4x the block mean
    qr, qg, qb = quad[..., 0], quad[..., 1], quad[..., 2]
    u = qr * m_c[0][0] + qg * m_c[0][1] + qb * m_c[0][2] + _BT601_OFFSET[1]
    v = qr * m_c[1][0] + qg * m_c[1][1] + qb * m_c[1][2] + _BT601_OFFSET[2]
    u_plane.copy_(torch.round(u).clamp_(0, 255))
    v_plane.copy_(torch.round(v).clamp_(0, 255))
    return out


# --- fused paste-back + I420 (CuPy raw kernel) --------------------------------------------------
#
# On a GPU the two functions above are two passes over the frame: paste_back reads the background
# and writes the RGB frame, rgb_to_i420 reads that frame again and writes the planes. For the
# encoder only the planes matter, so one kernel does both: each thread takes one 2x2 block, pastes
# its four pixels (bilinear taps, alpha blend, rounding: the same float32 arithmetic as
# paste_back, with no fused multiply-adds so the rounding matches), writes their Y and the
# block's U and V, and writes RGB only if asked. On the CPU numpy gains nothing from fusing (its
# temporaries dominate), so there the function runs the two passes.


def _f32(v: float) -> str:
    return f"{float(np.float32(v))!r}f"


_M = _BT601_LIMITED.astype(np.float32)
_M_C = _M[1:] * np.float32(0.25)
PASTE_I420_KERNEL = "paste_back_i420"
_PASTE_I420_SOURCE = (
    r"""
extern "C" __global__ void paste_back_i420(
    const unsigned char* __restrict__ bg,     // (H, W, 3) background
    const float* __restrict__ face,           // (S*S, 3) crop, values in [0, 255]
    const int* __restrict__ src_index,        // (4, N) taps into the crop, N = bh * bw
    const float* __restrict__ src_weight,     // (4, N) bilinear weights
    const float* __restrict__ alpha,          // (bh, bw) paste mask
    const int H, const int W,
    const int y0, const int y1, const int x0, const int x1,
    unsigned char* __restrict__ yuv,          // (H * 3 / 2, W): Y, U, V planes
    unsigned char* __restrict__ rgb_out,      // (H, W, 3), or null: planes only
    const int write_rgb)
{
    const int bx = blockIdx.x * blockDim.x + threadIdx.x;  // 2x2 block column
    const int by = blockIdx.y * blockDim.y + threadIdx.y;  // 2x2 block row
    const int hw = W / 2, hh = H / 2;
    if (bx >= hw || by >= hh) return;
    const int bw = x1 - x0;
    const int n_px = (y1 - y0) * bw;
    float px[2][2][3];
    for (int dy = 0; dy < 2; ++dy) {
        for (int dx = 0; dx < 2; ++dx) {
            const int y = 2 * by + dy, x = 2 * bx + dx;
            const unsigned char* p = bg + ((size_t)y * W + x) * 3;
            float c[3] = {(float)p[0], (float)p[1], (float)p[2]};
            if (y >= y0 && y < y1 && x >= x0 && x < x1) {
                const int n = (y - y0) * bw + (x - x0);
                const float a = alpha[n];
                for (int ch = 0; ch < 3; ++ch) {
                    float s = 0.0f;  // ((t0 w0 + t1 w1) + t2 w2) + t3 w3, as numpy's sum
                    for (int k = 0; k < 4; ++k) {
                        const float t = face[(size_t)src_index[k * n_px + n] * 3 + ch];
                        s = __fadd_rn(s, __fmul_rn(t, src_weight[k * n_px + n]));
                    }
                    const float v = __fadd_rn(c[ch], __fmul_rn(a, __fsub_rn(s, c[ch])));
                    c[ch] = fminf(fmaxf(rintf(v), 0.0f), 255.0f);
                }
            }
            if (write_rgb) {
                unsigned char* o = rgb_out + ((size_t)y * W + x) * 3;
                o[0] = (unsigned char)c[0]; o[1] = (unsigned char)c[1]; o[2] = (unsigned char)c[2];
            }
            const float luma = __fadd_rn(__fadd_rn(__fadd_rn(__fmul_rn(c[0], MY0),
                __fmul_rn(c[1], MY1)), __fmul_rn(c[2], MY2)), 16.0f);
            yuv[(size_t)y * W + x] = (unsigned char)fminf(fmaxf(rintf(luma), 0.0f), 255.0f);
            px[dy][dx][0] = c[0]; px[dy][dx][1] = c[1]; px[dy][dx][2] = c[2];
        }
    }
    float q[3];  // (p00 + p10) + (p01 + p11): rows first, as rgb_to_i420
    for (int ch = 0; ch < 3; ++ch)
        q[ch] = __fadd_rn(__fadd_rn(px[0][0][ch], px[1][0][ch]),
                          __fadd_rn(px[0][1][ch], px[1][1][ch]));
    const float u = __fadd_rn(__fadd_rn(__fadd_rn(__fmul_rn(q[0], MU0), __fmul_rn(q[1], MU1)),
                                        __fmul_rn(q[2], MU2)), 128.0f);
    const float v = __fadd_rn(__fadd_rn(__fadd_rn(__fmul_rn(q[0], MV0), __fmul_rn(q[1], MV1)),
                                        __fmul_rn(q[2], MV2)), 128.0f);
    const size_t plane = (size_t)H * W, cidx = (size_t)by * hw + bx;
    yuv[plane + cidx] = (unsigned char)fminf(fmaxf(rintf(u), 0.0f), 255.0f);
    yuv[plane + (size_t)hh * hw + cidx] = (unsigned char)fminf(fmaxf(rintf(v), 0.0f), 255.0f);
}
""".replace("MY0", _f32(_M[0, 0]))
    .replace("MY1", _f32(_M[0, 1]))
    .replace("MY2", _f32(_M[0, 2]))
    .replace("MU0", _f32(_M_C[0, 0]))
    .replace("MU1", _f32(_M_C[0, 1]))
    .replace("MU2", _f32(_M_C[0, 2]))
    .replace("MV0", _f32(_M_C[1, 0]))
    .replace("MV1", _f32(_M_C[1, 1]))
    .replace("MV2", _f32(_M_C[1, 2]))
)
_BLOCK = (16, 16, 1)  # threads per CUDA block, over (2x2-block columns, rows)
_raw_kernel: Any = None


def _paste_i420_kernel(cupy: ModuleType) -> Any:
    global _raw_kernel
    if _raw_kernel is None:  # compiled by NVRTC on first use, then cached by CuPy on disk
        _raw_kernel = cupy.RawKernel(_PASTE_I420_SOURCE, PASTE_I420_KERNEL)
    return _raw_kernel


def paste_back_i420(
    background: Any, face: Any, pmap: PasteMap, out: Any = None, *, rgb_out: Any = None
) -> Any:
    """Paste ``face`` into ``background`` and return the frame as I420, in one pass on GPU.

    Equal to ``rgb_to_i420(paste_back(background, face, pmap))`` (to within one 8-bit level:
    float sums may round differently on the GPU); numpy inputs run exactly those two functions,
    CuPy inputs one fused raw kernel that never writes the RGB frame unless ``rgb_out`` is given.

    Args:
        background: (H, W, 3) uint8 frame, H and W even (numpy or cupy).
        face: (S, S, 3) crop, uint8 or float32 in [0, 255], same array module.
        pmap: the avatar's paste map in the same array module.
        out: optional (H * 3 // 2, W) uint8 C-contiguous destination for the planes.
        rgb_out: optional (H, W, 3) uint8 C-contiguous destination for the pasted RGB frame
            (for a preview or a second encoder); not written when None.

    Returns:
        ``out``, or a new (H * 3 // 2, W) uint8 array.
    """
    xp = get_array_module(background)
    if xp is np:
        rgb = paste_back(background, face, pmap, out=rgb_out)
        return rgb_to_i420(rgb, out=out)
    _check_image(background, "background")
    _check_image(face, "face", dtypes=("uint8", "float32"))
    h, w = int(background.shape[0]), int(background.shape[1])
    if h % 2 or w % 2:
        raise ValueError(f"I420 needs even height and width, got {tuple(background.shape)}")
    if (h, w) != tuple(pmap.frame_hw):
        raise ValueError(f"background is {h}x{w} but the paste map is for {pmap.frame_hw}")
    s = pmap.crop_size
    if tuple(face.shape) != (s, s, 3):
        raise ValueError(f"face must have shape ({s}, {s}, 3) for this paste map, got {face.shape}")
    for name, a in (("face", face), ("pmap", pmap.alpha)):
        if get_array_module(a) is not xp:
            raise TypeError(f"{name} is not a cupy array like background (pmap.to(cupy) once)")
    if out is None:
        out = xp.empty((h * 3 // 2, w), dtype=xp.uint8)
    elif tuple(out.shape) != (h * 3 // 2, w) or str(out.dtype) != "uint8":
        raise ValueError(f"out must be ({h * 3 // 2}, {w}) uint8, got {out.shape} {out.dtype}")
    if rgb_out is not None and tuple(rgb_out.shape) != (h, w, 3):
        raise ValueError(f"rgb_out must have shape ({h}, {w}, 3), got {rgb_out.shape}")
    for name, a in (("background", background), ("out", out), ("rgb_out", rgb_out)):
        if a is not None and not a.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous")
    y0, y1, x0, x1 = pmap.bbox
    face_f = xp.ascontiguousarray(face, dtype=xp.float32)  # (S, S, 3): the crop is small
    grid = (-(-(w // 2) // _BLOCK[0]), -(-(h // 2) // _BLOCK[1]), 1)
    _paste_i420_kernel(xp)(
        grid,
        _BLOCK,
        (
            background, face_f,
            xp.ascontiguousarray(pmap.src_index, dtype=xp.int32),
            xp.ascontiguousarray(pmap.src_weight, dtype=xp.float32),
            xp.ascontiguousarray(pmap.alpha, dtype=xp.float32),
            np.int32(h), np.int32(w), np.int32(y0), np.int32(y1), np.int32(x0), np.int32(x1),
            out, rgb_out if rgb_out is not None else out, np.int32(rgb_out is not None),
        ),
    )  # fmt: skip
    return out


__all__ = [
    "PASTE_I420_KERNEL",
    "PasteMap",
    "bilinear_taps",
    "build_paste_map",
    "get_array_module",
    "invert_affine",
    "paste_back",
    "paste_back_i420",
    "paste_back_torch",
    "rgb_to_i420",
    "rgb_to_i420_torch",
]
