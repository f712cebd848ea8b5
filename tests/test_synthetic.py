"""The synthetic corpus: frame rendering, clip files, manifest, splits, determinism, CLI."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from talkstream.engine.avatar import Avatar, default_image, default_landmarks
from talkstream.engine.motion import frames_for_samples
from talkstream.errors import InputError
from talkstream.training import clipformat, synthetic
from talkstream.training import frames as frames_module
from talkstream.training.clipformat import (
    ClipSpec,
    decode_frames,
    encode_frames,
    frame_times,
    read_clip,
)
from talkstream.training.espeak import espeak_available
from talkstream.training.frames import _CONSTRAINED_EDGES, FrameRenderer
from talkstream.training.synthetic import (
    CORPUS_FORMAT,
    CorpusConfig,
    _existing_clip,
    _split_plan,
    add_corpus_parser,
    build_corpus,
    corpus_digest,
    load_sentences,
)
from talkstream.training.visemes import VISEME_INDEX, VISEMES, MouthGeometry, params_to_landmarks

needs_espeak = pytest.mark.skipif(not espeak_available(), reason="libespeak-ng not installed")


@pytest.fixture(scope="module")
def renderer(default_avatar: Avatar) -> FrameRenderer:
    return FrameRenderer(default_avatar.crop, default_avatar.neutral)


def _pose(avatar: Avatar, viseme: str) -> np.ndarray:
    g = MouthGeometry.from_neutral(avatar.neutral)
    return params_to_landmarks(g, np.array(VISEMES[VISEME_INDEX[viseme]].target))


def test_mesh_keeps_lip_and_eye_outlines(renderer: FrameRenderer) -> None:
    edges = {
        (min(int(t[i]), int(t[(i + 1) % 3])), max(int(t[i]), int(t[(i + 1) % 3])))
        for t in renderer.triangles
        for i in range(3)
    }
    for a, b in _CONSTRAINED_EDGES:
        assert (min(a, b), max(a, b)) in edges


def test_neutral_warp_is_identity(renderer: FrameRenderer, default_avatar: Avatar) -> None:
    warped = renderer.warp(default_avatar.neutral)
    np.testing.assert_allclose(warped, default_avatar.crop.astype(np.float32), atol=1e-3)


def test_open_and_closed_mouth_differ_only_around_the_mouth(
    renderer: FrameRenderer, default_avatar: Avatar
) -> None:
    open_lm = _pose(default_avatar, "AA")
    closed_lm = _pose(default_avatar, "PBM")
    f_open = renderer.render(open_lm)
    f_closed = renderer.render(closed_lm)
    assert f_open.shape == (128, 128, 3) and f_open.dtype == np.uint8
    diff = np.abs(f_open.astype(np.int16) - f_closed).max(axis=2)  # (S, S)
    nl = default_avatar.neutral
    lips = np.zeros_like(diff, dtype=bool)
    lo = np.floor(open_lm[48:68].min(0)).astype(int)
    hi = np.ceil(open_lm[48:68].max(0)).astype(int)
    lips[lo[1] : hi[1] + 1, lo[0] : hi[0] + 1] = True
    assert diff[lips].mean() > 30  # the mouth really changes
    # Inner mouth: dark cavity when open, lips when closed.
    c = np.rint(0.5 * (open_lm[62] + open_lm[66])).astype(int)
    assert f_open[c[1], c[0]].mean() < f_closed[c[1], c[0]].mean() - 40
    # The upper face (above the nose tip) stays as it was: brows and eyes bit-exact, the
    # cheeks below them stretch a little, as they do when a real jaw opens.
    eyes_bottom = int(nl[36:48, 1].max()) + 1
    assert diff[:eyes_bottom, int(nl[36, 0]) : int(nl[45, 0]) + 1].max() == 0
    assert diff[: int(nl[30, 1])].mean() < 0.6  # grey levels, out of 255
    assert diff[: int(nl[30, 1])].mean() < 0.02 * diff[lips].mean()


def test_render_is_deterministic_and_checks_input(
    renderer: FrameRenderer, default_avatar: Avatar
) -> None:
    lm = _pose(default_avatar, "OH") + np.float32(0.6)
    a = renderer.render(lm)
    b = FrameRenderer(default_avatar.crop, default_avatar.neutral).render(lm)
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="68, 2"):
        renderer.render(lm[:60])
    bad = lm.copy()
    bad[3, 0] = np.nan
    with pytest.raises(ValueError):
        renderer.render(bad)


def test_blink_changes_the_eyes_only(renderer: FrameRenderer, default_avatar: Avatar) -> None:
    lm = default_avatar.neutral.copy()
    upper, lower = [37, 38, 43, 44], [41, 40, 47, 46]
    lm[upper] += 0.9 * (lm[lower] - lm[upper])  # lids nearly shut
    shut = renderer.render(lm)
    rest = renderer.render(default_avatar.neutral)
    diff = np.abs(shut.astype(np.int16) - rest).max(axis=2)
    eyes = default_avatar.neutral[36:48]
    y_eye = int(eyes[:, 1].max()) + 3
    assert diff[: y_eye + 1].mean() > 1.0
    assert diff[y_eye + 6 :].max() == 0  # the mouth and chin do not move


def test_frame_codec_round_trip() -> None:
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    frames = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    assert np.array_equal(decode_frames(encode_frames(frames, ref), ref), frames)
    empty = np.zeros((0, 8, 8, 3), np.uint8)
    assert decode_frames(encode_frames(empty, ref), ref).shape == (0, 8, 8, 3)


def test_moved_names_are_still_importable_from_synthetic() -> None:
    # The renderer and the clip format moved out of synthetic.py; old imports must keep working.
    for module, names in (
        (frames_module, ["FrameRenderer", "MouthStyle", "constrained_triangulation"]),
        (frames_module, ["_CONSTRAINED_EDGES"]),
        (clipformat, ["ClipSpec", "decode_frames", "encode_frames", "frame_times", "read_clip"]),
    ):
        for name in names:
            assert getattr(synthetic, name) is getattr(module, name), name
    assert clipformat.FRAME_MS == synthetic.FRAME_MS == 40


def test_sentences_asset() -> None:
    sentences = load_sentences()
    assert len(sentences) >= 300
    langs = {s.language for s in sentences}
    assert {"en", "de", "fr", "es", "it"} <= langs
    assert sum(s.language == "en" for s in sentences) >= 200
    assert len({s.text for s in sentences}) == len(sentences)


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not espeak_available():
        pytest.skip("libespeak-ng not installed")
    out = tmp_path_factory.mktemp("corpus")
    build_corpus(default_image(), default_landmarks(), out, 0.1, seed=3, progress=False)
    return out


@needs_espeak
def test_tiny_corpus_manifest_and_splits(tiny_corpus: Path) -> None:
    m = json.loads((tiny_corpus / "manifest.json").read_text(encoding="utf-8"))
    assert m["format"] == CORPUS_FORMAT and m["version"] == 1
    assert m["fps"] == 25 and m["sample_rate_hz"] == 16000 and m["crop_size"] == 128
    assert m["duration_s"] >= 6.0
    assert (tiny_corpus / m["reference"]).is_file()
    clips = m["clips"]
    train = [c for c in clips if c["split"] == "train"]
    held = [c for c in clips if c["split"] == "heldout"]
    assert train and held
    # Held out: sentences and voices that training never uses (voice variants too).
    assert not {c["sentence_id"] for c in train} & {c["sentence_id"] for c in held}
    assert not {c["voice"] for c in train} & {c["voice"] for c in held}
    sp = m["splits"]
    assert not set(sp["train"]["available_sentence_ids"]) & set(
        sp["heldout"]["available_sentence_ids"]
    )
    assert not set(sp["train"]["voice_variants"]) & set(sp["heldout"]["voice_variants"])
    for c in held:
        assert c["voice"].split("+")[1] in sp["heldout"]["voice_variants"]


@needs_espeak
def test_tiny_corpus_clip_files(tiny_corpus: Path) -> None:
    m = json.loads((tiny_corpus / "manifest.json").read_text(encoding="utf-8"))
    assert m["clips"], "the corpus has no clips: the checks below would pass vacuously"
    for c in m["clips"]:
        audio, sr = sf.read(tiny_corpus / c["wav"], dtype="int16")
        assert sr == 16000 and audio.ndim == 1
        assert len(audio) == c["n_samples"]
        n_frames = frames_for_samples(len(audio))  # one frame per started 40 ms
        assert c["n_frames"] == n_frames == -(-len(audio) // 640)
        d = read_clip(tiny_corpus / c["data"])
        assert d["frames"].shape == (n_frames, 128, 128, 3) and d["frames"].dtype == np.uint8
        assert d["landmarks"].shape == (n_frames, 68, 2)
        assert d["speech_landmarks"].shape == (n_frames, 68, 2)
        assert d["params"].shape == (n_frames, 5)
        assert d["blink"].shape == (n_frames,)
        np.testing.assert_allclose(d["frame_time_s"], frame_times(n_frames), atol=1e-6)
        assert d["spec"]["text"] == c["text"] and d["spec"]["voice"] == c["voice"]
        # Phoneme timings lie inside the audio, after the leading silence, in order.
        dur = len(audio) / sr
        starts, ends = d["phoneme_start_s"], d["phoneme_end_s"]
        assert len(starts) > 5 and np.all(np.diff(starts) > 0) and np.all(ends > starts)
        assert c["lead_s"] - 1e-3 <= starts[0] <= c["lead_s"] + 0.1
        assert ends[-1] <= dur + 1e-3
        # Silence before the speech is silent, and the face is at rest there.
        lead = int(c["lead_s"] * sr)
        assert np.abs(audio[: lead - 10]).max() == 0
        assert np.abs(d["params"][0]).max() < 0.05
        # The mouth moves while speaking.
        assert d["params"][:, 0].max() > 0.3


@needs_espeak
def test_corpus_is_deterministic_and_resumes(tiny_corpus: Path, tmp_path: Path) -> None:
    first = corpus_digest(tiny_corpus)
    # Resume: everything is already there and is reused, byte for byte.
    res = build_corpus(
        default_image(), default_landmarks(), tiny_corpus, 0.1, seed=3, progress=False
    )
    assert res.reused == res.clips
    assert corpus_digest(tiny_corpus) == first
    # An interrupted build (one clip missing) regenerates exactly that clip.
    m = json.loads((tiny_corpus / "manifest.json").read_text(encoding="utf-8"))
    victim = tiny_corpus / m["clips"][-1]["data"]
    victim.unlink()
    res = build_corpus(
        default_image(), default_landmarks(), tiny_corpus, 0.1, seed=3, progress=False
    )
    assert res.reused == res.clips - 1
    assert corpus_digest(tiny_corpus) == first
    # A clip is reused only for the same spec, generator and avatar.
    e = m["clips"][0]
    spec = ClipSpec(**read_clip(tiny_corpus / e["data"])["spec"])
    npz, wav = tiny_corpus / e["data"], tiny_corpus / e["wav"]
    key = res.manifest["avatar_key"]
    assert _existing_clip(npz, wav, spec, key) is not None
    assert _existing_clip(npz, wav, spec, "another-face") is None
    assert _existing_clip(npz, wav, dataclasses.replace(spec, pitch=spec.pitch + 1), key) is None


def test_plan_depends_on_the_seed() -> None:
    sentences = load_sentences()
    cfg = CorpusConfig()
    a_split, a_var = _split_plan(sentences, cfg, 3)
    b_split, b_var = _split_plan(sentences, cfg, 4)
    assert a_split == _split_plan(sentences, cfg, 3)[0]  # deterministic
    assert a_split["heldout"] != b_split["heldout"] or a_var != b_var
    for split, var in ((a_split, a_var), (b_split, b_var)):
        assert not {x.id for x in split["train"]} & {x.id for x in split["heldout"]}
        assert not set(var["train"]) & set(var["heldout"])
        for lang in ("en", "de", "fr", "es", "it"):
            assert sum(x.language == lang for x in split["heldout"]) >= 2


@needs_espeak
def test_cli_parser(tiny_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="talkstream")
    sub = parser.add_subparsers(dest="command")
    add_corpus_parser(sub)
    a = parser.parse_args(["corpus", "--out", str(tmp_path / "c"), "--minutes", "0.02"])
    assert a.command == "corpus" and a.seed == 0 and a.image is None and a.minutes == 0.02
    # The command on a copy of the fixture's corpus, with its arguments: the clips are found
    # and reused (building them is the fixture's part), so what is tested is the command.
    shutil.copytree(tiny_corpus, tmp_path / "c")
    a = parser.parse_args(
        ["corpus", "--out", str(tmp_path / "c"), "--minutes", "0.1", "--seed", "3"]
    )
    a.no_progress = True
    assert a.func(a) == 0
    m = json.loads((tmp_path / "c" / "manifest.json").read_text(encoding="utf-8"))
    assert m["seed"] == 3 and len(m["clips"]) >= 2
    said = capsys.readouterr().out
    assert f"wrote {len(m['clips'])} clips" in said
    assert f"{len(m['clips'])} reused from an earlier run" in said
    bad = parser.parse_args(["corpus", "--out", str(tmp_path / "d"), "--landmarks", "x.json"])
    with pytest.raises(InputError, match="--image"):
        bad.func(bad)
    with pytest.raises(ValueError, match="minutes"):
        build_corpus(default_image(), default_landmarks(), tmp_path / "e", 0.0)
