"""Configuration presets: the paper's per-scene settings and an automatic one.

- `paper_config`: the layer range and prior weights that Xin et al.'s public code
  used for each of the 17 Pixel 4 scenes (data/pixel4/README.md), keyed by scene id.
- `auto_config`: one configuration for every capture. The layer range comes from the
  DP pair itself (`estimate_scale_range`), the prior weights are fixed (the paper's
  majority choice, alpha TV 7.5e4 and entropy 20). Hand-tuned per-scene numbers are
  what a user cannot supply for a new photo, so this is the default. run_solver.py and
  reproduce_table.py also start its solves from the search map (`uses_search_init`)
  and read its defocus maps sharpened (`defocus_estimator`).

`estimate_scale_range` runs the calibrated kernel-symmetry search
(`dpjax.baselines.dp_stereo_defocus`) over a wide grid of signed scales at reduced
resolution and keeps robust percentiles of the confident pixels:

1. resolution: half resolution when the pair's base disparity (centroid distance of
   the left and right kernels at s = 1, ~5.3 px for the Pixel 4) stays >= 2 px there
   and the tiles divide evenly, else full resolution;
2. candidates: -2 ... 2.5 in steps of 1/8 (SEARCH_SCALES). For the range, a
   calibration that records the blur of the photos it was fitted to (`blur_p90`, the
   self-calibration's) gets the grid scaled so that it spans the same multiples of
   that blur as with the Pixel 4 lab kernels the rule was developed with
   (`search_scales`, DEVELOPED_BLUR_P90), whatever unit its kernels are in;
   `dpjax.scene.configure` then searches twice, the search start keeping the grid as
   developed (scaled for both, the Canon's depth got worse through the start:
   experiments/results/own_camera.md, "The kernels' unit");
3. confident pixels: confidence (1 - min cost / median cost) > 0.7, windowed gradient
   energy above its 10th percentile over the image (drops flat windows: sky, walls),
   and an argmin strictly inside the candidate grid (an argmin at either end means
   "no minimum found"). The texture cut is deliberately low: blurred regions have
   little gradient energy, and a stricter cut (e.g. the median) keeps only the
   in-focus content and misses a blurred background (measured on synthetic
   two-layer scenes, where it missed the back layer in 3 of 6 scenes);
4. range: from the 5th percentile of their scales minus 10% of the 5th-90th
   percentile width, to the 90th percentile; clamped to [-2, 2.5] and at least 0.5
   wide (grown about its centre). With fewer than MIN_CONFIDENT_FRACTION confident
   pixels the base configuration's range is kept.

The two ends are treated differently on purpose. A front layer sharper than the
nearest content only under-deblurs it, so the near end gets a margin. A back layer
blurrier than the farthest content makes the solver over-sharpen it, and the upper
tail of the search is its least reliable part (blurred, weakly textured windows), so
the far end takes the 90th percentile without a margin (an earlier rule, the 95th
percentile plus a 10% margin, put the far end above the paper's hand-set values and
lost all-in-focus PSNR on scenes 008 and 013 during development).

`search_defocus` returns the search's per-pixel map (steps 1-3) for callers that also
want it as a starting point: `dpjax.pipeline.init_from_defocus` starts the MPI's layer
weights near it (`--search_init` in run_solver.py and reproduce_table.py, on by default
with the auto preset: `uses_search_init`); `analyze_scale_range(..., search=...)` then
reuses it.

`probe_scale_range` (opt-in: `estimate_auto_range(..., probe=True)`, `--range_probe`
in run_solver.py and reproduce_table.py) refines the searched range with a short
solve of the scene itself, the coarse-level solve the issue suggested:

1. the searched range widened by a quarter of its width at both ends (clamped to
   SCALE_LIMITS) is solved at 1/4 resolution (PROBE_FACTOR; 1/2 when the tiles do
   not divide by 4, no probe when they do not divide by 2) for PROBE_ITERS Adam
   steps with the auto weights;
2. the new range is the 1st-99th percentile of its defocus map plus half a final
   layer spacing at both ends (so the percentiles sit on the end layers), at least
   0.5 wide; a diverged probe keeps the searched range.

It costs about one extra coarsest level (+20-25% of a fast solve). On the six scenes'
3x4 crops it mostly lowers the far end where the search's upper tail overshoots (013,
016: 1.73 -> 1.51, 1.42) and the means improve on five of six columns, ahead of the
paper preset on all but AIWE(1) (experiments/results/pixel4.md). It is not the
default: the per-scene changes go both ways (PSNR better on 3 scenes, worse on 3),
the gain rests mainly on two scenes, and on small synthetic two-layer scenes the
probe's map is compressed towards the middle of its range and can miss the back
layer (tests/test_reproduce.py).

Measured on the central 3x4 tiles of the six shared Pixel 4 scenes
(experiments/results/pixel4.md): the estimated ranges differ from the paper's
hand-set ones by up to 0.47 (scene 005, far end); on the means the auto preset is
ahead of the paper preset on AIWE(2), 1 - |rho_s| and PSNR (27.28 vs 27.25 dB) and
behind on AIWE(1) (0.0861 vs 0.0837), SSIM (0.750 vs 0.751) and MAE (0.0278 vs
0.0273). At full resolution (1008x1344) it is ahead on PSNR (26.77 vs 26.69 dB), level
on SSIM and behind on the defocus columns and MAE (AIWE(1) 0.1018 vs 0.0985), scene 005
deciding the defocus means in both settings. These are with the paper's uniform start
and the paper's plain-mean map; with the search start and the sharpened map the
scripts add to the auto preset (`uses_search_init`, `defocus_estimator`) it is ahead of
the paper preset on every mean at both sizes.
"""

