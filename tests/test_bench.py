"""The timing rules of ``sgdph_tools.bench`` (the command end to end: tests/cli/test_bench.py)."""

from __future__ import annotations

import pytest

from sgdph_tools.bench import Mode, Settings, all_modes, run, timing_window


def test_the_window_holds_whole_refresh_cycles_of_every_mode():
    assert timing_window(all_modes(), "cpu") == 10  # k = 1 and 10
    assert timing_window([Mode("sgdm"), Mode("sgdph", "gnb", None, 1)], "cpu") == 1  # per-step medians
    assert timing_window([Mode("sgdm"), Mode("sgdph", "gnb", None, 4), Mode("sgdph", "gnb", None, 6)], "cpu") == 12
    # a GPU gets whole cycles of at least 10 steps, so the synchronisation is not charged per step
    assert timing_window([Mode("sgdm"), Mode("sgdph", "gnb", None, 1)], "cuda") == 10
    assert timing_window([Mode("sgdm"), Mode("sgdph", "gnb", None, 4)], "cuda") == 12


def test_a_window_that_splits_a_refresh_cycle_is_refused():
    modes = [Mode("sgdm"), Mode("sgdph", "gnb", None, 10)]
    with pytest.raises(ValueError, match="not a multiple"):
        run(modes, Settings(model="small_cnn", window=4))
