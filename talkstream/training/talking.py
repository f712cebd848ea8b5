"""Talking frames for every identity of a face set, rendered on the fly.

The synthetic corpus gives speech, its mouth parameters (jaw, spread, round, upper and lower
lip) and the idle motion (blinks, sway) of every frame. :class:`TalkingFaces` turns a frame of
it into a training pair for *any* face of a :class:`~talkstream.training.faces.FaceSet`:

1. pick an identity (a random one, or a fixed one for a fixed pick, so the distillation pool
   and the stage that reads it see the same pairs);
2. move that face's own neutral landmarks by the frame's mouth parameters
   (:func:`~talkstream.training.visemes.params_to_landmarks` on the face's geometry, so a wide
   mouth opens wide and a small one small) and add the frame's idle offsets;
3. render the frame from the face's aligned crop (the corpus' piecewise-affine warp and drawn
   mouth interior, with a random mouth style and lip colour);
4. augment reference and frame with one draw (:mod:`talkstream.training.augment`).

Rendering a frame takes about 10 ms on one core, so a batch of 16 costs about as much as a
training step: the trainer runs the batches of future steps in a separate process
(:class:`Prefetcher`), and the network trains on the other core.

Motion batches also use the identities: the speech target of a sequence is its mouth parameters
on a random face, so AudioToMotion learns displacements for every face shape, not one.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import zlib
from collections import OrderedDict
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

import numpy as np
import torch

from talkstream.engine.avatar import crop_px_to_norm
from talkstream.engine.landmarks import MOTION_POINTS
from talkstream.engine.motion import MotionConfig
from talkstream.training.augment import (
    MIRROR_68,
    AugmentConfig,
    apply_appearance,
    apply_geometry,
    draw_appearance,
    draw_geometry,
    draw_mouth_style,
    tint_lips,
)
from talkstream.training.dataset import FrameBatch, MotionBatch, TrainData, to_image_tensor
from talkstream.training.faces import FaceSet
from talkstream.training.visemes import MouthGeometry, params_to_landmarks

log = logging.getLogger(__name__)

__all__ = ["Prefetcher", "TalkingFaces"]

_MOTION_IDX = np.asarray(MOTION_POINTS)


def _renderer_cls() -> Any:
    from talkstream.training.synthetic import FrameRenderer

    return FrameRenderer


class AnyFaceMotion(TrainData):
    """A landmark-only corpus whose motion batches use the face set's identities."""

    def __init__(self, base: TrainData, faces: FaceSet) -> None:
        self.__dict__.update(base.__dict__)
        self.faces = faces
        self._geoms = [MouthGeometry.from_neutral(n) for n in faces.neutral]

    def motion_batch(
        self,
        rng: np.random.Generator,
        n: int,
        seq_len: int,
        mcfg: MotionConfig,
        gain_jitter_db: float = 0.0,
    ) -> MotionBatch:
        return motion_batch_any_face(
            self, self.faces, self._geoms, rng, n, seq_len, mcfg, gain_jitter_db
        )


