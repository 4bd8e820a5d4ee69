"""dpjax.presets.resolve / resolve_base: the one place presets are applied."""

from __future__ import annotations

import json

import numpy as np
import pytest

import dpjax
from dpjax import presets
from dpjax.config import Config, schedule


def test_resolve_base_applies_the_presets_start_and_estimator():
    auto = presets.resolve_base("auto", Config())
    assert auto.init.search and auto.post.defocus == "sharpened"
    for name in ("paper", "none"):
        cfg = presets.resolve_base(name, Config())
        assert not cfg.init.search and cfg.post.defocus == "mean"
    cfg = presets.resolve_base("auto", Config(), search_init=False,
                               defocus_estimator_name="mean")
    assert not cfg.init.search and cfg.post.defocus == "mean"  # explicit values win
    with pytest.raises(ValueError, match="unknown preset"):
        presets.resolve_base("best", Config())


def test_resolve_paper_and_none():
    base = Config()
    cfg, info = presets.resolve("paper", "5", None, None, base)
    assert (cfg.mpi.scale_min, cfg.mpi.scale_max) == (0.1, 1.3)
    assert info["name"] == "paper" and info["scale_range"] == [0.1, 1.3]
    cfg, info = presets.resolve("none", "x", None, None, base)
    assert cfg == base
    with pytest.raises(ValueError, match="no paper settings"):
        presets.resolve("paper", "nope", None, None, base)


@pytest.mark.parametrize("probe", [False, True])
def test_auto_preset_records_its_range_estimate(probe):
    bank = dpjax.parametric_bank(rows=2, cols=2, tile_h=32, tile_w=40, radius=6.0)
    scene = dpjax.make_scene(np.random.default_rng(0), bank, num_layers=2,
                             scale_range=(0.3, 1.2))
    base = Config(solver=schedule(num_iters=20))
    cfg, info = presets.resolve("auto", "a", scene.views, bank, base, probe=probe)
    est = info["range_estimate"]
    assert info["scale_range"] == [est["s_min"], est["s_max"]]
    assert [cfg.mpi.scale_min, cfg.mpi.scale_max] == info["scale_range"]
    assert (est["probe_range"] is not None) == probe
    assert est["probe_iters"] == (presets.PROBE_ITERS if probe else 0)
    assert cfg.loss.alpha_tv == presets.AUTO_ALPHA_TV
    json.dumps(info)
