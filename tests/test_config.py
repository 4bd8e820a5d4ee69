"""dpjax.config: the schedule's one meaning for every app flag, InitConfig, round trips."""

from __future__ import annotations

import pytest

from dpjax import config as config_lib
from dpjax.config import (
    BEST_LEVEL_ITERS,
    DEFAULT_OPTIMIZER,
    FAST_LEVEL_ITERS,
    Config,
    InitConfig,
    SolverConfig,
    schedule,
)


def test_schedule_defaults_and_num_iters_mean_the_finest_level():
    assert schedule().level_iters == FAST_LEVEL_ITERS
    assert schedule(pyramid_levels=3).level_iters == FAST_LEVEL_ITERS
    assert schedule(num_iters=30).level_iters == FAST_LEVEL_ITERS[:-1] + (30,)
    s = schedule(pyramid_levels=1, num_iters=5)
    assert s.pyramid_levels == 1 and s.budget(0) == 5
    s = schedule(pyramid_levels=2)
    assert (s.budget(1), s.budget(0)) == (300, 1000)  # SolverConfig's own budgets
    s = schedule(level_iters=[10, 4])
    assert s.pyramid_levels == 2 and s.level_iters == (10, 4)


def test_schedule_quality():
    assert schedule(quality="fast").level_iters == FAST_LEVEL_ITERS
    assert schedule(quality="best").level_iters == BEST_LEVEL_ITERS
    assert schedule(quality="best", pyramid_levels=3).level_iters == BEST_LEVEL_ITERS
    assert schedule(quality="best", num_iters=7).level_iters == BEST_LEVEL_ITERS[:-1] + (7,)
    # "best" spends more steps at every level but the coarsest, none fewer.
    assert all(b >= f for b, f in zip(BEST_LEVEL_ITERS, FAST_LEVEL_ITERS))
    assert sum(BEST_LEVEL_ITERS[1:]) > sum(FAST_LEVEL_ITERS[1:])
    with pytest.raises(ValueError, match="quality must be one of fast, best"):
        schedule(quality="slow")
    with pytest.raises(ValueError, match="level_iters or quality"):
        schedule(quality="best", level_iters=(10, 5, 2))
    with pytest.raises(ValueError, match="3-level schedule, pyramid_levels is 2"):
        schedule(quality="best", pyramid_levels=2)


def test_schedule_optimizer():
    # The apps' optimizer whatever sets the budgets; each optimizer has its own budgets.
    assert DEFAULT_OPTIMIZER == "adam"
    for kw in ({}, {"quality": "best"}, {"level_iters": (10, 4)}, {"pyramid_levels": 1},
               {"num_iters": 3}):
        assert schedule(**kw).optimizer == "adam"
        assert schedule(**kw, optimizer="lbfgs").optimizer == "lbfgs"
    assert schedule(optimizer="lbfgs").level_iters == (100, 60, 6)
    assert schedule(optimizer="lbfgs", quality="best").level_iters == (200, 120, 20)
    assert schedule(optimizer="lbfgs", level_iters=(10, 4)).level_iters == (10, 4)
    assert SolverConfig().optimizer == "adam"
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        schedule(optimizer="sgd")
    with pytest.raises(ValueError, match="lbfgs_memory must be >= 1"):
        SolverConfig(lbfgs_memory=0)


def test_schedule_refuses_contradictions():
    with pytest.raises(ValueError, match="not both"):
        schedule(level_iters=(10, 5, 2), num_iters=3)
    with pytest.raises(ValueError, match="has 2 levels, pyramid_levels is 3"):
        schedule(level_iters=(10, 5), pyramid_levels=3)
    with pytest.raises(ValueError):
        schedule(level_iters=(10, -1))


def test_init_config_is_part_of_the_config_and_round_trips():
    cfg = Config().replace(**{"init.search": True, "init.weight": 0.25})
    d = config_lib.to_dict(cfg)
    assert d["init"]["search"] is True and d["init"]["weight"] == 0.25
    assert config_lib.from_dict(d) == cfg
    # Results without an init section (nor a refine one: solved without it).
    assert config_lib.from_dict({}) == Config().replace(**{"refine.iters": 0})
    old = {"solver": {k: v for k, v in d["solver"].items() if k != "colour_levels"}}
    old["solver"].update(pyramid_levels=3, level_iters=[200, 120, 20])
    assert config_lib.from_dict(old).solver.colour_levels == 3  # solved before the option
    assert config_lib.from_dict(old).solver.kernel_mass_cut == 0.015  # it was there
    del old["solver"]["kernel_mass_cut"]
    assert config_lib.from_dict(old).solver.kernel_mass_cut == 0.0  # solved before it
    assert Config().solver.kernel_mass_cut > 0
    old_loss = {"loss": {k: v for k, v in d["loss"].items() if k != "noise_power"}}
    assert config_lib.from_dict(old_loss).loss.noise_power == 0.0
    assert config_lib.from_dict(d).loss.noise_power == Config().loss.noise_power
    with pytest.raises(ValueError, match="kernel_mass_cut must be in"):
        config_lib.SolverConfig(kernel_mass_cut=-0.1)
    with pytest.raises(ValueError, match="colour_levels must be >= 1"):
        config_lib.SolverConfig(colour_levels=0)
    with pytest.raises(ValueError):
        InitConfig(weight=1.5)