from __future__ import annotations

import math
import time
from typing import NamedTuple

import numpy as np

from dpjax import baselines, solver
from dpjax.config import (
    DEFAULT_OPTIMIZER,
    LINEAR_INPUT_OPTIMIZER,
    Config,
    MpiConfig,
    SolverConfig,
    schedule,
)
from dpjax.kernels import KernelBank, downsample_bank

__all__ = [
    "PRESETS",
    "resolve",
    "resolve_base",
    "AUTO_ALPHA_TV",
    "AUTO_ENTROPY",
    "PAPER_SCENES",
    "PROBE_ITERS",
    "SCALE_LIMITS",
    "SEARCH_SCALES",
    "DEVELOPED_BLUR_P90",
    "RangeEstimate",
    "SearchMap",
    "analyze_scale_range",
    "auto_config",
    "auto_config_from_estimate",
    "defocus_estimator",
    "defocus_fill",
    "estimate_auto_range",
    "estimate_scale_range",
    "kernel_base_disparity",
    "paper_config",
    "probe_scale_range",
    "range_search",
    "search_defocus",
    "search_scales",
]


def _scene(s_min: float, s_max: float, alpha_tv: float, entropy: float) -> dict:
    return {"s_min": s_min, "s_max": s_max, "alpha_tv": alpha_tv, "entropy": entropy}


# The paper's public-code settings per Pixel 4 scene (data/pixel4/README.md): layer
# scales linspace(s_max, s_min, 12), image TV 30 for all, alpha TV and entropy below.
PAPER_SCENES: dict[str, dict] = {
    "001": _scene(0.5, 1.6, 1.5e4, 20), "002": _scene(0.5, 1.6, 1.5e4, 20),
    "003": _scene(0.7, 1.6, 1.5e4, 20), "004": _scene(0.7, 1.6, 1.5e4, 20),
    "005": _scene(0.1, 1.3, 7.5e4, 30), "006": _scene(0.1, 1.4, 7.5e4, 30),
    "007": _scene(0.1, 1.4, 7.5e4, 30), "008": _scene(0.2, 1.5, 7.5e4, 30),
    "009": _scene(0.1, 1.5, 7.5e4, 30), "010": _scene(0.2, 1.5, 7.5e4, 30),
    "011": _scene(0.2, 1.5, 7.5e4, 30), "012": _scene(0.1, 1.5, 7.5e4, 30),
    "013": _scene(0.3, 1.6, 7.5e4, 20), "014": _scene(0.1, 1.5, 7.5e4, 20),
    "015": _scene(0.1, 1.6, 7.5e4, 20), "016": _scene(0.3, 1.5, 7.5e4, 20),
    "017": _scene(0.2, 1.6, 7.5e4, 20),
}

