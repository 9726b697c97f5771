"""The eager CPU calls' autograd nodes in C++ (autograd_nodes.cpp): the causal conv + SiLU (ops._ConvCPU) and the
tissd() call (torch_backend._TiSSDCPU) as torch C++ autograd Functions around the same C entries of the native
library, so the same values bit for bit, without the Python interpreter in their forward and backward.  Measured
(benchmarks/bench_call_overhead.py, 1 thread, 3 runs; benchmarks/RESULTS.md): at batch 256, L 20 the C++ node is
0.15-0.22 ms faster per conv call and 0.14-0.16 ms per tissd() call than the Python one (after a kernel has swept
the caches, the interpreter runs from memory); at batch 1 0.04-0.05 ms warm, 0.10-0.14 ms with swept caches.

The module is compiled once per torch build, Python and source (~20 s with g++: torch's headers) into the native
library's cache folder (MMM4REC_CACHE_DIR, see mmm4rec_kernels.cpu) and loaded from there afterwards.
MMM4REC_CPP_NODES chooses when:
    auto (default)   the first call that would use a node starts the build in a background thread and keeps the
                     Python nodes until it is loaded (one INFO line when it starts, one when it is in use);
    wait             that call builds it (or waits for another process's build) before it runs: every call uses the
                     C++ nodes from the first on (the test suite and `python -m mmm4rec_kernels` do this);
    0                never: the Python nodes.
A failed build (no compiler, no torch headers) leaves the Python nodes and says why in one WARNING line; `status()`
says which nodes run.  Processes building at once build once (a file lock); one that exits mid-build stops its
compiler and leaves nothing behind (the next one builds).  The nodes are eager only: torch.compile / export trace the registered ops (mmm4rec_kernels.ops).
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time

import torch

logger = logging.getLogger("mmm4rec_kernels")

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "autograd_nodes.cpp")
_NAME = "_mmm4rec_nodes"                      # the module's PyInit name
_ENTRIES = ("mmm4rec_conv_fwd", "mmm4rec_conv_bwd", "mmm4rec_tissd_fwd", "mmm4rec_tissd_bwd")
MODES = ("auto", "wait", "0")

_lock = threading.Lock()
_module = None                                # the loaded module (its entries bound), or None
_status: str | None = None                    # None: not started; else one line (building / in use / why not)
_thread: threading.Thread | None = None
_building = None                              # (compiler process, its output file) while a build runs
_exiting = False                              # set at exit (a stopped build is not a failure to report)


def mode() -> str:
    """MMM4REC_CPP_NODES (auto | wait | 0); a bad value is an error naming it."""
    m = os.environ.get("MMM4REC_CPP_NODES", "auto")
    if m not in MODES:
        raise ValueError(f"MMM4REC_CPP_NODES must be one of {', '.join(MODES)}, got {m!r}")
    return m


def _flags() -> list:
    """Compiler flags: torch's and Python's headers, torch's libraries (the paths torch.utils.cpp_extension would
    give, without importing it: it imports setuptools into the process)."""
    root = os.path.dirname(os.path.abspath(torch.__file__))
    inc = [os.path.join(root, "include"), os.path.join(root, "include", "torch", "csrc", "api", "include"),
           sysconfig.get_paths()["include"]]
    lib = os.path.join(root, "lib")
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", 1))
    return (["-O2", "-std=c++20", "-shared", "-fPIC", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
             "-DTORCH_API_INCLUDE_EXTENSION_H"] + [f"-I{p}" for p in inc]
            + [f"-L{lib}", f"-Wl,-rpath,{lib}", "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python"]
            + (["-undefined", "dynamic_lookup"] if sys.platform == "darwin" else []))   # Python's symbols at load


def _target(compiler: str, flags: list) -> str:
    """The module's file in the native library's cache folder, named by a hash of everything it depends on."""
    from . import library_folder
    h = hashlib.sha256(repr((compiler, flags, torch.__version__, torch.version.git_version, sys.version,
                             sysconfig.get_config_var("EXT_SUFFIX"))).encode())
    with open(_SOURCE, "rb") as f:
        h.update(f.read())
    return os.path.join(library_folder(), f"{_NAME}-{h.hexdigest()[:16]}{sysconfig.get_config_var('EXT_SUFFIX')}")


def _remove_stale_temporaries(folder: str, age_s: float = 3600.0) -> None:
    """Remove this module's temporary outputs older than an hour (a process that exited during a background build
    leaves the compiler's output behind)."""
    now = time.time()
    for name in os.listdir(folder):
        if name.startswith(f"{_NAME}-") and name.endswith(".tmp.so"):
            path = os.path.join(folder, name)
            try:
                if now - os.path.getmtime(path) > age_s:
                    os.unlink(path)
            except OSError:
                pass


