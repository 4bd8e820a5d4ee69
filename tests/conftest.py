"""Shared fixtures: a tiny synthetic problem, the shared Pixel 4 data location and a
two-node local Ray cluster."""

import os
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest

import dpjax
from dpjax import batch

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pixel4"


def pytest_configure(config):
    """The apps' default persistent compilation cache (dpjax.batch.CACHE_DIR_ENV) goes to
    pytest's cache folder, shared by the workers, never to the user's ~/.cache."""
    cache = getattr(config, "cache", None)  # absent with -p no:cacheprovider
    folder = (cache.mkdir("dpjax_compilation_cache") if cache is not None
              else Path(tempfile.gettempdir()) / "dpjax_test_compilation_cache")
    os.environ.setdefault(batch.CACHE_DIR_ENV, str(folder))
    # The in-process tests solve tiny problems, so compiling is most of their time:
    # XLA's slower passes are off in this process (not in the apps the tests start,
    # which keep the optimised build users get). DPJAX_TEST_XLA_OPT=1 turns them on.
    if os.environ.get("DPJAX_TEST_XLA_OPT") != "1":
        jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture(scope="session")
def pixel4_dir():
    """The shared Pixel 4 scenes (present in CI); tests needing them skip only if absent."""
    if not DATA_DIR.exists():
        pytest.skip(f"shared Pixel 4 data not found at {DATA_DIR}")
    return DATA_DIR


@pytest.fixture(scope="session")
def tiny_bank():
    """2x2 tiles of 32x48 px with slightly different parametric kernels per tile."""
    pairs = [dpjax.parametric_dp_kernels(radius=r, ramp=0.4, smooth_sigma=0.5, size=15)
             for r in (4.0, 4.5, 5.0, 5.5)]
    kernels = np.stack(pairs, axis=1)  # [2, T, K, K]
    return dpjax.KernelBank.create(kernels, rows=2, cols=2, tile_h=32, tile_w=48)


@pytest.fixture
def first_step_scales(monkeypatch):
    """spy(name) wraps `dpjax.solver.<name>` (`_run_chunk` or `_run_chunk_batch`) and
    returns a list that gets, for each pyramid level's first chunk, (the parameters'
    [H, W], the seeded first-step scale it starts from: a scalar, or [B] in a batch)."""
    from dpjax import solver

    def spy_on(name):
        seen = []
        orig = getattr(solver, name)

        def spy(params, opt_state, step0, *args, **kwargs):
            if int(step0) == 0:
                seen.append((params.color_logits.shape[-2:],
                             np.asarray(opt_state[solver._SEED_STATE].scale)))
            return orig(params, opt_state, step0, *args, **kwargs)

        monkeypatch.setattr(solver, name, spy)
        return seen

    return spy_on


@pytest.fixture(scope="session")
def ray_cluster():
    """A real two-node Ray cluster on this machine: a head and one more node (separate
    raylets and worker processes), one CPU each. Started once per test process (~25 s
    on a 2-core CPU) and shared by the Ray test files; only these processes are stopped
    afterwards. Tests connect with its `.address` (the machine's IP: Ray rewrites
    127.0.0.1)."""
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'dpjax[ray]')")
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "object_store_memory": 80 * 2**20})
    try:
        c.add_node(num_cpus=1, object_store_memory=80 * 2**20)
        c.wait_for_nodes()
        yield c
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.shutdown()