# The auto preset's prior weights, the same for every scene: the paper's majority
# choice (13 of 17 scenes use alpha TV 7.5e4; 9 of 17 entropy 20).
AUTO_ALPHA_TV = 7.5e4
AUTO_ENTROPY = 20.0

# Candidate scales of the range search and the interval a range is clamped to.
SCALE_LIMITS = (-2.0, 2.5)
SEARCH_SCALES = tuple(float(s) for s in np.arange(SCALE_LIMITS[0], SCALE_LIMITS[1] + 1e-6, 0.125))
# The 90th-percentile blur radius of the photos the range rule was developed on, in the
# unit of the kernels it was developed with: the six shared Pixel 4 scenes' blur is
# 16.6 px (their self-calibration), the lab kernels' scale 1 is about 12 px (the
# self-calibrated model matches them best at that radius, experiments/results/
# selfcal.md). Why it matters: experiments/results/own_camera.md, "The kernels' unit".
DEVELOPED_BLUR_P90 = 16.6 / 12.0

# Range rule constants (see the module docstring).
_CONFIDENCE_MIN = 0.7
_TEXTURE_QUANTILE = 10.0
_PERCENTILES = (5.0, 90.0)
_NEAR_MARGIN = 0.1  # fraction of the percentile width added below the near end
_MIN_WIDTH = 0.5
_MIN_DISPARITY_PX = 2.0  # base disparity kept at the search resolution
MIN_CONFIDENT_FRACTION = 0.01

# Probe rule constants (see the module docstring).
PROBE_ITERS = 200
PROBE_FACTOR = 4  # the fast schedule's coarsest level
_PROBE_WIDEN = 0.25  # fraction of the search range's width added at both ends
_PROBE_PERCENTILES = (1.0, 99.0)


def _scene_key(scene_id) -> str:
    if isinstance(scene_id, (int, np.integer)):
        return f"{int(scene_id):03d}"
    s = str(scene_id)
    return s.zfill(3) if s.isdigit() else s


# The auto preset's defocus estimator (dpjax.mpi.DEFOCUS_ESTIMATORS).
AUTO_DEFOCUS = "sharpened"


def defocus_estimator(preset: str, estimator: str | None = None) -> str:
    """The defocus estimator of a solve with `preset` (`--defocus_estimator`).

    An explicit estimator wins. None (the flag not given) is the preset's choice:
    "sharpened" for `auto` (`dpjax.mpi.defocus_sharpened`: on the six Pixel 4 scenes
    it lowered the mean AIWE(1) at full resolution from 0.094 to 0.062 and 1 - |rho_s|
    from 0.270 to 0.190, and improved both on the 3x4 crops; experiments/results/
    pixel4.md), "mean" (the paper's sum_l T_l s_l, PostConfig's default) for `paper`
    and `none`. The sharpened map suits photos, where weakly textured regions leave
    the layer weights spread after a short solve; on small synthetic scenes of
    slanted, fully textured planes the spread carries sub-layer position and the
    plain mean is better (tests/test_solver.py), so it stays the library default.
    """
    if estimator is not None:
        return estimator
    return AUTO_DEFOCUS if preset == "auto" else "mean"


def defocus_fill(preset: str, fill: bool | None = None) -> bool:
    """Whether a solve with `preset` fills its map's textureless regions
    (`dpjax.postprocess.fill_defocus`, `--defocus_fill`).

    An explicit True or False wins. None (the flag not given) is the preset's choice: on
    for `auto`, off for `paper` and `none` (the paper's map). On the six Pixel 4 full
    frames it lowered the mean AIWE(1) from 0.0605 to 0.0562 with the lab kernels and
    from 0.0742 to 0.0645 with self-calibrated ones, and 1 - |rho_s| with both; on the
    3x4 crops it lowered AIWE(1) with the lab kernels but raised 1 - |rho_s|
    (experiments/results/pixel4.md, "Filling textureless regions").
    """
    return preset == "auto" if fill is None else bool(fill)


