"""The timing rules of ``sgdph_tools.bench`` (the command end to end: tests/cli/test_bench.py)."""

from __future__ import annotations

import pytest

from sgdph_tools.bench import Mode, Settings, all_modes, compiled_modes, run, timing_window


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


def test_each_window_starts_the_rowsum_round_robin_elsewhere_in_the_cycle():
    # the windows must sample the whole cycle, not always its first (deepest, dearest) tensors: the
    # tensor the optimizer itself chooses next moves evenly over the cycle from window to window
    import timm

    from sgdph_tools.bench import start_round_robin
    from sgdph_tools.optim import SGDPH, sgdph_param_groups

    model = timm.create_model("small_cnn", num_classes=10)
    opt = SGDPH(sgdph_param_groups(model), lr=0.1, estimator="rowsum")
    cycle = [p for g in opt.param_groups if g["second_order"] for p in g["params"]]
    assert len(cycle) >= 4
    starts = []
    for w in range(4):
        for p in cycle:  # whatever an earlier window left behind
            opt.state[p]["hessian_refreshes"] = 7
        start_round_robin(opt, w, 4)
        (chosen,) = opt.refresh_schedule.choose(1, cycle, opt.state)
        starts.append(next(i for i, p in enumerate(cycle) if p is chosen))
    assert starts == [w * len(cycle) // 4 for w in range(4)]
    assert len(set(starts)) == 4


def test_compiled_rows_are_the_modes_without_double_backward_after_their_own_sgdm():
    compiled = compiled_modes(all_modes((1,)), "reduce-overhead")
    assert compiled[0] == Mode("sgdm", compiled="reduce-overhead")
    assert {m.optimizer for m in compiled} == {"sgdm", "adamw", "sgdph"}
    assert all(m.engine not in ("autograd", "gauss_newton") for m in compiled)
    assert any(m.estimator == "gnb" for m in compiled) and any(m.engine == "finite_difference" for m in compiled)
    assert compiled[0].label == "sgdm, compiled (reduce-overhead)"
    with pytest.raises(ValueError, match="must be SGDM"):
        run([Mode("sgdm"), Mode("adamw", compiled="default")], Settings(model="small_cnn"))
