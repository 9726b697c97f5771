"""CI gate: every shipped Triton kernel config compiles for sm_90 (H100) without a GPU and spills nothing.

Runs `python -m tools.offline_sm90 --check` in a subprocess (it must compile for real: TRITON_INTERPRET is removed
from its environment) over the configs the package would launch at the four benchmark shapes, bf16, fp32+TF32 and
exact fp32, for the path the dispatcher picks at each shape (the table in RESULTS.md covers every path).  Fails on
a compile error, a spill store/load (beyond a capped, reasoned WAIVED_SPILLS entry for this Triton series), shared
memory over a CTA's limit, or a bf16/TF32 tl.dot without a tensor-core layout.
Skips when triton's bundled ptxas is missing.  ~1-2 min on 2 cores.

The spill check is strict under configs.TRITON_PINNED (the Triton torch's CUDA wheel pins, which the `test` extra
and CI install).  Another Triton compiles the same kernels differently: there the gate still fails on a compile
error or an off-tensor-core dot, and reports spills as a warning only (CI shows the neighbouring versions with
`offline_sm90.py --versions`; re-pin with `--sweep`).
"""
import logging
import os
import subprocess
import sys
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ptxas():
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return path if os.path.isfile(path) and os.access(path, os.X_OK) else None


def _offline():
    from tools import offline_sm90
    return offline_sm90


def test_occupancy_estimate_limits():
    """The H100 occupancy estimate picks the tightest of registers, shared memory and threads."""
    occupancy = _offline().occupancy
    assert occupancy(255, 0, 4) == (2, "regs")          # 255 -> 256 regs x 128 threads = 32K: 2 CTAs
    assert occupancy(24, 0, 4) == (16, "threads")       # 2048 threads / 128 (registers would allow 21)
    assert occupancy(64, 100_000, 4)[0] == 2            # 233472 // (100000 + 1024)
    assert occupancy(64, 100_000, 4)[1] == "smem"


def test_spill_waivers_are_per_triton_series_and_capped(monkeypatch):
    """A waiver covers its own (kernel, precision, Triton series) up to its byte cap, nothing else (checked on a
    fake entry: the shipped WAIVED_SPILLS may be empty)."""
    off = _offline()
    kernel, prec, series, cap = "chunked.bwd_kernel", "fp32", "3.7", 32
    monkeypatch.setattr(off, "WAIVED_SPILLS", {(kernel, prec, series): (cap, "a fake waiver for this test")})
    row = dict(kernel=kernel, prec=prec, path="chunked", triton=series + ".9", spill_st=cap // 2, spill_ld=cap // 2,
               smem=0, dots=1, dots_tc=1)
    assert off.waiver(row) == "a fake waiver for this test" and off.problems(row) == []
    assert off.problems(dict(row, spill_st=cap)) == [f"spills {cap}+{cap // 2} B"]       # over the cap
    assert off.problems(dict(row, triton="2.0.0")) == [f"spills {cap // 2}+{cap // 2} B"]  # another series
    assert off.problems(dict(row, prec="bf16")) == [f"spills {cap // 2}+{cap // 2} B"]     # another precision
    clean = dict(row, spill_st=0, spill_ld=0)
    assert off.problems(clean) == [] and off.waiver(clean) is None                       # no spill: nothing waived


def test_pinned_triton_is_what_the_test_extra_installs():
    """configs.TRITON_PINNED is on a pinned series, and setup.py's `test` extra pins exactly it."""
    import re
    from mmm4rec_kernels.triton import configs
    assert configs._series(configs.TRITON_PINNED) in configs.PINNED_SERIES
    with open(os.path.join(ROOT, "setup.py")) as f:
        setup_py = f.read()
    assert '"test": ["pytest", "pytest-benchmark", f"triton=={pinned_triton()}"' in setup_py
    with open(os.path.join(ROOT, "mmm4rec_kernels", "triton", "configs.py")) as f:
        assert re.search(r'^TRITON_PINNED = "([0-9.]+)"', f.read(), re.M).group(1) == configs.TRITON_PINNED


def test_fallback_configs_on_another_triton_logged_once(monkeypatch, caplog):
    """On a Triton outside PINNED_SERIES `pick` returns the fallback set, with one log record per process."""
    from mmm4rec_kernels.triton import configs
    monkeypatch.setattr(configs, "_FORCED", "")
    monkeypatch.setattr(configs, "_told", False)
    monkeypatch.setattr(configs.triton, "__version__", "99.1.0")
    l200_fp32 = dict(BLOCK_L=256, P=64, N=64, PREC="ieee")
    with caplog.at_level(logging.INFO, logger=configs.__name__):
        fb = [configs.pick("quadratic_bwd_dx", **l200_fp32), configs.pick("chunked_fwd", P=64, N=64, PREC="tf32")]
    records = [r for r in caplog.records if r.name == configs.__name__]
    assert len(records) == 1 and "99.1.0" in records[0].getMessage() and "fallback" in records[0].getMessage()
    monkeypatch.setattr(configs.triton, "__version__", configs.TRITON_PINNED)
    pinned = configs.pick("quadratic_bwd_dx", **l200_fp32)
    assert fb[0]["BLOCK_P"] < pinned["BLOCK_P"]
    assert configs.config_set("3.6.0") == "pinned" and configs.config_set("3.9.0") == "fallback"


@pytest.mark.skipif(_ptxas() is None, reason="triton's bundled ptxas is missing: cannot compile for sm_90 offline")
def test_shipped_configs_compile_for_sm90_without_spills():
    import triton
    from mmm4rec_kernels.triton import configs
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MMM4REC_AUTOTUNE")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "tools.offline_sm90", "--check", "--paths", "auto", "--jobs", "2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    failing = [line for line in out.splitlines() if line.startswith("|") and not line.rstrip().endswith("| ok |")
               and "WAIVED" not in line and "gate |" not in line and not line.startswith("|---")]
    waived = [line for line in out.splitlines() if line.startswith("|") and "WAIVED" in line]
    if waived:
        warnings.warn(f"triton {triton.__version__}: spills tolerated by WAIVED_SPILLS:\n" + "\n".join(waived))
    pinned = triton.__version__ == configs.TRITON_PINNED
    spills_only = failing and all(line.rstrip().endswith("B |") and "spills" in line for line in failing)
    if not pinned and spills_only and proc.returncode != 0:
        warnings.warn(f"triton {triton.__version__} ({configs.config_set()} configs; the gate's Triton is "
                      f"{configs.TRITON_PINNED}): spills here:\n" + "\n".join(failing))
        return
    assert proc.returncode == 0, f"offline sm_90 gate failed (triton {triton.__version__}):\n" + "\n".join(
        line for line in out.splitlines() if not line.rstrip().endswith("| ok |"))[-6000:]
    assert "0 failing the gate" in out
    for kernel in ("quadratic.fwd_kernel", "chunked.fwd_kernel", "chunked.bwd_kernel", "gated_rmsnorm.fwd_kernel"):
        assert kernel in out, f"{kernel} was not compiled"
