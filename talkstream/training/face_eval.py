"""``talkstream eval --faces DIR``: the renderer on people it never saw, measured without it.

The corpus eval (:mod:`talkstream.training.evaluate`) measures one face. This one asks whether
the model generalises across identities: it animates faces of a photo folder that training
held out and measures the videos with tools independent of the model.

**Faces.** By default the held-out identities of the face set of ``DIR`` (the identity-hash
split of :mod:`talkstream.training.faces`, same settings as training, so these people were
never trained on), up to ``--max-faces`` (24), chosen deterministically: candidates are ordered
by a hash of their identity and picked round-robin from the groups below (women, young,
black-and-white, colour, then any), so that small groups are represented. A photo that fails
detection or the engine's quality check is skipped (the face set already dropped most). Then
the out-of-distribution faces, made at eval time (written to ``OUT_DIR/inputs``, never into the
repository): a few held-out colour photos recoloured to a **darker** skin tone, stylised as a
**painting** and as a pencil **drawing**, and the bundled **astronaut** (skimage's, a woman who
is not in the face set).

**Speech.** The same few held-out sentences for every face (``--sentences``, 2): English
sentences that the synthetic corpus of the checkpoint's training seed (``data.build.seed`` in
its metadata, else 0) holds out, spoken by that corpus's held-out espeak-ng voice variants,
each cut to ``--seconds`` (3) and starting with 0.5 s of silence. The phoneme timings give
the reference mouth opening, through the same visemes and the face's own mouth geometry as
the corpus (:mod:`talkstream.training.visemes`).

**Rendering.** The real engine (:class:`~talkstream.engine.pipeline.Engine`, shipped checkpoint
unless ``--checkpoint``): ``prepare_avatar``, one session per sentence, audio pushed, frames
rendered. Both the output frames (pasted into the photo) and the renderer's raw crops are kept.

**Per face** (medians / means over its frames):

* ``identity``: dlib's face-descriptor distance (:mod:`talkstream.training.identity`) of the
  photo to the output frames (median over ``--identity-frames`` frames spread over the speech;
  0.6 = dlib's same-person threshold; lower is better); ``identity_render``: the same for the
  renderer's raw crops, before paste-back (the paste mask keeps much of the photo's own face in
  the output, so this is the renderer's likeness on its own). Frames without a detected face
  are left out of the distance and reported as ``identity_found``.
* ``lipsync_r``: Pearson r of dlib's inner-lip opening, detected on every rendered crop, and the
  phoneme-derived opening (as ``talkstream eval --corpus`` computes it).
* ``detection_rate``: share of rendered crops in which dlib finds the face.
* ``psnr_outside_mouth_db``: PSNR of the rendered crop against the photo's own aligned crop over
  the face (jaw line up to the brows) minus the lower face (jaw points 2-14 closed under the
  nostrils, grown by 6% of the crop for the opening jaw): how faithfully the renderer keeps what
  speech should not move. Mean over frames.
* ``flicker_silence`` / ``flicker_speech``: mean absolute change of consecutive raw crops inside
  the paste mask, on silence (no phoneme within 0.1 s) and on speech (0-255).

**Groups** (every metric reported per group as the median over its faces): ``heldout`` (all
held-out photos evaluated), ``colour`` / ``bw`` (held-out photos split by colour: ``bw`` when
the photo's chroma, after removing what a single tint of the luminance explains, is under
0.035, so sepia counts as black-and-white), ``young`` (born 1960 or later, from the folder's CSV
``DIR.csv`` with columns file,name,born, when there is one), ``women`` (held-out photos whose
first name in that CSV is a common female first name: a heuristic from names, not anyone's
stated gender; names used by both sexes are left out of the list), ``darker``, ``painting``,
``drawing``, ``astronaut``. The stylised and recoloured faces are measured against their own
stylised photo.

Writes a JSON report (per-face and per-group values, the settings, the heuristics' notes), one
contact-sheet PNG per face (top: the photo, then 8 output frames spread over the speech, around
the face; bottom: the renderer's reference crop, then its raw crops of the same frames) and
prints a table with the groups as rows.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from talkstream.errors import InputError

log = logging.getLogger(__name__)

__all__ = [
    "GROUPS",
    "FaceEvalConfig",
    "FaceEvalResult",
    "colourfulness",
    "contact_sheet",
    "darker_skin",
    "drawing",
    "evaluate_faces",
    "first_name",
    "format_faces_table",
    "is_colour",
    "is_female_name",
    "lower_face_mask",
    "outside_mouth_region",
    "painting",
    "read_meta",
]

GROUPS = (
    "heldout",
    "colour",
    "bw",
    "young",
    "women",
    "darker",
    "painting",
    "drawing",
    "astronaut",
)
YOUNG_BORN = 1960  # born this year or later
COLOUR_THRESHOLD = 0.035  # colourfulness() at and above: a colour photo
_SPEECH_LEAD_S = 0.5
_SPEECH_TAIL_S = 0.4
_LOWER_FACE_GROW = 0.06  # of the crop: the jaw drops when the mouth opens
_SHEET_CELL = 160
_METRICS = (
    "identity",
    "identity_render",
    "identity_found",
    "lipsync_r",
    "detection_rate",
    "psnr_outside_mouth_db",
    "flicker_silence",
    "flicker_speech",
)

NOTES = {
    "women": "heuristic: held-out photos whose first name (bioguide-style CSV 'LAST, First') is "
    "in a list of common female first names; names used by both sexes are excluded; not anyone's "
    "stated gender",
    "young": f"born >= {YOUNG_BORN} per the folder's CSV",
    "bw": f"colourfulness (chroma beyond a single tint of the luminance) < {COLOUR_THRESHOLD}; "
    "sepia counts as black-and-white",
    "darker": "held-out colour photos with the skin (face-region skin-colour pixels) darkened "
    "by per-channel gains (0.58, 0.45, 0.36): a synthetic stand-in for darker skin",
    "painting": "held-out photo: median filter, posterize (4 bits), smoothing, edge enhance",
    "drawing": "held-out photo: greyscale colour-dodge pencil sketch",
    "astronaut": "skimage.data.astronaut(), the bundled default face (not in the face set)",
    "identity": "dlib ResNet descriptor distance photo vs frame, median over frames with a "
    "face; < 0.6 = same person for dlib",
}

# Common female first names (US usage, 19th-21st century). A heuristic for the ``women`` group:
# names that are common for both sexes (Leslie, Lynn, Marion, Kelly, Beverly, ...) are left out.
_FEMALE_NAMES_TEXT = """
    abigail ada adele adeline adrienne agnes aileen alexandra alexis alice alicia alisha alison
    allison alma amanda amber amelia amy ana anastasia andrea angela angelica angelina angie anita
    ann anna anne annette annie antoinette april arlene audrey ayanna barbara beatrice becca
    becky belinda bella bernadette bernice bertha beth bethany betsy betty bettie
    bonnie brenda bridget brittany candace carla carmen carol carole caroline carolyn carrie
    cassandra catherine cathy cecilia celeste charlene charlotte cheri cheryl chellie chloe
    christina christine cindy claire clara claudia colleen connie constance cora corinne
    cynthia daisy danielle darlene dawn deanna debbie debora deborah debra delia denise diana
    diane dianne dina dolores donna dora doris dorothy edith edna eileen elaine eleanor elena
    elisabeth elise eliza elizabeth ella ellen elsie emily emma erica erin esther ethel eugenia
    eva eve faith fannie florence frances francine gabrielle genevieve georgia geraldine gertrude
    gina ginny gladys gloria grace gracie gwen gwendolyn hannah harriet hattie hazel heather
    heidi helen helena henrietta hilda holly ida ileana ilhan irene iris isabel isabella jacqueline
    jane janet janice jeanette jeanne jeannette jennifer jenny jessica jill joan joann
    joanna joanne jocelyn jolene josephine joy joyce juanita judith judy julia julie juliet june
    karen karin katharine katherine kathleen kathryn kathy katie katrina kay kendra kirsten
    kristen kristi kristin kristina kristine kyrsten lauren laura leah lena leonor lila
    lillian lily linda lisa lois loretta lorraine louise lucille lucy lucretia lydia mabel madeleine
    madeline mae maggie marcia marcy margaret margarita margie maria marianne marie marilyn
    marjorie marla marsha martha mary maryanne maureen maxine mazie melanie melinda melissa
    michele michelle mildred millicent mimi minnie miriam molly monica muriel nadia nancy nanette
    naomi natalie nellie nettie nicole nikki nina nita nora norma nydia octavia olga olive olivia
    olympia pamela patricia patsy patty paula pauline pearl peggy penelope phyllis priscilla
    rachel ramona rashida rebecca regina renee rita roberta rosa rosalind rosalyn rosemary rosie
    roxanne ruth sally samantha sandra sara sarah selma sharice sharon sheila sheila shelley
    shirley shontel sonia sophia stacey stephanie sue susan susanna susie suzanne sylvia tamara
    tammy tanya teresa theresa tina tulsi ursula valerie vanessa veronica vicki vicky victoria
    viola violet virginia wanda wendy wilma winifred winnifred yvette yvonne zoe
