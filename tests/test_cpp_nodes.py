"""The eager CPU calls' autograd nodes in C++ (mmm4rec_kernels/cpu/nodes.py, autograd_nodes.cpp) against their Python
twins (ops._ConvCPU, torch_backend._TiSSDCPU): the same C entries with the same arguments, so outputs and every
gradient must be EQUAL, bit for bit, over the argument kinds each node takes (pieces with unused gradients, weight
layouts, strided inputs, optional tensors, both dtypes, 1 and 2 threads, empty batches); the double-backward rule of
@once_differentiable; the non-finite fallback; MMM4REC_CPP_NODES (auto builds in the background, 0, a bad value) and
a failed build (one warning, Python nodes).  Their values against the float64 reference: test_conv_channels_last.py
and test_tissd_native_cpu.py (which run the C++ nodes wherever they load)."""
import os
import subprocess
import sys

import pytest
import torch

from mmm4rec_kernels import torch_backend
from mmm4rec_kernels.cpu import nodes
from mmm4rec_kernels.modules.conv import causal_conv1d_channels_last

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_both(fn, leaves, cotangents):
    """fn() -> output(s) through the C++ nodes and through the Python ones: [(outputs, gradients of the leaves)] x 2.
    cotangents: one per output, None = that output unused (its gradient stays undefined)."""
    out = []
    for use_python in (False, True):
        ls = [None if t is None else t.detach().clone().requires_grad_(t.requires_grad) for t in leaves]
        if use_python:
            with nodes.python_nodes():
                ys = fn(*ls)
        else:
            ys = fn(*ls)
        ys = ys if isinstance(ys, tuple) else (ys,)
        used = [(y, g) for y, g in zip(ys, cotangents) if g is not None]
        wrt = [t for t in ls if t is not None and t.requires_grad]
        grads = torch.autograd.grad([y for y, _ in used], wrt, [g for _, g in used], allow_unused=True)
        out.append((ys, grads, ys[0].grad_fn.name()))
    return out


