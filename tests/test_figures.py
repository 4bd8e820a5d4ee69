"""dpjax.figures: layout of the demo figure and the shared defocus colour scale."""

import numpy as np
import pytest
from PIL import Image

from dpjax import figures, outputs

H, W = 64, 240  # MIN_PANEL_WIDTH: no enlargement


def _scene(rng, channels=1):
    sharp = rng.uniform(0.1, 0.9, (H, W, channels))
    views = np.stack([sharp * 0.9, sharp * 1.1])
    defocus = np.linspace(0.2, 1.4, W)[None, :].repeat(H, axis=0)
    return views, sharp, defocus


def _layout():
    """Panel slices [row][col], found in a figure whose panels are solid, distinct colours.

    The layout depends only on H, W, the font and whether there is a title (none here).
    """
    views = np.zeros((2, H, W, 3))
    views[..., 0] = 0.5  # input: red
    aif, gt = np.zeros((H, W, 3)), np.zeros((H, W, 3))
    aif[..., 1], gt[..., 2] = 0.5, 1.0  # estimate: green, truth: blue
    fig = figures.compose_figure(views=views, all_in_focus=aif, defocus=np.zeros((H, W)),
                                 gt_all_in_focus=gt, gt_defocus=np.ones((H, W)))
    shown = outputs.to_display(np.array([0.5, 1.0]))  # one display scale for all three
    red, green, blue = (shown[0], 0, 0), (0, shown[0], 0), (0, 0, shown[1])
    lo = tuple(outputs.colormap(np.array([0.0]), 0.0, 1.0)[0])  # estimated map: 0
    hi = tuple(outputs.colormap(np.array([1.0]), 0.0, 1.0)[0])  # true map: 1
    slices = []
    for colours in ((red, green, blue), (lo, hi)):
        row = []
        for colour in colours:
            match = np.all(fig == np.array(colour, np.uint8), axis=-1)
            ys, xs = np.nonzero(match)  # row-major: the first hit is the panel's corner
            y, x = ys[0], xs[0]
            assert match[y:y + H, x:x + W].all(), colour
            assert match.sum() >= H * W
            row.append((slice(y, y + H), slice(x, x + W)))
        slices.append(row)
    return slices


def test_layout_shape_and_panels():
    rng = np.random.default_rng(0)
    views, sharp, defocus = _scene(rng)
    fig = figures.compose_figure(views=views, all_in_focus=sharp, defocus=defocus,
                                 gt_all_in_focus=sharp, gt_defocus=defocus, notes=["a", "b"])
    assert fig.dtype == np.uint8 and fig.ndim == 3 and fig.shape[2] == 3
    assert fig.shape[1] > 3 * W and fig.shape[0] > 2 * H
    slices = _layout()
    # Three columns in the top row, left to right; the bottom row below them.
    xs = [s[1].start for s in slices[0]]
    assert xs[0] < xs[1] < xs[2] and xs[1] - xs[0] >= W and xs[2] - xs[1] >= W
    assert slices[1][0][0].start >= slices[0][0][0].stop
    assert [s[1].start for s in slices[1][:2]] == xs[:2]
    # The input panel is the display of the mean of the views (here equal to `sharp`),
    # tone-mapped together with the other two images: all three panels are identical.
    panels = [fig[s] for s in slices[0]]
    np.testing.assert_array_equal(panels[0], panels[1])
    np.testing.assert_array_equal(panels[1], panels[2])
    # One display scale: an estimate half as bright as the truth is shown darker (a
    # per-panel scale would show both the same).
    dim = figures.compose_figure(views=views, all_in_focus=0.5 * sharp, defocus=defocus,
                                 gt_all_in_focus=sharp, gt_defocus=defocus)
    est, truth = dim[slices[0][1]].astype(int), dim[slices[0][2]].astype(int)
    assert (est <= truth).all() and est.mean() < 0.9 * truth.mean()
    # A title adds height only.
    with_title = figures.compose_figure(views=views, all_in_focus=sharp, defocus=defocus,
                                        title="hello")
    assert with_title.shape[1] == fig.shape[1] and with_title.shape[0] > fig.shape[0]


def test_defocus_panels_share_one_colour_scale():
    rng = np.random.default_rng(1)
    views, sharp, defocus = _scene(rng, channels=3)
    slices = _layout()
    same = figures.compose_figure(views=views, all_in_focus=sharp, defocus=defocus,
                                  gt_all_in_focus=sharp, gt_defocus=defocus)
    est, true = same[slices[1][0]], same[slices[1][1]]
    np.testing.assert_array_equal(est, true)
    # The colours follow the joint range: a truth twice as deep stretches the scale, so
    # the estimate's panel changes too (a per-panel scale would leave it unchanged).
    wider = figures.compose_figure(views=views, all_in_focus=sharp, defocus=defocus,
                                   gt_all_in_focus=sharp, gt_defocus=2 * defocus)
    assert not np.array_equal(wider[slices[1][0]], est)
    np.testing.assert_array_equal(wider[slices[1][0]],
                                  outputs.colormap(defocus, 0.2, 2.8))
    np.testing.assert_array_equal(wider[slices[1][1]],
                                  outputs.colormap(2 * defocus, 0.2, 2.8))


def test_missing_ground_truth_and_bad_shapes(tmp_path):
    rng = np.random.default_rng(2)
    views, sharp, defocus = _scene(rng)
    full = figures.compose_figure(views=views, all_in_focus=sharp, defocus=defocus,
                                  gt_all_in_focus=sharp, gt_defocus=defocus)
    bare = figures.compose_figure(views=views, all_in_focus=sharp, defocus=defocus)
    assert bare.shape == full.shape
    slices = _layout()
    # Without ground truth the colour scale is the estimate's own range.
    np.testing.assert_array_equal(bare[slices[1][0]], outputs.colormap(defocus, 0.2, 1.4))
    assert not np.array_equal(bare[slices[0][2]], full[slices[0][2]])
    with pytest.raises(ValueError, match="defocus"):
        figures.compose_figure(views=views, all_in_focus=sharp, defocus=defocus[:, :-1])
    with pytest.raises(ValueError, match="views"):
        figures.compose_figure(views=views[0], all_in_focus=sharp, defocus=defocus)
    path = figures.write_figure(tmp_path / "f.png", views=views, all_in_focus=sharp,
                                defocus=defocus)
    np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), bare)


def test_score_notes():
    notes = figures.score_notes({"psnr": 30.0, "ssim": 0.9, "aiwe1": 0.1, "spearman": 0.2},
                                {"psnr": 25.0, "ssim": 0.8})
    text = "\n".join(notes)
    assert "input 25.00 dB, dpjax 30.00 dB" in text and "AIWE(1) 0.100" in text
    assert figures.score_notes({"psnr": 30.0, "ssim": 0.9}) == [
        "all-in-focus vs truth (higher = better)", "  PSNR 30.00 dB, SSIM 0.900"]


def test_small_images_are_enlarged():
    rng = np.random.default_rng(3)
    views = rng.uniform(0.1, 0.9, (2, 20, 30))
    fig = figures.compose_figure(views=views, all_in_focus=views[0], defocus=views[1])
    big = figures.compose_figure(views=np.repeat(np.repeat(views, 8, 1), 8, 2),
                                 all_in_focus=np.repeat(np.repeat(views[0], 8, 0), 8, 1),
                                 defocus=np.repeat(np.repeat(views[1], 8, 0), 8, 1))
    # 30 px wide -> enlarged 8x to 240 px: the same figure as for the 240-px images.
    np.testing.assert_array_equal(fig, big)