class TalkingFaces(AnyFaceMotion):
    """A :class:`TrainData` whose frames are rendered for the identities of a face set.

    Args:
        base: the corpus clips (audio, mouth parameters, idle motion); frames not needed.
        faces: the training identities.
        augment: augmentation settings.
        seed: fixes the identity of a fixed (clip, frame) pick.
        renderer_cache: how many identities' renderers (mesh + style) to keep.
    """

    def __init__(
        self,
        base: TrainData,
        faces: FaceSet,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        renderer_cache: int = 4096,
    ) -> None:
        if any(c.params is None for c in base.clips):
            raise ValueError("TalkingFaces needs corpus clips with mouth parameters (params)")
        if faces.crop_size != base.crop_size:
            raise ValueError(
                f"face crops are {faces.crop_size}px, the corpus is {base.crop_size}px"
            )
        # References are per sample (rendered with each batch), so the base keeps only one.
        TrainData.__init__(self, base.clips, faces.crops[:1], base.audio)
        self.faces = faces
        self.augment = augment or AugmentConfig()
        self.seed = seed
        self._geoms = [MouthGeometry.from_neutral(n) for n in faces.neutral]
        self._renderers: OrderedDict[int, Any] = OrderedDict()
        self._cache_size = renderer_cache
        # The renderer warns when a shut inner lip cannot be forced into its mesh: harmless
        # here (the mouth is closed), and thousands of identities would flood the log.
        logging.getLogger("talkstream.training.synthetic").setLevel(logging.ERROR)
        logging.getLogger("talkstream.training.frames").setLevel(logging.ERROR)

    @property
    def has_frames(self) -> bool:
        return True

    def __len__(self) -> int:
        return len(self.clips)

    # -- one sample ------------------------------------------------------------------------

    def _renderer(self, j: int) -> Any:
        r = self._renderers.get(j)
        if r is None:
            r = _renderer_cls()(self.faces.crops[j], self.faces.neutral[j])
            self._renderers[j] = r
            if len(self._renderers) > self._cache_size:
                self._renderers.popitem(last=False)
        else:
            self._renderers.move_to_end(j)
        return r

    def render_sample(
        self, clip: int, frame: int, rng: np.random.Generator, identity: int | None = None
    ) -> dict[str, np.ndarray]:
        """One training pair (numpy): ref, frame, landmarks, neutral, speech (crop px)."""
        j = int(rng.integers(len(self.faces))) if identity is None else identity
        c = self.clips[clip]
        assert c.params is not None  # checked in __init__
        s = self.crop_size
        neutral = self.faces.neutral[j].astype(np.float64)  # (68, 2) px
        speech = params_to_landmarks(self._geoms[j], c.params[frame]).astype(np.float64)
        idle = (c.landmarks[frame] - c.speech[frame]).astype(np.float64) * (s / 2.0)
        target_lm = speech + idle
        base = self._renderer(j)
        r = base
        cfg = self.augment
        ref = self.faces.crops[j]
        if cfg.enabled:
            tinted = tint_lips(ref, neutral, rng, cfg.lip_tint_p)
            r = _copy_renderer(base, tinted, draw_mouth_style(rng, base.style))
            ref = tinted
        img = r.render(target_lm)
        g = draw_geometry(rng, cfg, s)
        ref_g, neutral_g = apply_geometry(ref, neutral, g)
        img_g, lm_g = apply_geometry(img, target_lm, g)
        assert neutral_g is not None and lm_g is not None
        speech_g = speech @ g.matrix[:, :2].T + g.matrix[:, 2]
        if g.flip:
            speech_g = speech_g[MIRROR_68]
        a = draw_appearance(rng, cfg)
        return {
            "ref": apply_appearance(ref_g, a),
            "frame": apply_appearance(img_g, a),
            "landmarks": lm_g.astype(np.float32),
            "neutral": neutral_g.astype(np.float32),
            "speech": speech_g.astype(np.float32),
            "identity": np.asarray(j, dtype=np.int64),
        }

    # -- batches ---------------------------------------------------------------------------

    def _pick_rng(self, clip: int, frame: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, 7919, int(clip), int(frame)])

    def frame_arrays(
        self,
        rng: np.random.Generator,
        n: int,
        with_motion: MotionConfig | None = None,
        gain_jitter_db: float = 0.0,
        picks: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """A frame batch as numpy arrays (what the prefetch process sends back)."""
        clips, frames = picks if picks is not None else self.sample_frames(rng, n)
        out: dict[str, list[Any]] = {
            k: [] for k in ("ref", "frame", "landmarks", "neutral", "speech")
        }
        for c, t in zip(clips, frames, strict=True):
            r = (
                self._pick_rng(c, t)
                if picks is not None
                else np.random.default_rng(rng.integers(0, 2**63))
            )
            smp = self.render_sample(int(c), int(t), r)
            for k in out:
                out[k].append(smp[k])
        arrays = {k: np.stack(v) for k, v in out.items()}
        arrays["clips"] = np.asarray(clips)
        arrays["frames"] = np.asarray(frames)
        if with_motion is not None:
            gains = rng.uniform(-gain_jitter_db, gain_jitter_db, size=len(clips))
            arrays["windows"] = np.concatenate(
                [
                    self._windows(
                        self.clips[int(c)],
                        [int(t)],
                        with_motion,
                        float(gains[i]) if gain_jitter_db else 0.0,
                    )
                    for i, (c, t) in enumerate(zip(clips, frames, strict=True))
                ]
            )
        return arrays

    def batch_from_arrays(self, a: dict[str, np.ndarray]) -> FrameBatch:
        s = self.crop_size
        lm = crop_px_to_norm(a["landmarks"], s)
        b = FrameBatch(
            x0=to_image_tensor(a["frame"]),
            landmarks=torch.from_numpy(np.ascontiguousarray(lm, dtype=np.float32)),
            refs=to_image_tensor(a["ref"]),
            ref_index=torch.arange(len(a["frame"])),
            clip_index=a["clips"],
            frame_index=a["frames"],
        )
        if "windows" in a:
            neutral = crop_px_to_norm(a["neutral"], s).astype(np.float32)
            speech = crop_px_to_norm(a["speech"], s).astype(np.float32)
            b.windows = torch.from_numpy(a["windows"])
            b.neutral = torch.from_numpy(neutral)
            b.speech_target = torch.from_numpy(
                np.ascontiguousarray(speech[:, _MOTION_IDX] - neutral[:, _MOTION_IDX])
            )
            b.idle = torch.from_numpy((lm - speech).astype(np.float32))
        return b

    def frame_batch(
        self,
        rng: np.random.Generator,
        n: int,
        mcfg: MotionConfig | None = None,
        gain_jitter_db: float = 0.0,
        picks: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> FrameBatch:
        return self.batch_from_arrays(self.frame_arrays(rng, n, mcfg, gain_jitter_db, picks))


def motion_batch_any_face(
    data: TrainData,
    faces: FaceSet,
    geoms: list[MouthGeometry],
    rng: np.random.Generator,
    n: int,
    seq_len: int,
    mcfg: MotionConfig,
    gain_jitter_db: float = 0.0,
) -> MotionBatch:
    """Motion sequences whose targets are their mouth parameters on random faces."""
    s = data.crop_size
    clips, starts = data.sample_sequences(rng, n, seq_len)
    gains = rng.uniform(-gain_jitter_db, gain_jitter_db, size=n) if gain_jitter_db else None
    wins, neutral, target = [], [], []
    for i, (c, st) in enumerate(zip(clips, starts, strict=True)):
        clip = data.clips[int(c)]
        assert clip.params is not None
        idx = [min(int(st) + k, clip.n_frames - 1) for k in range(seq_len)]
        wins.append(data._windows(clip, idx, mcfg, float(gains[i]) if gains is not None else 0))
        j = int(rng.integers(len(faces)))
        nl = crop_px_to_norm(faces.neutral[j], s).astype(np.float32)
        sp = crop_px_to_norm(params_to_landmarks(geoms[j], clip.params[idx]), s)  # (L, 68, 2)
        neutral.append(np.broadcast_to(nl, (seq_len, 68, 2)))
        target.append(sp[:, _MOTION_IDX] - nl[_MOTION_IDX])
    return MotionBatch(
        windows=torch.from_numpy(np.concatenate(wins)),
        neutral=torch.from_numpy(np.ascontiguousarray(np.concatenate(neutral))),
        target=torch.from_numpy(np.concatenate(target).astype(np.float32)),
        seq_len=seq_len,
    )


def _copy_renderer(base: Any, reference: np.ndarray, style: Any) -> Any:
    r = object.__new__(type(base))
    r.__dict__.update(base.__dict__)
    r.reference = reference
    r._ref_flat = reference.reshape(-1, 3).astype(np.float32)
    r.style = style
    return r


# ----------------------------------------------------------------------------- prefetch

_JOB: Any = None  # set in the parent before the fork; the worker inherits it


def _run_job(step: int) -> dict[str, np.ndarray]:
    return _JOB(step)


class Prefetcher:
    """Compute ``job(step)`` (numpy only) for the next steps in a forked worker process.

    ``get(step)`` returns the job's result for ``step``: from the worker when it was
    scheduled, else computed in this process. Results are a pure function of the step, so a
    resumed run sees the same batches whether or not they were prefetched.
    """

    def __init__(self, job: Any, first: int, last: int, depth: int = 3) -> None:
        global _JOB
        _JOB = job
        self.job = job
        self.last = last
        self.depth = depth
        self.pending: dict[int, Future[dict[str, np.ndarray]]] = {}
        self.next = first
        self.pool: ProcessPoolExecutor | None = None
        try:
            self.pool = ProcessPoolExecutor(1, mp_context=mp.get_context("fork"))
        except (OSError, ValueError) as e:  # no fork (or no processes): compute inline
            log.warning("data prefetch disabled (%s): batches are built inline", e)
        self._fill()

    def _fill(self) -> None:
        if self.pool is None:
            return
        while self.next < self.last and len(self.pending) < self.depth:
            self.pending[self.next] = self.pool.submit(_run_job, self.next)
            self.next += 1

    def get(self, step: int) -> dict[str, np.ndarray]:
        fut = self.pending.pop(step, None)
        if fut is None:
            for f in self.pending.values():
                f.cancel()
            self.pending.clear()
            self.next = step + 1
            result = self.job(step)
        else:
            result = fut.result()
        self._fill()
        return result

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None


def checksum(a: dict[str, np.ndarray]) -> int:
    """A cheap content checksum of a batch (tests: prefetched == inline)."""
    return zlib.crc32(b"".join(np.ascontiguousarray(a[k]).tobytes() for k in sorted(a)))


__all__ += ["AnyFaceMotion", "checksum", "motion_batch_any_face"]