def uses_search_init(preset: str, search_init: bool | None = None) -> bool:
    """Whether a solve with `preset` starts from the search map (`--search_init`).

    An explicit True or False wins. None (the flag not given) is the preset's choice:
    on for `auto`, which estimates everything from the pair (on the six Pixel 4 scenes,
    at both the 3x4 crop and full resolution, the search start improved five of six
    mean columns, all but 1 - |rho_s|, and the image of every scene:
    experiments/results/pixel4.md), off for `paper` and `none` (the paper's uniform
    start, so that `paper` stays the paper's method).
    """
    return preset == "auto" if search_init is None else bool(search_init)


PRESETS = ("auto", "paper", "none")


def resolve_base(preset: str, base: Config | None = None, *, search_init: bool | None = None,
                 defocus_estimator_name: str | None = None,
                 fill: bool | None = None) -> Config:
    """`base` with the preset's scene-independent choices: the start (`init.search`,
    `uses_search_init`), the defocus estimator (`post.defocus`, `defocus_estimator`) and
    the map's fill (`post.fill`, `defocus_fill`).

    Explicit values win over the preset's choice. Raises ValueError for an unknown preset.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    base = Config() if base is None else base
    return base.replace(**{"init.search": uses_search_init(preset, search_init),
                           "post.defocus": defocus_estimator(preset, defocus_estimator_name),
                           "post.fill": defocus_fill(preset, fill)})


def base_config(*, preset: str, quality: str | None = None, pyramid_levels: int | None = None,
                level_iters=None, num_iters: int | None = None, num_layers: int | None = None,
                search_init: bool | None = None, defocus_estimator: str | None = None,
                defocus_fill: bool | None = None, refine_iters: int | None = None,
                colour_levels: int | None = None,
                kernel_mass_cut: float | None = None, optimizer: str | None = None) -> Config:
    """The base configuration of the apps' shared settings: schedule, layers, preset choices.

    One place for what the shared flags (dpjax_apps.flags) mean:
    `dpjax.config.schedule` gives quality / pyramid_levels / level_iters / num_iters /
    optimizer their meaning, `resolve_base` the preset's start, defocus estimator and fill
    (explicit search_init / defocus_estimator / defocus_fill win); None keeps the
    default. Raises ValueError for invalid settings (e.g. level_iters with num_iters).
    """
    cfg = Config(solver=schedule(quality=quality, pyramid_levels=pyramid_levels,
                                 level_iters=level_iters, num_iters=num_iters,
                                 optimizer=optimizer))
    for key, value in (("mpi.num_layers", num_layers), ("refine.iters", refine_iters),
                       ("solver.colour_levels", colour_levels),
                       ("solver.kernel_mass_cut", kernel_mass_cut)):
        if value is not None:
            cfg = cfg.replace(**{key: value})
    return resolve_base(preset, cfg, search_init=search_init,
                        defocus_estimator_name=defocus_estimator, fill=defocus_fill)


def linear_input_solver(**settings) -> SolverConfig | None:
    """The solver for linear input (raw, 16-bit, float files) under `base_config`'s
    `settings`, where it differs from `base_config(**settings).solver`; else None.

    With no optimizer asked for, display-referred input is fitted with the default
    optimizer (`config.DEFAULT_OPTIMIZER`) and linear input with
    `config.LINEAR_INPUT_OPTIMIZER` on its own schedule (the measurements are beside
    those constants); `dpjax.scene.configure` applies it per scene
    (`SceneOptions.linear_solver`). None when an optimizer is asked for, and for the
    paper preset (the paper's Adam).
    """
    if (settings.get("optimizer") is not None or settings["preset"] == "paper"
            or LINEAR_INPUT_OPTIMIZER == DEFAULT_OPTIMIZER):
        return None
    return base_config(**{**settings, "optimizer": LINEAR_INPUT_OPTIMIZER}).solver


def resolve(preset: str, scene_id, views, bank: KernelBank, base: Config, *,
            probe: bool = False, search: SearchMap | None = None) -> tuple[Config, dict]:
    """One scene's configuration under `preset`, and the record of how it was chosen.

    The one place presets are applied (run_solver.py, reproduce_table.py and the runner
    call it): `auto` estimates the layer range from the pair (`estimate_auto_range`,
    refined by the probe solve when `probe`), `paper` looks the scene up in the paper's
    table (`paper_config`), `none` keeps `base`.

    Args:
      preset: one of PRESETS.
      scene_id: the scene's name (the paper preset's key).
      views: [2, H, W, C] the scene's views; bank: kernels covering them.
      base: from `resolve_base`.
      probe: auto: refine the range with the coarse probe solve.
      search: auto: `range_search(views, bank, ...)` when already run (else the
        grid as developed is searched here).

    Returns:
      (config, record): record has "name", "scale_range", "seconds" and, for auto,
      "range_estimate", "range_probe" and "search_span" (the candidate grid's factor,
      `search_scales`).

    Raises:
      ValueError: an unknown preset, or a scene the paper preset does not know.
    """
    t0 = time.perf_counter()
    info: dict = {"name": preset}
    if preset == "none":
        cfg = base
    elif preset == "paper":
        cfg = paper_config(scene_id, base)
    elif preset == "auto":
        est = estimate_auto_range(views, bank, base, probe=probe, search=search)
        cfg = auto_config_from_estimate(est, base)
        info["range_estimate"] = est._asdict()
        info["range_probe"] = bool(probe)
        info["search_span"] = 1.0 if search is None else search.span
    else:
        raise ValueError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    info["scale_range"] = [cfg.mpi.scale_min, cfg.mpi.scale_max]
    info["seconds"] = time.perf_counter() - t0
    return cfg, info


def paper_config(scene_id, base: Config | None = None) -> Config:
    """`base` with the paper's layer range and prior weights for one Pixel 4 scene.

    Args:
      scene_id: "001" ... "017" (ints and unpadded strings accepted).
      base: the configuration to start from (solver schedule etc. are kept);
        default Config().

    Raises:
      ValueError: for a scene the paper did not list (the message names the known ids).
    """
    key = _scene_key(scene_id)
    if key not in PAPER_SCENES:
        raise ValueError(f"no paper settings for scene {scene_id!r}; the paper's preset knows "
                         f"scenes {', '.join(sorted(PAPER_SCENES))} (use the auto preset "
                         "for other captures)")
    p = PAPER_SCENES[key]
    base = Config() if base is None else base
    return base.replace(**{"mpi.scale_min": p["s_min"], "mpi.scale_max": p["s_max"],
                           "loss.alpha_tv": p["alpha_tv"], "loss.entropy": p["entropy"],
                           "loss.noise_power": 0.0})  # the published, unweighted data terms


def kernel_base_disparity(bank: KernelBank) -> float:
    """Mean over tiles of |x-centroid(k_R) - x-centroid(k_L)| at s = 1, in pixels.

    At signed scale s both kernels scale about their centre, so the horizontal
    disparity between the views of a point at scale s is s times this.
    """
    k = np.asarray(bank.kernels, np.float64)  # [V, T, K, K]
    c = np.arange(k.shape[-1]) - (k.shape[-1] - 1) / 2
    cx = (k.sum(axis=-2) * c).sum(axis=-1) / k.sum(axis=(-2, -1))  # [V, T]
    return float(np.mean(np.abs(cx[1] - cx[0])))


class RangeEstimate(NamedTuple):
    """What `analyze_scale_range` found (all scales signed, layer-scale units).

    s_min, s_max: the range to use; p_lo, p_hi: the search's raw 5th and 90th
    percentiles (None when too few pixels were confident); confident_fraction: share
    of pixels used; factor: the search resolution's downsampling factor; fallback:
    True when the search kept the base range. The probe_* fields describe the
    coarse-level solve that refines the search's range (`probe_scale_range`).
    """

    s_min: float
    s_max: float
    p_lo: float | None
    p_hi: float | None
    confident_fraction: float
    factor: int
    fallback: bool
    # Set by `probe_scale_range` (None / 0 when the search range was kept):
    search_range: tuple[float, float] | None = None  # the symmetry search's range
    probe_range: tuple[float, float] | None = None  # the layer range the probe solved
    probe_p_lo: float | None = None  # its defocus map's 1st and 99th percentiles
    probe_p_hi: float | None = None
    probe_factor: int = 0  # the probe's downsampling factor
    probe_iters: int = 0
    probe_s: float = 0.0  # the probe's wall time (compilation included)
    probe_note: str | None = None  # why no probe ran, when it did not


def _search_factor(bank: KernelBank, max_factor: int = 2) -> int:
    base = kernel_base_disparity(bank)
    g = bank.grid
    f = max_factor
    while f > 1:
        if (g.tile_h % f == 0 and g.tile_w % f == 0 and base / f >= _MIN_DISPARITY_PX):
            return f
        f //= 2
    return 1


def _downsample_views(views: np.ndarray, f: int) -> np.ndarray:
    if f == 1:
        return views
    v, h, w, c = views.shape
    return views.reshape(v, h // f, f, w // f, f, c).mean(axis=(2, 4))


class SearchMap(NamedTuple):
    """The kernel-symmetry search's per-pixel result (`search_defocus`).

    defocus: [h, w] float32 signed scale per pixel at the search resolution;
    confident: [h, w] bool, the pixels the range rule uses (module docstring, step 3);
    factor: h = H / factor, w = W / factor; span: the candidate grid's factor on
    SEARCH_SCALES (`search_scales`).
    """

    defocus: np.ndarray
    confident: np.ndarray
    factor: int
    span: float = 1.0


def search_scales(blur_p90: float | None = None) -> tuple[np.ndarray, float]:
    """The range search's candidate scales and their factor on SEARCH_SCALES.

    Args:
      blur_p90: the 90th-percentile blur radius of the photos the kernels were fitted
        to, in the kernels' unit (`io.CalibratedKernels.blur_p90`); None (a lab
        calibration, the parametric model): the grid as developed, SEARCH_SCALES.

    Returns:
      ([N] float32 candidates, span): SEARCH_SCALES * span with span = blur_p90 /
      DEVELOPED_BLUR_P90, so that the candidates are the same multiples of the photos'
      blur as they were for the lab kernels (the confidence rule compares a pixel's
      best cost with the median over the candidates, which depends on how far they
      reach).

    Raises:
      ValueError: blur_p90 not a positive finite number.
    """
    span = 1.0
    if blur_p90 is not None:
        if not (math.isfinite(blur_p90) and blur_p90 > 0):
            raise ValueError(f"blur_p90 must be a positive number; got {blur_p90}")
        span = float(blur_p90) / DEVELOPED_BLUR_P90
    return np.asarray(SEARCH_SCALES, np.float32) * np.float32(span), span


def search_defocus(views, bank: KernelBank, *, blur_p90: float | None = None) -> SearchMap:
    """The calibrated kernel-symmetry search (module docstring, 1-3).

    Args:
      views: [2, H, W, C] left/right views.
      bank: calibrated kernels covering H x W (re-centred or not: a common shift of
        a tile's pair leaves the symmetry identity unchanged).
      blur_p90: the photos' blur in the kernels' unit, when the calibration records
        it (`search_scales`).

    Returns:
      SearchMap at half resolution where the base disparity allows, else full.
    """
    views = np.asarray(views, np.float32)
    if views.ndim != 4 or views.shape[0] != 2:
        raise ValueError(f"views must be [2, H, W, C]; got {views.shape}")
    f = _search_factor(bank)
    small_bank = downsample_bank(bank, f)
    small = _downsample_views(views, f)
    window = max(3, baselines.STEREO_WINDOW // f) | 1  # odd
    cands, span = search_scales(blur_p90)
    res = baselines.dp_stereo_defocus(small, small_bank, cands, window=window)
    d = np.asarray(res.defocus, np.float32)
    interior = (d > cands[0] + 1e-4) & (d < cands[-1] - 1e-4)
    textured = res.texture > np.percentile(res.texture, _TEXTURE_QUANTILE)
    conf = (res.confidence > _CONFIDENCE_MIN) & textured & interior
    return SearchMap(d, conf, f, span)


def range_search(views, bank: KernelBank, *, blur_p90: float | None = None,
                 search: SearchMap | None = None) -> SearchMap:
    """The search the auto range uses: over the grid scaled to the kernels' recorded
    blur (`search_scales`); the search start keeps the grid as developed
    (experiments/results/own_camera.md, "The range searched in the photos' blur").

    Args:
      views: [2, H, W, C] left/right views.
      bank: calibrated kernels covering H x W.
      blur_p90: the photos' blur in the kernels' unit, or None (`search_scales`).
      search: a search already run (the start's); returned as it is when it was run
        over the same grid, so that a calibration without a recorded blur searches once.

    Returns:
      SearchMap.
    """
    _, span = search_scales(blur_p90)
    if search is not None and search.span == span:
        return search
    return search_defocus(views, bank, blur_p90=blur_p90)


def analyze_scale_range(views, bank: KernelBank, *,
                        default: tuple[float, float] | None = None,
                        search: SearchMap | None = None) -> RangeEstimate:
    """The defocus range of a DP pair from the kernel-symmetry search (module docstring).

    Args:
      views: [2, H, W, C] left/right views.
      bank: calibrated kernels covering H x W.
      default: range returned when too few pixels are confident (default: MpiConfig's
        scale_min, scale_max).
      search: `search_defocus(views, bank)` when the caller already has it.

    Returns:
      RangeEstimate.
    """
    search = search_defocus(views, bank) if search is None else search
    d, conf, f = search.defocus, search.confident, search.factor
    frac = float(conf.mean())
    if frac < MIN_CONFIDENT_FRACTION:
        if default is None:
            mc = MpiConfig()
            default = (mc.scale_min, mc.scale_max)
        return RangeEstimate(float(default[0]), float(default[1]), None, None, frac, f, True)
    p_lo, p_hi = (float(v) for v in np.percentile(d[conf], _PERCENTILES))
    lo, hi = _finish_range(p_lo - _NEAR_MARGIN * (p_hi - p_lo), p_hi)
    return RangeEstimate(lo, hi, p_lo, p_hi, frac, f, False)


def _finish_range(lo: float, hi: float) -> tuple[float, float]:
    """Clamped to SCALE_LIMITS, at least _MIN_WIDTH wide (grown about its centre),
    rounded outwards to two decimals (readable configs; far below a layer spacing)."""
    lo, hi = max(SCALE_LIMITS[0], lo), min(SCALE_LIMITS[1], hi)
    if hi - lo < _MIN_WIDTH:
        centre = min(max(0.5 * (lo + hi), SCALE_LIMITS[0] + _MIN_WIDTH / 2),
                     SCALE_LIMITS[1] - _MIN_WIDTH / 2)
        lo, hi = centre - _MIN_WIDTH / 2, centre + _MIN_WIDTH / 2
    return math.floor(lo * 100) / 100, math.ceil(hi * 100) / 100


def estimate_scale_range(views, bank: KernelBank) -> tuple[float, float]:
    """(s_min, s_max) for the MPI layers of this DP pair (see `analyze_scale_range`)."""
    est = analyze_scale_range(views, bank)
    return est.s_min, est.s_max


def _probe_factor(bank: KernelBank) -> int:
    f = PROBE_FACTOR
    while f > 1 and (bank.grid.tile_h % f or bank.grid.tile_w % f):
        f //= 2
    return f


def probe_scale_range(views, bank: KernelBank, est: RangeEstimate,
                      base: Config | None = None, *,
                      num_iters: int = PROBE_ITERS) -> RangeEstimate:
    """Refines a search estimate with a short coarse-level solve (module docstring).

    Args:
      views: [2, H, W, C] left/right views.
      bank: calibrated kernels covering H x W.
      est: the symmetry search's estimate (`analyze_scale_range`).
      base: configuration whose layer count and solver settings the probe uses, with
        the auto weights (default Config()); the probe runs Adam whatever base's
        optimizer (it was measured so).
      num_iters: Adam iterations of the probe.

    Returns:
      `est` with the probe's range as (s_min, s_max) and the probe_* fields filled;
      `est` unchanged but for search_range and probe_note when no probe can run (tiles
      not divisible by 2) or the probe diverges.
    """
    base = Config() if base is None else base
    est = est._replace(search_range=(est.s_min, est.s_max))
    f = _probe_factor(bank)
    if f == 1:
        return est._replace(probe_note="tiles not divisible by 2: no coarse probe")
    views = np.asarray(views, np.float32)
    width = est.s_max - est.s_min
    lo = max(SCALE_LIMITS[0], est.s_min - _PROBE_WIDEN * width)
    hi = min(SCALE_LIMITS[1], est.s_max + _PROBE_WIDEN * width)
    cfg = auto_config_from_estimate(est, base).replace(**{
        "mpi.scale_min": lo, "mpi.scale_max": hi, "solver.pyramid_levels": 1,
        "solver.level_iters": None, "solver.num_iters": int(num_iters),
        "solver.optimizer": "adam", "solver.rel_tol": 0.0, "post.bilateral": False,
        "refine.iters": 0})
    t0 = time.perf_counter()
    try:
        res = solver.fit(_downsample_views(views, f), downsample_bank(bank, f), cfg)
    except FloatingPointError as e:
        return est._replace(probe_note=f"probe diverged ({e}): search range kept")
    p_lo, p_hi = (float(v) for v in np.percentile(res.defocus, _PROBE_PERCENTILES))
    # Half a final layer spacing beyond the percentiles puts them on the end layers.
    pad = (p_hi - p_lo) / (2 * cfg.mpi.num_layers - 3)
    s_min, s_max = _finish_range(p_lo - pad, p_hi + pad)
    return est._replace(s_min=s_min, s_max=s_max, probe_range=(lo, hi), probe_p_lo=p_lo,
                        probe_p_hi=p_hi, probe_factor=f, probe_iters=int(num_iters),
                        probe_s=time.perf_counter() - t0)


def estimate_auto_range(views, bank: KernelBank, base: Config | None = None, *,
                        probe: bool = False, search: SearchMap | None = None) -> RangeEstimate:
    """The auto preset's layer range: the symmetry search, refined by the coarse probe.

    Args:
      views: [2, H, W, C] left/right views.
      bank: calibrated kernels covering H x W.
      base: the configuration to solve with (its range is the search's fallback; its
        layer count and solver settings are the probe's); default Config().
      probe: refine the search's range with the coarse-level probe solve (opt-in:
        about +20% solve time; module docstring).
      search: `search_defocus(views, bank)` when the caller already has it.
    """
    base = Config() if base is None else base
    est = analyze_scale_range(views, bank, default=(base.mpi.scale_min, base.mpi.scale_max),
                              search=search)
    return probe_scale_range(views, bank, est, base) if probe else est


def auto_config(views, bank: KernelBank, base: Config | None = None, *,
                probe: bool = False) -> Config:
    """`base` (default Config()) with the layer range estimated from the pair
    (`estimate_auto_range`) and the fixed auto weights."""
    return auto_config_from_estimate(estimate_auto_range(views, bank, base, probe=probe), base)


def auto_config_from_estimate(est: RangeEstimate, base: Config | None = None) -> Config:
    """`base` with an estimated range (see `estimate_auto_range`) and the auto weights."""
    base = Config() if base is None else base
    return base.replace(**{"mpi.scale_min": est.s_min, "mpi.scale_max": est.s_max,
                           "loss.alpha_tv": AUTO_ALPHA_TV, "loss.entropy": AUTO_ENTROPY})
