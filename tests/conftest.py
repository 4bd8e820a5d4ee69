"""Shared fixtures: a tiny synthetic problem, the shared Pixel 4 data location, the
reproduce_table script as a module, and a two-node local Ray cluster."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

import dpjax

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pixel4"
REPRODUCE_TABLE = Path(__file__).resolve().parents[1] / "experiments" / "reproduce_table.py"


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


@pytest.fixture(scope="session")
def reproduce_table():
    """experiments/reproduce_table.py imported once (its absl flags are global)."""
    name = "reproduce_table"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPRODUCE_TABLE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


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