"""
_FEMALE_NAMES = frozenset(_FEMALE_NAMES_TEXT.split())


# ----------------------------------------------------------------------------- groups


def first_name(name: str) -> str | None:
    """The first name of a ``"LAST, First Middle"`` (or ``"First Last"``) name, lower case.

    Initials (``"J."``) and titles are skipped: ``"SMITH, J. William"`` -> ``"william"``.
    """
    given = name.split(",", 1)[1] if "," in name else name
    for tok in re.split(r"[\s\"()]+", given):
        t = tok.strip(".'").lower()
        if len(t) > 1 and t.isalpha() and t not in {"jr", "sr", "ii", "iii", "mr", "mrs", "ms"}:
            return t
    return None


def is_female_name(name: str) -> bool:
    """Heuristic: the first name is a common female first name (see :data:`NOTES`)."""
    f = first_name(name)
    return f is not None and f in _FEMALE_NAMES


def colourfulness(image: np.ndarray) -> float:
    """Chroma not explained by a single tint of the luminance, 0-1 (mean over pixels).

    Each pixel's colour minus the mean colour of the pixels of its luminance (32 bins): a grey
    or sepia photo, whose colour is a function of the luminance, scores ~0; a colour photo
    scores 0.05 and more (bioguide: the two classes are separated around 0.03-0.04).
    """
    x = np.asarray(image, dtype=np.float64).reshape(-1, 3)
    lum = x.mean(axis=1)
    b = np.clip((lum / 8.0).astype(np.int64), 0, 31)
    cnt = np.bincount(b, minlength=32)
    sums = np.stack([np.bincount(b, x[:, c], minlength=32) for c in range(3)], axis=1)
    means = sums / np.maximum(cnt, 1)[:, None]  # (32, 3)
    r = x - means[b]
    return float(np.abs(r - r.mean(axis=1, keepdims=True)).sum(axis=1).mean() / 255.0)


def is_colour(image: np.ndarray) -> bool:
    return colourfulness(image) >= COLOUR_THRESHOLD


def read_meta(path: Path | None) -> dict[str, dict[str, str]]:
    """``file -> row`` of a CSV with at least a ``file`` column (bioguide.csv); {} if None."""
    if path is None:
        return {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise InputError(f"cannot read the metadata CSV {path}: {e.strerror or e}") from None
    if rows and "file" not in rows[0]:
        raise InputError(f"metadata CSV {path} has no 'file' column")
    return {r["file"]: r for r in rows}


def _born(row: dict[str, str] | None) -> int | None:
    if not row:
        return None
    try:
        return int(str(row.get("born", "")).strip()[:4])
    except ValueError:
        return None


# ----------------------------------------------------------------------------- stylising


def _face_scale(landmarks: np.ndarray) -> float:
    """Face width (jaw end to end) in pixels / 100: filter sizes scale with the face."""
    p = np.asarray(landmarks, dtype=np.float64)
    return max(float(np.hypot(*(p[16] - p[0]))) / 100.0, 0.3)


def _odd(x: float) -> int:
    n = max(3, round(x))
    return n if n % 2 else n + 1


def darker_skin(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """The photo with the skin of the face, ears and neck darkened to a deeper brown.

    Skin: pixels of skin colour (YCbCr box) in a region around the face (from above the brows
    to the bottom of the photo), feathered; there, per-channel gains (0.58, 0.45, 0.36) lower
    the luminance and warm the hue while keeping the texture. A synthetic stand-in for darker
    skin tones, which the training photos have few of.

    Args:
        image: (H, W, 3) uint8 RGB.
        landmarks: (68, 2) pixel landmarks of the face.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    img = np.asarray(image, dtype=np.float64)
    h, w = img.shape[:2]
    p = np.asarray(landmarks, dtype=np.float64)
    x0, x1 = p[:, 0].min(), p[:, 0].max()
    fw = x1 - x0
    top = p[17:27, 1].min() - 0.6 * fw
    ys, xs = np.mgrid[0:h, 0:w]
    region = (xs > x0 - 0.35 * fw) & (xs < x1 + 0.35 * fw) & (ys > top)
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    cb = 128.0 - 0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 128.0 + 0.5 * r - 0.418688 * g - 0.081312 * b
    skin = (cr > 133) & (cr < 180) & (cb > 75) & (cb < 130) & region
    # The face itself (inside the jaw line and up to the brows) is skin whatever its colour
    # (shadows, make-up), but not the eyes' whites, which stay as they are.
    from skimage.draw import polygon2mask

    face = polygon2mask((h, w), np.concatenate([p[0:17], p[26:16:-1]])[:, ::-1])
    for eye in (p[36:42], p[42:48]):
        face &= ~polygon2mask((h, w), eye[:, ::-1])
    skin = skin | (face & (cr > 128))
    radius = max(1.0, 1.5 * _face_scale(p))
    m = (
        np.asarray(
            Image.fromarray((skin * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(radius)),
            dtype=np.float64,
        )[..., None]
        / 255.0
    )  # (H, W, 1)
    gains = np.array([0.58, 0.45, 0.36])
    out = img * (1.0 - m) + img * gains * m
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def painting(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """An oil-painting-like stylisation: median filter, posterize, smooth, edge enhance."""
    s = _face_scale(landmarks)
    im = Image.fromarray(np.asarray(image, dtype=np.uint8))
    im = im.filter(ImageFilter.MedianFilter(_odd(5 * s)))
    im = ImageOps.posterize(im, 4)
    im = im.filter(ImageFilter.ModeFilter(_odd(3 * s)))
    im = im.filter(ImageFilter.SMOOTH_MORE)
    im = im.filter(ImageFilter.EDGE_ENHANCE_MORE)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def drawing(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """A pencil drawing: greyscale, colour-dodge blend with its blurred negative, shaded lines."""
    s = _face_scale(landmarks)
    grey = np.asarray(Image.fromarray(np.asarray(image, np.uint8)).convert("L"), np.float64)
    neg = Image.fromarray((255.0 - grey).astype(np.uint8))
    blur = np.asarray(neg.filter(ImageFilter.GaussianBlur(max(1.5, 6.0 * s))), np.float64)
    dodge = np.clip(grey * 255.0 / np.maximum(255.0 - blur, 1.0), 0, 255)
    # A little of the tone back, as pencil shading (a pure dodge loses the face's shape).
    out = 0.8 * dodge + 0.2 * grey
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return np.repeat(out[:, :, None], 3, axis=2)


def lower_face_mask(neutral: np.ndarray, size: int, grow: float = _LOWER_FACE_GROW) -> np.ndarray:
    """(S, S) bool: the lower face (jaw 2-14 closed under the nostrils), grown by ``grow * S``."""
    from scipy.ndimage import distance_transform_edt
    from skimage.draw import polygon2mask

    p = np.asarray(neutral, dtype=np.float64)
    poly = np.concatenate([p[2:15], p[[35, 34, 33, 32, 31]]])
    inside = polygon2mask((size, size), poly[:, ::-1])
    return distance_transform_edt(~inside) <= grow * size


def outside_mouth_region(neutral: np.ndarray, size: int) -> np.ndarray:
    """(S, S) bool: the face (jaw line up to the brows) minus :func:`lower_face_mask`."""
    from skimage.draw import polygon2mask

    p = np.asarray(neutral, dtype=np.float64)
    face = polygon2mask((size, size), np.concatenate([p[0:17], p[26:16:-1]])[:, ::-1])
    region = face & ~lower_face_mask(p, size)
    return region if region.sum() >= 16 else face


# ----------------------------------------------------------------------------- config, result


@dataclass(frozen=True)
class FaceEvalConfig:
    """What ``talkstream eval --faces`` evaluates and how."""

    faces: Path
    cache: Path | None = None  # the face set's cache folder (else: held-out photos only)
    checkpoint: Path | None = None  # None: the shipped one
    preset: str = "tiny"
    split: str = "heldout"  # face-set split: heldout | train | all
    max_faces: int = 24
    styled: int | None = None  # faces per darker/painting/drawing group (None: from max_faces)
    seconds: float = 3.0  # speech per sentence
    sentences: int = 2
    # The corpus seed whose held-out sentences and voices are spoken (None: the checkpoint's
    # training corpus seed, else 0).
    speech_seed: int | None = None
    meta: Path | None = None  # CSV file,name,born (default: DIR.csv beside DIR)
    out_dir: Path | None = None  # contact sheets and generated inputs
    identity_frames: int = 12
    sheet_frames: int = 8
    astronaut: bool = True
    seed: int | None = None  # session noise (None: the engine's)
    device: str = "cpu"
    # torch threads. 1 by default: the tiny model gains little from more, and on a busy
    # machine (training on the same cores) a second thread spin-waits: 4x slower measured.
    threads: int | None = 1
    progress: bool = True

    def n_styled(self) -> int:
        if self.styled is not None:
            return max(0, self.styled)
        return max(1, min(3, round(self.max_faces / 4)))


@dataclass
class FaceEvalResult:
    faces: list[dict[str, Any]]
    groups: dict[str, dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {"groups": self.groups, "faces": self.faces, "info": self.info},
            indent=1,
            allow_nan=False,
        )


@dataclass
class _Face:
    id: str
    groups: list[str]
    image: np.ndarray  # what the engine animates (the photo, or its stylised copy)
    landmarks: np.ndarray  # (68, 2) photo pixels
    info: dict[str, Any]
    avatar: Any = None


@dataclass
class _Speech:
    id: str
    text: str
    voice: str
    audio: np.ndarray  # 16 kHz float32
    params: np.ndarray  # (T, 5) mouth parameters per frame
    is_speech: np.ndarray  # (T,)
    is_silence: np.ndarray  # (T,)


# ----------------------------------------------------------------------------- faces


@dataclass
class _Candidate:
    file: str  # relative to DIR
    identity: str
    meta: dict[str, str] | None
    _colour: bool | None = None
    _photo: tuple[np.ndarray, np.ndarray] | None = None
    _bad: str | None = None


def _candidates(
    cfg: FaceEvalConfig, meta: dict[str, dict[str, str]]
) -> tuple[list[_Candidate], str]:
    """The photos of the chosen split, ordered by a hash of their identity; and the source."""
    from talkstream.training.faces import (
        FaceSetConfig,
        build_face_set,
        identity_split,
        list_photos,
        load_face_set,
    )

    root = Path(cfg.faces)
    if cfg.cache is not None:
        cache = Path(cfg.cache)
        if (cache / "manifest.json").is_file():
            fs = load_face_set(cache)
            src = fs.manifest.get("source")
            if src and Path(src).resolve() != root.resolve():
                raise InputError(
                    f"face-set cache {cache} was built from {src}, not {root}: pass the matching "
                    "--cache or none"
                )
            how = f"face set cached in {cache}"
        else:
            fs = build_face_set(root, cache, FaceSetConfig(), progress=cfg.progress)
            how = f"face set built into {cache}"
        pairs = [
            (f, i)
            for f, i, s in zip(fs.files, fs.identities, fs.split, strict=True)
            if cfg.split == "all" or s == cfg.split
        ]
    else:
        fcfg = FaceSetConfig()
        pairs = [
            (f, i)
            for f, i in list_photos(root)
            if cfg.split == "all"
            or identity_split(i, fcfg.heldout_fraction, fcfg.split_salt) == cfg.split
        ]
        how = f"{cfg.split} identities of {root} (split by identity hash, as the face set)"
    # One photo per identity (the first), ordered by a hash of the identity.
    seen: set[str] = set()
    out = []
    for f, i in sorted(pairs, key=lambda p: (hashlib.sha256(p[1].encode()).hexdigest(), p[0])):
        if i in seen:
            continue
        seen.add(i)
        out.append(_Candidate(f, i, meta.get(f) or meta.get(Path(f).name)))
    return out, how


class _Picker:
    """Loads, detects and checks candidates lazily; picks round-robin over groups."""

    def __init__(self, root: Path, detector: Any, acfg: Any) -> None:
        self.root = root
        self.detector = detector
        self.acfg = acfg
        self.rejected: list[dict[str, str]] = []

    def photo(self, c: _Candidate) -> tuple[np.ndarray, np.ndarray] | None:
        """(image, landmarks) of a usable candidate, else None (reason in ``rejected``)."""
        if c._photo is not None or c._bad is not None:
            return c._photo
        from talkstream.engine.avatar import WEAK_FACE_SCORE_RATIO, load_image
        from talkstream.engine.quality import check_face

        try:
            image = load_image(self.root / c.file, self.acfg)
        except InputError as e:
            c._bad = str(e)
        else:
            faces = self.detector.detect(image)
            if not faces:
                c._bad = "no face found"
            else:
                top = max(f.score for f in faces)
                likely = [f for f in faces if top <= 0 or f.score >= WEAK_FACE_SCORE_RATIO * top]
                best = max(likely, key=lambda f: f.area)
                verdict = check_face(best.landmarks, best.score)
                if not verdict.ok:
                    c._bad = f"{verdict.reason}: {verdict.message}"
                else:
                    c._photo = (image, np.asarray(best.landmarks, dtype=np.float32))
        if c._bad is not None:
            self.rejected.append({"file": c.file, "reason": c._bad})
        return c._photo

    def colour(self, c: _Candidate) -> bool | None:
        if c._colour is None:
            ph = self.photo(c)
            if ph is None:
                return None
            c._colour = is_colour(ph[0])
        return c._colour

    def pick(self, cands: Sequence[_Candidate], n: int) -> list[_Candidate]:
        preds: list[Callable[[_Candidate], bool]] = [
            lambda c: is_female_name((c.meta or {}).get("name", "")),
            lambda c: (_born(c.meta) or 0) >= YOUNG_BORN,
            lambda c: self.colour(c) is False,
            lambda c: self.colour(c) is True,
            lambda c: True,
        ]
        picked: list[_Candidate] = []
        taken: set[int] = set()
        pos = [0] * len(preds)
        exhausted = [False] * len(preds)
        while len(picked) < n and not all(exhausted):
            for k, pred in enumerate(preds):
                if len(picked) >= n or exhausted[k]:
                    continue
                while pos[k] < len(cands):
                    i = pos[k]
                    pos[k] += 1
                    c = cands[i]
                    # The cheap test first: metadata; then the photo (loads, detects, checks).
                    if i in taken or not pred(c) or self.photo(c) is None:
                        continue
                    taken.add(i)
                    picked.append(c)
                    break
                else:
                    exhausted[k] = True
        return picked


def _select_faces(
    cfg: FaceEvalConfig, detector: Any, acfg: Any
) -> tuple[list[_Face], dict[str, Any]]:
    root = Path(cfg.faces)
    meta_path = cfg.meta
    if meta_path is None:
        guess = root.parent / f"{root.name}.csv"
        meta_path = guess if guess.is_file() else None
    meta = read_meta(meta_path)
    cands, how = _candidates(cfg, meta)
    picker = _Picker(root, detector, acfg)
    picked = picker.pick(cands, cfg.max_faces) if cfg.max_faces > 0 else []
    if not picked and cfg.max_faces > 0:
        raise InputError(
            f"no usable {cfg.split} face in {root} ({len(cands)} candidate identities, "
            f"{len(picker.rejected)} rejected)"
            + (
                ": the held-out split is about 5% of the identities (by hash); a small folder "
                "may have none: pass --split all"
                if cfg.split == "heldout" and not cands
                else ""
            )
        )
    faces: list[_Face] = []
    for c in picked:
        ph = picker.photo(c)
        assert ph is not None  # picked only when usable
        image, pts = ph
        colour = bool(picker.colour(c))
        groups = ["heldout" if cfg.split == "heldout" else cfg.split, "colour" if colour else "bw"]
        born = _born(c.meta)
        if born is not None and born >= YOUNG_BORN:
            groups.append("young")
        if c.meta and is_female_name(c.meta.get("name", "")):
            groups.append("women")
        info = {
            "file": c.file,
            "identity": c.identity,
            "name": (c.meta or {}).get("name"),
            "born": born,
            "colourfulness": round(colourfulness(image), 4),
        }
        faces.append(_Face(Path(c.file).stem, groups, image, pts, info))

    k = cfg.n_styled()
    held = list(faces)
    colour_faces = [f for f in held if "colour" in f.groups]
    # Painting: colour photos first (a painting is in colour); drawing: any.
    by_colour = colour_faces + [f for f in held if "colour" not in f.groups]
    derived: list[tuple[str, list[_Face], Callable[[np.ndarray, np.ndarray], np.ndarray]]] = [
        ("darker", colour_faces, darker_skin),
        ("painting", by_colour, painting),
        ("drawing", held, drawing),
    ]
    for group, sources, fn in derived:
        for src in sources[:k]:
            faces.append(
                _Face(
                    f"{group}_{src.id}",
                    [group],
                    fn(src.image, src.landmarks),
                    src.landmarks,
                    {"source": src.info["file"], "name": src.info.get("name")},
                )
            )
    if cfg.astronaut:
        from talkstream.engine.avatar import default_image, default_landmarks

        faces.append(
            _Face(
                "astronaut",
                ["astronaut"],
                default_image(),
                default_landmarks(),
                {"source": "skimage.data.astronaut()"},
            )
        )
    sel = {
        "source": how,
        "candidate_identities": len(cands),
        "rejected": picker.rejected,
        "meta": str(meta_path) if meta_path else None,
    }
    return faces, sel


# ----------------------------------------------------------------------------- speech


def _speech(cfg: FaceEvalConfig, seed: int) -> list[_Speech]:
    from talkstream.config import SAMPLE_RATE_HZ
    from talkstream.training.clipformat import ClipSpec, frame_times
    from talkstream.training.evaluate import _speech_mask
    from talkstream.training.synthetic import (
        CorpusConfig,
        _split_plan,
        load_sentences,
        synthesize_clip,
    )
    from talkstream.training.visemes import MouthGeometry

    held, variants = _split_plan(load_sentences(), CorpusConfig(), seed)
    english = [s for s in held["heldout"] if s.language == "en"] or held["heldout"]
    if not english:
        raise InputError("the sentence list holds no held-out sentence")
    # Any geometry: the parameters (what the speech does to the mouth) do not depend on it.
    from talkstream.engine.avatar import default_landmarks

    geometry = MouthGeometry.from_neutral(default_landmarks())
    out: list[_Speech] = []
    for k in range(max(1, cfg.sentences)):
        s = english[k % len(english)]
        variant = variants["heldout"][k % len(variants["heldout"])]
        base = "en-us" if s.language == "en" else s.language
        spec = ClipSpec(
            clip_id=f"eval{k}",
            split="heldout",
            sentence_id=s.id,
            language=s.language,
            text=s.text,
            voice=f"{base}+{variant}",
            rate_wpm=165,
            pitch=50,
            articulation=1.0,
            gain_db=-3.0,
            lead_s=_SPEECH_LEAD_S,
            tail_s=_SPEECH_TAIL_S,
            sway_amplitude=0.0,
            blink_interval_s=4.0,
            seed=k,
        )
        clip = synthesize_clip(spec, geometry, None)
        n_samples = min(len(clip.audio), round(cfg.seconds * SAMPLE_RATE_HZ))
        audio = clip.audio[:n_samples].astype(np.float32)
        from talkstream.engine.motion import frames_for_samples

        n = min(frames_for_samples(n_samples), len(clip.params))
        starts = np.array([p.start_s for p in clip.phonemes], dtype=np.float64)
        ends = np.array([p.end_s for p in clip.phonemes], dtype=np.float64)
        names = np.array([p.name for p in clip.phonemes])
        sp, sil = _speech_mask(frame_times(n), starts, ends, names)
        out.append(
            _Speech(spec.clip_id, s.text, spec.voice, audio, clip.params[:n].copy(), sp, sil)
        )
    return out


# ----------------------------------------------------------------------------- rendering


def _render(engine: Any, avatar: Any, speech: _Speech, seed: int | None) -> tuple[Any, Any]:
    """(output frames (T, H, W, 3), raw crops (T, S, S, 3)) of one sentence."""
    from talkstream.config import SAMPLE_RATE_HZ
    from talkstream.engine.compose import to_host

    sess = engine.session(avatar, seed=seed)
    sess.max_batch = 16
    sess.push_audio(speech.audio, SAMPLE_RATE_HZ)
    sess.end_audio()
    frames: list[np.ndarray] = []
    crops: list[np.ndarray] = []
    while sess.has_ready():
        # The engine's raw crops, then the session's post stage pastes them into the photo.
        items = sess.take_ready()
        faces = engine.render(items)
        frames += [f.to_host() for f in sess.compose(items, faces)]
        crops += list(to_host(faces.crops))  # (n, S, S, 3) on the host
    n = min(len(frames), len(speech.params))
    return np.stack(frames[:n]), np.stack(crops[:n])


# ----------------------------------------------------------------------------- measuring


def _spread(n: int, k: int, prefer: np.ndarray | None = None) -> np.ndarray:
    """``k`` indices spread evenly over ``range(n)`` (over ``prefer``'s True ones if enough)."""
    pool = np.arange(n) if prefer is None or prefer.sum() < k else np.flatnonzero(prefer)
    if len(pool) <= k:
        return pool
    return pool[np.linspace(0, len(pool) - 1, k).round().astype(int)]


def _median(xs: Sequence[float | None]) -> float | None:
    v = [x for x in xs if x is not None and math.isfinite(x)]
    return float(np.median(v)) if v else None


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), nd)


def _measure(
    face: _Face,
    frames: np.ndarray,
    crops: np.ndarray,
    cont: np.ndarray,
    params: np.ndarray,
    is_speech: np.ndarray,
    is_silence: np.ndarray,
    ident: Any,
    detector: Any,
    cfg: FaceEvalConfig,
) -> tuple[dict[str, Any], np.ndarray]:
    """Metrics of one face; also the frame indices the contact sheet shows.

    Args:
        frames: (T, H, W, 3) output frames; crops: (T, S, S, 3) the renderer's raw crops.
        cont: (T,) frame t follows frame t - 1 (False where a sentence starts).
        params: (T, 5) the speech's mouth parameters; is_speech, is_silence: (T,) bool.
    """
    from talkstream.training.evaluate import (
        _detect_openings,
        _flicker,
        inner_lip_opening,
        pearson,
        psnr,
    )
    from talkstream.training.visemes import MouthGeometry, params_to_landmarks

    av = face.avatar
    size = av.crop_size
    found, opening = _detect_openings(detector, crops)
    ref_open = inner_lip_opening(
        params_to_landmarks(MouthGeometry.from_neutral(av.neutral), params)
    )
    region = outside_mouth_region(av.neutral, size)
    ref_px = av.crop[region]
    p = [min(psnr(c[region], ref_px), 100.0) for c in crops]
    mask = av.mask > 0.5
    sil, sp = is_silence, is_speech
    flick_sil = _flicker(crops, mask, cont[1:] & sil[1:] & sil[:-1])
    flick_sp = _flicker(crops, mask, cont[1:] & sp[1:] & sp[:-1])

    idx = _spread(len(frames), cfg.identity_frames, sp)
    photo_desc = ident.descriptor(face.image, face.landmarks)
    res_f = ident.compare(None, [frames[i] for i in idx], photo_descriptor=photo_desc)
    res_c = ident.compare(None, [crops[i] for i in idx], photo_descriptor=photo_desc)
    m = {
        "frames": len(frames),
        "identity": _r(res_f.distance),
        "identity_render": _r(res_c.distance),
        "identity_found": _r(res_f.detection_rate),
        "identity_render_found": _r(res_c.detection_rate),
        "identity_same_person": _r(res_f.same_person_rate),
        "lipsync_r": _r(pearson(opening[found], ref_open[found])),
        "detection_rate": _r(float(found.mean())),
        "psnr_outside_mouth_db": _r(float(np.mean(p)), 2),
        "flicker_silence": _r(flick_sil),
        "flicker_speech": _r(flick_sp),
        "photo_face_found": photo_desc is not None,
    }
    return m, _spread(len(frames), cfg.sheet_frames, sp)


def _fit(img: np.ndarray, cell: int) -> Image.Image:
    """``img`` scaled to fit a ``cell`` square, centred on grey."""
    im = Image.fromarray(np.asarray(img, dtype=np.uint8))
    im.thumbnail((cell, cell), Image.Resampling.LANCZOS)
    if im.size != (cell, cell):
        im = im.resize(
            (
                max(1, round(im.width * cell / max(im.size))),
                max(1, round(im.height * cell / max(im.size))),
            ),
            Image.Resampling.BICUBIC,
        )
    canvas = Image.new("RGB", (cell, cell), (96, 96, 96))
    canvas.paste(im, ((cell - im.width) // 2, (cell - im.height) // 2))
    return canvas


def contact_sheet(
    photo: np.ndarray,
    reference_crop: np.ndarray,
    frames: Sequence[np.ndarray],
    crops: Sequence[np.ndarray],
    title: str = "",
    cell: int = _SHEET_CELL,
) -> Image.Image:
    """Top row: the photo, then the output frames; bottom row: the renderer's reference crop,
    then its raw crops of the same frames. A title line above."""
    n = 1 + len(frames)
    head = 18 if title else 0
    sheet = Image.new("RGB", (n * cell, 2 * cell + head), (32, 32, 32))
    if title:
        ImageDraw.Draw(sheet).text((4, 3), title, fill=(235, 235, 235))
    sheet.paste(_fit(photo, cell), (0, head))
    sheet.paste(_fit(reference_crop, cell), (0, head + cell))
    for i, (f, c) in enumerate(zip(frames, crops, strict=True)):
        sheet.paste(_fit(f, cell), ((i + 1) * cell, head))
        sheet.paste(_fit(c, cell), ((i + 1) * cell, head + cell))
    return sheet


def _face_region(frame: np.ndarray, avatar: Any, zoom: float = 1.6) -> np.ndarray:
    """The output frame around the face: the crop's framing zoomed out by ``zoom``."""
    from talkstream.engine.avatar import warp_crop

    s = avatar.crop_size
    c = (s - 1) / 2.0
    # crop' = (crop - c) / zoom + c
    z = np.array([[1 / zoom, 0, c - c / zoom], [0, 1 / zoom, c - c / zoom]])
    m = avatar.frame_to_crop
    comp = np.concatenate([z[:, :2] @ m[:, :2], (z[:, :2] @ m[:, 2] + z[:, 2])[:, None]], axis=1)
    return warp_crop(frame, comp, s)


# ----------------------------------------------------------------------------- evaluate


def evaluate_faces(cfg: FaceEvalConfig) -> FaceEvalResult:
    """Animate the faces of ``cfg.faces`` and measure them (see the module docstring).

    Raises:
        InputError: no such folder, no usable face, a cache of another folder.
        MissingDependencyError: dlib or its models are not installed.
    """
    import torch
    from tqdm import tqdm

    from talkstream.config import EngineConfig
    from talkstream.engine.avatar import prepare_avatar
    from talkstream.engine.landmarks import DlibDetector
    from talkstream.engine.pipeline import default_checkpoint
    from talkstream.runtime import load_engine
    from talkstream.training.identity import FaceIdentity

    t0 = time.perf_counter()
    root = Path(cfg.faces)
    if not root.is_dir():
        raise InputError(f"--faces {root}: no such folder")
    if cfg.split not in ("heldout", "train", "all"):
        raise InputError(f"--split {cfg.split!r}: for --faces use heldout, train or all")
    if cfg.seconds <= 0 or not math.isfinite(cfg.seconds):
        raise InputError(f"--seconds must be positive, got {cfg.seconds}")
    if cfg.checkpoint is not None and not (Path(cfg.checkpoint) / "config.json").is_file():
        raise InputError(f"--checkpoint {cfg.checkpoint}: no config.json there")
    threads_before = torch.get_num_threads()
    detector = DlibDetector()
    ident = FaceIdentity(detector)
    ecfg = EngineConfig(
        preset=cfg.preset, checkpoint=cfg.checkpoint, device=cfg.device, threads=cfg.threads
    )
    try:
        # load_engine sets torch's thread count (ecfg.threads)
        engine = load_engine(ecfg)
    except BaseException:
        torch.set_num_threads(threads_before)
        raise
    acfg = dataclasses.replace(ecfg.avatar, crop_size=engine.crop_size)
    out_dir = Path(cfg.out_dir) if cfg.out_dir is not None else None
    try:
        faces, sel = _select_faces(cfg, detector, acfg)
        speech_seed = cfg.speech_seed
        if speech_seed is None:
            build = (engine.models.meta.get("config") or {}).get("data", {}).get("build", {})
            speech_seed = int(build.get("seed") or 0)
        speech = _speech(cfg, speech_seed)
        if out_dir is not None:
            (out_dir / "inputs").mkdir(parents=True, exist_ok=True)
        # One track: the sentences back to back; cont[t]: frame t follows frame t - 1.
        n_per = [len(s.params) for s in speech]
        cont = np.ones(sum(n_per), dtype=bool)
        cont[np.cumsum([0, *n_per])[:-1]] = False
        params = np.concatenate([s.params for s in speech])
        is_speech = np.concatenate([s.is_speech for s in speech])
        is_silence = np.concatenate([s.is_silence for s in speech])
        rows: list[dict[str, Any]] = []
        bar = tqdm(faces, desc="eval faces", unit="face", disable=not cfg.progress)
        for face in bar:
            bar.set_postfix_str(face.id)
            row: dict[str, Any] = {"id": face.id, "groups": face.groups, **face.info}
            try:
                face.avatar = prepare_avatar(
                    face.image, acfg, landmarks=face.landmarks, source_name=face.id
                )
            except InputError as e:
                row["error"] = str(e)
                rows.append(row)
                continue
            outs = [_render(engine, face.avatar, s, cfg.seed) for s in speech]
            frames = np.concatenate([o[0] for o in outs])
            crops = np.concatenate([o[1] for o in outs])
            metrics, show = _measure(
                face, frames, crops, cont, params, is_speech, is_silence, ident, detector, cfg
            )
            row.update(metrics)
            if out_dir is not None:
                if face.groups[0] in ("darker", "painting", "drawing"):
                    p = out_dir / "inputs" / f"{face.id}.png"
                    Image.fromarray(face.image).save(p)
                    row["input"] = str(p)
                title = (
                    f"{face.id} [{','.join(face.groups)}]  id {_fmt(metrics['identity'])}"
                    f" (render {_fmt(metrics['identity_render'])})  r {_fmt(metrics['lipsync_r'])}"
                    f"  det {_pct(metrics['detection_rate'])}"
                    f"  PSNR {_fmt(metrics['psnr_outside_mouth_db'])} dB"
                )
                sheet = contact_sheet(
                    face.image,
                    face.avatar.crop,
                    [_face_region(frames[i], face.avatar) for i in show],
                    [crops[i] for i in show],
                    title,
                )
                name = (
                    face.id if face.id.startswith(face.groups[0]) else f"{face.groups[0]}_{face.id}"
                )
                sp = out_dir / f"{name}.png"
                sheet.save(sp)
                row["sheet"] = str(sp)
            rows.append(row)
            face.avatar = None  # the photo and paste maps: not needed any more
        bar.close()
    finally:
        engine.close()
        torch.set_num_threads(threads_before)

    groups: dict[str, dict[str, Any]] = {}
    order = [cfg.split, *GROUPS[1:]]  # heldout, or the split asked for
    for g in order:
        members = [r for r in rows if g in r["groups"] and "error" not in r]
        groups[g] = {
            "n": len(members),
            **{k: _r(_median([r.get(k) for r in members])) for k in _METRICS},
        }
        groups[g]["faces"] = [r["id"] for r in members]
    info = {
        "faces_dir": str(root),
        "selection": sel,
        "speech_seed": speech_seed,
        "speech": [
            {
                "text": s.text,
                "voice": s.voice,
                "seconds": round(len(s.audio) / 16000, 2),
                "frames": len(s.params),
            }
            for s in speech
        ],
        "checkpoint": str(cfg.checkpoint or default_checkpoint(cfg.preset) or "random init"),
        "random_init": engine.random_init,
        "notes": NOTES,
        "wall_s": round(time.perf_counter() - t0, 1),
        "config": {
            k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()
        },
    }
    return FaceEvalResult(rows, groups, info)


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "n/a"
    return f"{v:.{nd}f}"


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * v:.0f}%"


def format_faces_table(res: FaceEvalResult) -> str:
    """Groups as rows: n, identity distance, lip-sync r, detection %, PSNR outside the mouth."""
    head = (
        f"{'group':<10} {'n':>3}  {'id dist':>7}  {'id rend':>7}  {'lipsync r':>9}  "
        f"{'detect':>6}  {'PSNR out-mouth':>14}  {'flick sil/sp':>12}"
    )
    lines = [head, "-" * len(head)]
    for g, m in res.groups.items():
        if m["n"] == 0:
            lines.append(f"{g:<10} {0:>3}  (no face in this group)")
            continue
        fl = f"{_fmt(m['flicker_silence'])}/{_fmt(m['flicker_speech'])}"
        lines.append(
            f"{g:<10} {m['n']:>3}  {_fmt(m['identity'], 3):>7}  {_fmt(m['identity_render'], 3):>7}"
            f"  {_fmt(m['lipsync_r'], 3):>9}  {_pct(m['detection_rate']):>6}"
            f"  {_fmt(m['psnr_outside_mouth_db'], 1) + ' dB':>14}  {fl:>12}"
        )
    errors = [r for r in res.faces if "error" in r]
    lines.append(
        "medians over each group's faces. id dist: dlib descriptor distance photo vs output "
        "frames (< 0.6 = same person); id rend: vs the renderer's raw crops; women = first-name "
        "heuristic."
    )
    if errors:
        lines.append(
            f"{len(errors)} face(s) not rendered: "
            + "; ".join(f"{r['id']}: {r['error']}" for r in errors)
        )
    lines.append(f"{len(res.faces)} faces in {res.info.get('wall_s')} s")
    return "\n".join(lines)