def _compile(compiler: str, flags: list, out: str) -> str | None:
    """Build `out` atomically (another process's build of the same file is waited for); None or the last error
    line."""
    os.makedirs(os.path.dirname(out), exist_ok=True)
    try:
        import fcntl
    except ImportError:                                       # not Unix: no lock (a concurrent build wastes time)
        fcntl = None
    with open(out + ".lock", "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)                  # released when the file closes
        if os.path.exists(out):
            return None
        _remove_stale_temporaries(os.path.dirname(out))
        fd, tmp = tempfile.mkstemp(prefix=f"{_NAME}-", suffix=".tmp.so", dir=os.path.dirname(out))
        os.close(fd)
        global _building
        try:
            proc = subprocess.Popen([compiler, _SOURCE, "-o", tmp, *flags], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    start_new_session=os.name == "posix")   # its own group: stopped whole
            _building = (proc, tmp)
            stdout, stderr = proc.communicate(timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            _stop_build()                                     # (a timeout: the compiler is stopped)
            if os.path.exists(tmp):
                os.unlink(tmp)
            return f"{type(e).__name__}: {e}"
        finally:
            _building = None
        if proc.returncode != 0:
            if os.path.exists(tmp):                           # (not there when _stop_build removed it)
                os.unlink(tmp)
            lines = [ln for ln in (stderr or stdout).splitlines() if "error" in ln] or \
                (stderr or stdout).strip().splitlines()
            return lines[0].strip() if lines else f"exit {proc.returncode}"
        os.replace(tmp, out)
        return None


@atexit.register
def _stop_build():
    """A build still running when the process exits (or timed out) is stopped and its output removed."""
    global _exiting
    _exiting = True
    if _building is not None:
        proc, tmp = _building
        try:
            if os.name == "posix":
                os.killpg(proc.pid, signal.SIGKILL)     # the driver and the compiler proper it started
            else:
                proc.kill()
        except OSError:
            pass
        proc.wait()
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _load(path: str, lib):
    spec = importlib.util.spec_from_file_location(_NAME, path,
                                                  loader=importlib.machinery.ExtensionFileLoader(_NAME, path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    address = lambda fn: ctypes.cast(fn, ctypes.c_void_p).value  # noqa: E731
    mod.bind([address(getattr(lib, f"{e}_{d}")) for e in _ENTRIES for d in ("f32", "f64")])
    return mod


def _build_and_load(lib, compiler: str):
    """Build (if needed) and load the module; sets _module / _status."""
    global _module, _status
    t0 = time.perf_counter()
    try:
        flags = _flags()
        path = _target(compiler, flags)
        err = _compile(compiler, flags, path)
        mod = None if err is not None else _load(path, lib)
    except Exception as e:                                   # noqa: BLE001 (any failure: the Python nodes stay)
        err, mod = f"{type(e).__name__}: {e}", None
    if mod is None:
        _status = f"C++ autograd nodes unavailable ({err}): Python nodes"
        if not _exiting:                                     # (a build stopped at exit says nothing)
            logger.warning("mmm4rec_kernels: %s", _status)
        return
    _module = mod
    _status = f"C++ autograd nodes: {path} (ready after {time.perf_counter() - t0:.1f} s)"
    logger.info("mmm4rec_kernels: %s", _status)


def get(wait: bool = False):
    """The loaded C++ nodes module, or None (Python nodes).  The first call starts the build as MMM4REC_CPP_NODES
    says (auto: in the background; wait: here); wait=True waits for it whatever the mode (except 0)."""
    global _status, _thread
    if _module is not None or (_status is not None and not wait):
        return _module
    with _lock:                                  # (another thread's call during a build here runs the Python node)
        if _status is None:
            m = mode()
            from . import _compiler, library
            lib, compiler = library(), _compiler()
            if m == "0":
                _status = "C++ autograd nodes off (MMM4REC_CPP_NODES=0): Python nodes"
            elif lib is None or compiler is None:
                _status = "C++ autograd nodes unavailable (no native library or C++ compiler): Python nodes"
            elif m == "wait" or wait:
                _status = "C++ autograd nodes: building"
                _build_and_load(lib, compiler)
            else:
                _status = ("C++ autograd nodes: building in the background (once per torch build); Python nodes "
                           "until then")
                logger.info("mmm4rec_kernels: %s", _status)
                _thread = threading.Thread(target=_build_and_load, args=(lib, compiler), daemon=True,
                                           name="mmm4rec-cpp-nodes")
                _thread.start()
                return None                      # the call that starts the build runs the Python node, always
    if wait and _thread is not None:
        _thread.join()
    return _module


def status() -> str:
    """One line: which autograd nodes the eager CPU calls use, or why the Python ones (does not start a build)."""
    return _status or "C++ autograd nodes: not tried yet (the first native CPU call starts them)"


@contextlib.contextmanager
def python_nodes():
    """Within this block the eager calls use the Python nodes even where the C++ ones are loaded (tests and
    benchmarks compare the two; not thread-safe)."""
    global _module
    saved, _module = _module, None
    try:
        yield
    finally:
        _module = saved