def assert_equal(both):
    (yc, gc, name_c), (yp, gp, name_p) = both
    assert "ConvNode" in name_c or "TiSSDNode" in name_c, name_c
    assert "ConvNode" not in name_p and "TiSSDNode" not in name_p, name_p
    for a, b in zip(yc, yp):
        assert a.shape == b.shape and torch.equal(a, b)
    for i, (a, b) in enumerate(zip(gc, gp)):
        assert (a is None) == (b is None), i
        assert a is None or torch.equal(a, b), i


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("k", [1, 4, 5])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_node_equals_python_node(cpp_nodes, dtype, silu, k, bias):
    g = torch.Generator().manual_seed(k * 10 + silu)
    b, L, C = 3, 7, 40
    x = torch.randn(b, L, C, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(C, 1, k, generator=g, dtype=dtype, requires_grad=True)
    bi = torch.randn(C, generator=g, dtype=dtype, requires_grad=True) if bias else None
    gy = torch.randn(b, L, C, generator=g, dtype=dtype)
    assert_equal(run_both(lambda x, w, bi: causal_conv1d_channels_last(x, w, bi, silu=silu), [x, w, bi], [gy]))


@pytest.mark.parametrize("threads", [1, 2])
def test_conv_node_pieces_strides_and_threads(cpp_nodes, threads):
    """Split output with an unused piece (its gradient never materialised), x a channel slice of a wider tensor,
    weight [C, k] with swapped strides, an output gradient with a non-unit channel stride, 2 threads."""
    g = torch.Generator().manual_seed(1)
    b, L, C = 5, 20, 48
    wide = torch.randn(b, L, C + 9, generator=g, requires_grad=True)
    w = torch.randn(4, C, generator=g).t().requires_grad_()               # [C, k], strides (1, C)
    bi = torch.randn(C, generator=g, requires_grad=True)
    g0 = torch.randn(b, L, 2 * 16, generator=g)[..., ::2]                 # channel stride 2
    g2 = torch.randn(b, L, 16, generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        both = run_both(lambda wd, w, bi: causal_conv1d_channels_last(wd[..., 4:4 + C], w, bi, silu=True,
                                                                       split=[16, 16, 16]),
                        [wide, w, bi], [g0, None, g2])
    finally:
        torch.set_num_threads(before)
    assert_equal(both)
    assert len(both[0][0]) == 3


@pytest.mark.parametrize("shape", [(24, 1, 3), (24, 3), (24,), (24, 3, 1)])
def test_conv_node_weight_shapes(cpp_nodes, shape):
    """weight [C, 1, k] goes to the node as it is, [C, k] too; other shapes as reshape(C, -1) (k = 1 for [C]); the
    weight's gradient keeps its shape."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 9, 24, generator=g, requires_grad=True)
    w = torch.randn(*shape, generator=g, requires_grad=True)
    both = run_both(lambda x, w: causal_conv1d_channels_last(x, w, silu=True), [x, w], [torch.randn(2, 9, 24)])
    assert_equal(both)
    assert both[0][1][1].shape == w.shape
    ref = torch.nn.functional.conv1d(torch.nn.functional.pad(x.transpose(1, 2), (w[0].numel() - 1, 0)),
                                     w.reshape(24, 1, -1), groups=24)
    assert torch.allclose(both[0][0][0], torch.nn.functional.silu(ref).transpose(1, 2), atol=1e-5)


def test_nodes_refuse_wrong_arguments(cpp_nodes):
    """The module's own checks: a wrong call raises (the callers check first; the node must not read out of bounds)."""
    x = torch.randn(2, 5, 8)
    with pytest.raises(RuntimeError, match="weight must be"):
        cpp_nodes.causal_conv(x, torch.randn(8), None, True, [8])
    with pytest.raises(RuntimeError, match="sizes must sum"):
        cpp_nodes.causal_conv(x, torch.randn(8, 4), None, True, [4])
    with pytest.raises(RuntimeError, match="dtype"):
        cpp_nodes.causal_conv(x, torch.randn(8, 4, dtype=torch.float64), None, True, [8])
    x, dt, A, B, C, E, dt_bias, Dh, _, lengths, _ = tissd_inputs(torch.float32)
    with pytest.raises(RuntimeError, match="D must be"):
        cpp_nodes.tissd(x, dt, A, B, C, E, dt_bias, torch.ones(3, 2), lengths, True, True)
    with pytest.raises(RuntimeError, match="lengths"):
        cpp_nodes.tissd(x, dt, A, B, C, E, dt_bias, Dh, lengths.int(), True, True)
    with pytest.raises(RuntimeError, match="contiguous"):
        cpp_nodes.tissd(x.transpose(0, 1).contiguous().transpose(0, 1), dt, A, B, C, E, dt_bias, Dh, lengths, True,
                        True)


def test_conv_node_empty_batch(cpp_nodes):
    x = torch.zeros(0, 5, 8, requires_grad=True)
    w, bi = torch.randn(8, 1, 4, requires_grad=True), torch.randn(8, requires_grad=True)
    assert_equal(run_both(lambda x, w, bi: causal_conv1d_channels_last(x, w, bi, silu=True), [x, w, bi],
                          [torch.zeros(0, 5, 8)]))


def tissd_inputs(dtype, L=20, b=4, H=4, P=3, G=2, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    x, dt, B, C = mk(b, L, H, P), mk(b, L, H), mk(b, L, G, n), mk(b, L, G, n)
    A = -torch.rand(H, generator=g, dtype=dtype)
    E = torch.rand(b, L, H, generator=g, dtype=dtype) + 0.1
    lengths = torch.randint(0, L + 1, (b,), generator=g)
    lengths[0] = L
    return x, dt, A, B, C, E, mk(H), mk(H), mk(H, P), lengths, mk(b, L, H, P)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("D_kind", ["head", "channel", None])
@pytest.mark.parametrize("optional", ["all", "none"])
@pytest.mark.parametrize("d_skip,softplus", [("delta", True), ("plain", False)])
def test_tissd_node_equals_python_node(cpp_nodes, dtype, D_kind, optional, d_skip, softplus):
    """Every gradient (x, dt, A, B, C, E, dt_bias, D) equal; E / dt_bias / lengths given or not; a sequence of
    length 0 among them."""
    x, dt, A, B, C, E, dt_bias, Dh, Dc, lengths, gy = tissd_inputs(dtype, seed=3)
    if not softplus:
        dt = dt.abs()
    D = {"head": Dh, "channel": Dc, None: None}[D_kind]
    full = optional == "all"
    leaves = [x, dt, A, B, C, E if full else None, dt_bias if full else None, D]
    for t in leaves:
        if t is not None:
            t.requires_grad_()

    def call(x, dt, A, B, C, E, dt_bias, D):
        return torch_backend.tissd_torch(x, dt, A, B, C, time_scale=E, dt_bias=dt_bias, D=D, d_skip=d_skip,
                                         dt_softplus=softplus, lengths=lengths if full else None, path="quadratic")
    assert_equal(run_both(call, leaves, [gy]))


def test_tissd_node_two_threads_and_inference(cpp_nodes):
    x, dt, A, B, C, E, dt_bias, Dh, _, lengths, gy = tissd_inputs(torch.float32, L=63, b=9, seed=5)
    leaves = [t.requires_grad_() for t in (x, dt, A, B, C, E, dt_bias, Dh)]

    def call(x, dt, A, B, C, E, dt_bias, D):
        return torch_backend.tissd_torch(x, dt, A, B, C, time_scale=E, dt_bias=dt_bias, D=D, lengths=lengths,
                                         path="quadratic")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert_equal(run_both(call, leaves, [gy]))
    finally:
        torch.set_num_threads(before)
    with torch.inference_mode():
        y = call(*leaves)
        with nodes.python_nodes():
            assert torch.equal(y, call(*leaves))


def test_tissd_node_nonfinite_input_falls_back(cpp_nodes):
    """A NaN at a valid step: the C++ node returns None and the general path runs, as with the Python node."""
    x, dt, A, B, C, E, _, Dh, _, lengths, gy = tissd_inputs(torch.float64, seed=7)
    x[1, 3, 0, 0] = float("nan")
    lengths[1] = 20
    y = torch_backend.tissd_torch(x, dt, A, B, C, time_scale=E, D=Dh, lengths=lengths, path="quadratic")
    with nodes.python_nodes():
        yp = torch_backend.tissd_torch(x, dt, A, B, C, time_scale=E, D=Dh, lengths=lengths, path="quadratic")
    assert torch.equal(y.isnan(), yp.isnan()) and bool(y[1, 3:].isnan().any()) and not bool(y[1, :3].isnan().any())
    assert torch.equal(y.nan_to_num(), yp.nan_to_num())


@pytest.mark.parametrize("which", ["conv", "tissd"])
def test_double_backward_raises_as_once_differentiable(cpp_nodes, which):
    """create_graph=True: the first backward works, differentiating its result again raises @once_differentiable's
    error, for the C++ node as for the Python one."""
    if which == "conv":
        x = torch.randn(2, 5, 8, requires_grad=True)
        inputs = (x,)
        fn = lambda: causal_conv1d_channels_last(x, torch.randn(8, 1, 4), silu=True)  # noqa: E731
    else:
        x, dt, A, B, C, *_ = tissd_inputs(torch.float64)
        x.requires_grad_()
        inputs = (x,)
        fn = lambda: torch_backend.tissd_torch(x, dt, A, B, C, path="quadratic")  # noqa: E731
    for use_python in (False, True):
        with (nodes.python_nodes() if use_python else torch.enable_grad()):
            y = fn()
            gy = torch.randn_like(y, requires_grad=True)
            (gx,) = torch.autograd.grad(y, inputs, gy, create_graph=True)
            assert gx.requires_grad
            with pytest.raises(RuntimeError, match="once_differentiable"):
                gx.sum().backward()


def _run(code, **env):
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "PYTHONPATH": ROOT, **env})
    assert r.returncode == 0, r.stderr[-3000:]
    return r


PROBE = ("import logging, torch; logging.basicConfig(level=logging.INFO); from mmm4rec_kernels.cpu import nodes; "
         "from mmm4rec_kernels.modules.conv import causal_conv1d_channels_last as f; "
         "x = torch.randn(2, 5, 3, requires_grad=True); w = torch.randn(3, 1, 4); "
         "print(f(x, w, silu=True).grad_fn.name()); nodes.get(wait=True); print(f(x, w, silu=True).grad_fn.name()); "
         "print(nodes.status())")


def test_modes(cpp_nodes):
    """auto: the first call starts the build in the background and runs the Python node; once loaded the C++ node
    runs (the module is already in the cache here: no second compile).  0: Python nodes, said so.  A bad value: an
    error naming MMM4REC_CPP_NODES."""
    first, then, status = _run(PROBE, MMM4REC_CPP_NODES="auto").stdout.strip().splitlines()
    assert "ConvNode" not in first and "ConvNode" in then and status.startswith("C++ autograd nodes: /")
    first, then, status = _run(PROBE, MMM4REC_CPP_NODES="0").stdout.strip().splitlines()
    assert "ConvNode" not in first + then and "MMM4REC_CPP_NODES=0" in status
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "PYTHONPATH": ROOT, "MMM4REC_CPP_NODES": "sometimes"})
    assert r.returncode != 0 and "MMM4REC_CPP_NODES must be one of auto, wait, 0, got 'sometimes'" in r.stderr


