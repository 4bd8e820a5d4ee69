"""dpjax.pipeline.score: metrics, and ground truth that cannot score anything."""

from __future__ import annotations

import numpy as np

from dpjax import pipeline


def test_degenerate_ground_truth_is_reported_not_scored():
    rng = np.random.default_rng(0)
    est = rng.uniform(size=(40, 40, 1)).astype(np.float32)
    d = rng.uniform(size=(40, 40)).astype(np.float32)
    m = pipeline.score(est, d, gt_defocus=np.full((40, 40), 100.0))
    assert "aiwe1" not in m and m["unavailable"]["defocus"].endswith("is constant")
    m = pipeline.score(est, d, gt_defocus=np.zeros((40, 40)))  # no confident pixel
    assert "confident pixels" in m["unavailable"]["defocus"]
    m = pipeline.score(est, None, gt_all_in_focus=np.ones((40, 40)))
    assert "psnr" not in m and "constant" in m["unavailable"]["all_in_focus"]
    gt = np.tile(np.linspace(10, 200, 40), (40, 1))
    m = pipeline.score(est, d, gt_defocus=gt, gt_all_in_focus=gt)
    assert {"aiwe1", "aiwe2", "spearman", "psnr"} <= set(m) and "unavailable" not in m
    assert pipeline.degenerate_ground_truth(gt) is None
    assert pipeline.degenerate_ground_truth(np.array([[1.0, np.nan] * 10])) == "is not finite"
