"""Test setup: without a CUDA device, Triton kernels run under the interpreter (must be set before triton imports).

`pytest` without paths spreads the tests over worker processes when pytest-xdist is installed (see
pytest_cmdline_main).  Torch CPU threads are fixed for the whole session (MMM4REC_TEST_THREADS, default 1: the suite's ops are small, and
on a shared 2-core machine one thread was many times faster than two) and restored after every test, because the
CLI's `main()` sets its own thread count and would otherwise make the suite's speed depend on test order.  Autograd
anomaly detection must be off after every test (RecBole's model import switches it on process-wide).  The C++
autograd nodes of the eager CPU calls are built before their first use (MMM4REC_CPP_NODES=wait)."""
import os
import shutil

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# the eager CPU calls' C++ autograd nodes (mmm4rec_kernels/cpu/nodes.py) are built before the first call that uses
# them, not in the background: every test sees the same nodes from its first call on (tests that need the Python
# nodes ask for them: the python_nodes fixture)
os.environ.setdefault("MMM4REC_CPP_NODES", "wait")

TEST_THREADS = int(os.environ.get("MMM4REC_TEST_THREADS", "1"))
torch.set_num_threads(TEST_THREADS)


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """`pytest` / `pytest -q` without paths (the README's command) runs over worker processes when pytest-xdist is
    installed (the test extra installs it): MMM4REC_TEST_WORKERS of them, default min(CPU count, 4), one torch
    thread each.  Given paths, `-n N` (N = 0: one process) or `-p no:xdist` keep pytest's own behaviour."""
    if os.environ.get("PYTEST_XDIST_WORKER") or not config.pluginmanager.hasplugin("xdist"):
        return
    if config.option.numprocesses is not None or config.args != config.getini("testpaths"):
        return
    workers = int(os.environ.get("MMM4REC_TEST_WORKERS", min(os.cpu_count() or 1, 4)))
    if workers > 1:
        config.option.numprocesses = workers


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    yield
    if torch.get_num_threads() != TEST_THREADS:
        torch.set_num_threads(TEST_THREADS)


@pytest.fixture(autouse=True)
def _no_anomaly_detection_leak():
    """A test that leaves autograd anomaly detection on (RecBole 1.2.1 switches it on for the whole process when its
    models are imported) fails here, instead of slowing every later test and failing the NaN-isolation ones."""
    yield
    if torch.is_anomaly_enabled():
        torch.autograd.set_detect_anomaly(False)
        pytest.fail("this test left torch.autograd anomaly detection on")


@pytest.fixture
def launched_precisions(monkeypatch):
    """spy(module) -> list that collects the PRECISION constexpr of every kernel launched through
    module.configs.launch (the Triton paths' single launch point) while the test runs."""
    def spy_on(module):
        seen = []
        launch = module.configs.launch

        def spy(kernel_fn, grid, args, meta, cfg):
            seen.append(meta["PRECISION"])
            return launch(kernel_fn, grid, args, meta, cfg)
        monkeypatch.setattr(module.configs, "launch", spy)
        return seen
    return spy_on


@pytest.fixture
def native_cpu():
    """mmm4rec_kernels.cpu with its library loaded.  Skips where no C++ compiler exists or MMM4REC_NATIVE_CPU=0;
    FAILS where a compiler exists but the library does not build or load (so CI cannot silently skip the kernels)."""
    import mmm4rec_kernels.cpu as native
    if native.library() is None:
        has_compiler = bool(os.environ.get("CXX")) or any(shutil.which(c) for c in ("g++", "c++", "clang++"))
        if has_compiler and os.environ.get("MMM4REC_NATIVE_CPU", "1") != "0":
            pytest.fail(f"a C++ compiler exists but {native.status()}")
        pytest.skip(native.status())
    return native


@pytest.fixture
def cpp_nodes(native_cpu):
    """The eager CPU calls' C++ autograd nodes module (mmm4rec_kernels.cpu.nodes), built if needed.  Skips where it
    cannot be built here (no Python headers, MMM4REC_CPP_NODES=0); FAILS where everything it needs is present but it
    does not build or load."""
    import sysconfig

    from mmm4rec_kernels.cpu import nodes
    if nodes.mode() == "0":
        pytest.skip(nodes.status())
    mod = nodes.get(wait=True)
    if mod is None:
        if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
            pytest.fail(f"the C++ nodes' inputs exist but: {nodes.status()}")
        pytest.skip(nodes.status())
    return mod


@pytest.fixture
def python_nodes(native_cpu):
    """The eager CPU calls use their Python autograd nodes (ops._ConvCPU, torch_backend._TiSSDCPU) during the test,
    whether or not the C++ ones are loaded."""
    from mmm4rec_kernels.cpu import nodes
    nodes.get()                                  # (a first call decides the nodes' status; then set them aside)
    with nodes.python_nodes():
        yield native_cpu