@pytest.mark.slow
def test_a_failed_build_leaves_the_python_nodes(cpp_nodes, tmp_path):
    """A compiler that builds the kernels (a shell wrapper around the real one: a fresh kernel build, ~25 s) but
    fails on the nodes' source: one warning with its error, the Python nodes."""
    import shutil
    real = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    wrapper = tmp_path / "cxx"
    wrapper.write_text('#!/bin/sh\ncase "$*" in *autograd_nodes.cpp*) echo "error: no torch headers here" >&2; '
                       f'exit 1;; esac\nexec "{real}" "$@"\n')
    wrapper.chmod(0o755)
    r = _run(PROBE, MMM4REC_CPP_NODES="wait", CXX=str(wrapper), MMM4REC_CACHE_DIR=str(tmp_path / "cache"))
    first, then, status = r.stdout.strip().splitlines()
    assert "ConvNode" not in first + then and "no torch headers here" in status and "Python nodes" in status
    assert "WARNING" in r.stderr and "C++ autograd nodes unavailable" in r.stderr


def test_stale_build_outputs_are_removed(tmp_path):
    """A build's temporary output left by a process that exited mid-build goes after an hour; fresh temporaries (a
    build in progress) and built modules stay."""
    stale, fresh = tmp_path / "_mmm4rec_nodes-abc.tmp.so", tmp_path / "_mmm4rec_nodes-def.tmp.so"
    built, other = tmp_path / "_mmm4rec_nodes-0123.cpython-311-x86_64-linux-gnu.so", tmp_path / "mmm4rec_cpu-1.so"
    for p in (stale, fresh, built, other):
        p.write_bytes(b"x")
    old = os.path.getmtime(stale) - 7200
    for p in (stale, built, other):
        os.utime(p, (old, old))
    nodes._remove_stale_temporaries(str(tmp_path))
    assert not stale.exists() and fresh.exists() and built.exists() and other.exists()


