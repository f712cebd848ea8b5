"""The drop-late pacer shared by ``LiveLoop`` and ``AvatarStream``, driven by clock values alone."""

from __future__ import annotations

import pytest

from talkstream.streaming.pacing import RELAX_AFTER_S, FramePacer

FPS = 25
DELAY_S = 0.2


def _pacer(**kw: object) -> FramePacer[str]:
    # Slot k is due at clock reading k / 25 + 0.2 (the LiveLoop mapping).
    return FramePacer(lambda t: (t - DELAY_S) * FPS, **kw)  # type: ignore[arg-type]


def test_a_due_slot_shows_the_newest_frame_up_to_it_and_repeats_when_none_is_new() -> None:
    p = _pacer()
    assert p.due(0.0) == -5 and p.due(DELAY_S + 0.039) == 0 and p.due(DELAY_S + 0.041) == 1
    assert p.show(0) == (None, False)  # nothing rendered yet: the caller shows its still
    p.add(1, "f1", now=0.0)
    p.add(2, "f2", now=0.0)
    p.add(4, "f4", now=0.0)
    assert p.show(1) == ("f1", True)
    assert p.show(2) == ("f2", True)
    assert p.show(3) == ("f2", False)  # frame 3 was skipped: the previous one again
    assert p.show(4) == ("f4", True)
    assert p.show(5) == ("f4", False)
    assert p.frames == ["f4"]  # older ones are never shown again, so not held
    c = p.counts
    assert (c.added, c.shown, c.fresh, c.repeated) == (3, 6, 3, 3)


def test_a_late_slot_skips_to_the_newest_frame_due() -> None:
    p = _pacer()
    for k in range(5):
        p.add(k, f"f{k}", now=0.0)
    assert p.show(3) == ("f3", True)  # slots 0-2 went by unseen (a stalled output)
    assert p.frames == ["f3", "f4"]


def test_frames_whose_slot_is_due_or_shown_are_not_worth_rendering() -> None:
    p = _pacer(allow_for_render=False)
    # At 0.25 s the display is at 1.25: slot 1 is due, slot 2 not yet.
    assert p.first_worth_rendering(DELAY_S + 0.05) == 2
    assert p.first_worth_rendering(0.0) == 0  # before the first slot: every frame is
    p.show(7)  # an output that already showed slot 7: frames up to 7 are worthless
    assert p.first_worth_rendering(0.0) == 8


def test_the_render_estimate_moves_the_deadline_forward() -> None:
    p = _pacer()
    p.add(0, "f0", now=0.0, render_s=0.5)  # EMA from 0: 0.05 s
    assert p.render_s == pytest.approx(0.05)
    # At 0.21 s the display is at 0.25, at 0.26 s (after a render) at 1.5: frame 1 would be late.
    assert p.first_worth_rendering(DELAY_S + 0.01) == 2
    off = _pacer(allow_for_render=False)
    off.add(0, "f0", now=0.0, render_s=0.5)
    assert off.first_worth_rendering(DELAY_S + 0.01) == 1


def test_an_over_budget_estimate_decays_only_while_nothing_renders() -> None:
    p = _pacer(budget_s=0.05)
    p.render_s = 1.0  # one render took a second: every frame now looks late
    p.add(0, "f0", now=10.0)
    p.relax(10.0 + RELAX_AFTER_S / 2)
    assert p.render_s == 1.0  # a short gap: the estimate stands
    for _ in range(40):  # 40 ticks without a rendered frame
        p.relax(11.0)
    assert 0.050 < p.render_s < 0.051
    p.render_s = 0.03  # under the budget: nothing to correct
    p.relax(20.0)
    assert p.render_s == 0.03


def test_drop_from_forgets_the_cut_frames_and_their_replacements_show_fresh() -> None:
    p = _pacer()
    for k in range(6):
        p.add(k, f"old{k}", now=0.0)
    assert p.show(2) == ("old2", True)
    p.drop_from(3)
    assert p.frames == ["old2"] and p.newest() == "old2"
    p.add(3, "new3", now=0.0)
    p.add(4, "new4", now=0.0)
    assert p.show(3) == ("new3", True)
    # A frame rendered again for a pts already held replaces the old one.
    p.add(4, "again4", now=0.0)
    assert p.show(4) == ("again4", True)
    # A cut at or before what was shown: that frame shows fresh again once re-rendered.
    p.drop_from(4)
    p.add(4, "cut4", now=0.0)
    assert p.show(4) == ("cut4", True)


def test_keep_bounds_the_frames_held() -> None:
    p = _pacer(keep=3)
    for k in range(10):
        p.add(k, f"f{k}", now=0.0)
    assert p.frames == ["f7", "f8", "f9"]
    assert p.show(5) == (None, False)  # its frame was pushed out: the caller's still


def test_a_negative_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="budget_s"):
        _pacer(budget_s=-1.0)