def test_exit_during_a_background_build_stops_it(cpp_nodes, tmp_path):
    """A process that exits while its background build runs stops the compiler (its whole process group) and leaves
    no output behind; the next process builds afresh.  (The kernel library is copied into the fresh cache: no kernel
    build.)"""
    import glob
    import shutil
    import time

    import mmm4rec_kernels.cpu as native
    cache = tmp_path / "cache"
    cache.mkdir()
    for lib in glob.glob(os.path.join(native.library_folder(), "mmm4rec_cpu-*.so")):
        shutil.copy(lib, cache)
    code = ("import torch, time; from mmm4rec_kernels.modules.conv import causal_conv1d_channels_last as f; "
            "x = torch.randn(2, 5, 3, requires_grad=True); print(f(x, torch.randn(3, 1, 4)).grad_fn.name()); "
            "time.sleep(1)")
    r = _run(code, MMM4REC_CPP_NODES="auto", MMM4REC_CACHE_DIR=str(cache))
    assert "ConvNode" not in r.stdout and "unavailable" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    time.sleep(0.5)
    assert not list(cache.glob("*.tmp.so")) and not list(cache.glob("_mmm4rec_nodes-*.so")), list(cache.iterdir())
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(cache) not in ps, "a compiler of the exited process still runs"
