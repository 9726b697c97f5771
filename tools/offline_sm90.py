"""Offline sm_90 compile table of every Triton kernel of the package: no GPU needed (static, not a timing).

    python -m tools.offline_sm90                          # shipped (pinned) configs at the benchmark shapes
    python -m tools.offline_sm90 --check                  # + exit 1 on a compile error, a spill, too much shared
                                                          #   memory, or a bf16/TF32 dot off the tensor cores
    python -m tools.offline_sm90 --sweep quadratic_fwd --shapes L200 --precisions bf16
                                                          # every config of configs.sweep_space(kernel)
    python -m tools.offline_sm90 --versions 3.6.0,3.8.0,3.9.0
                                                          # the --paths auto table under other Tritons (pip
                                                          # --target into --triton-dir), one summary row each;
                                                          # warns only (--check: fails when TRITON_PINNED fails)
    options: --shapes paper,wide-head,L200,L1024  --precisions bf16,tf32,fp32  --paths auto|all  --jobs 2
             --md OUT.md  --json OUT.json
    (from the repo root; `python tools/offline_sm90.py` works too where the package is installed)

The configs compiled are those the package would launch with this Triton: the pinned set on a series of
configs.PINNED_SERIES, else the fallback set (MMM4REC_TRITON_CONFIGS=pinned|fallback forces one).

How: Triton's driver is replaced by a stand-in whose target is GPUTarget("cuda", 90, 32) (H100), and
JITFunction.run compiles without launching.  The package's own host functions (tissd_quadratic_fwd/bwd,
tissd_chunked_fwd/bwd, gated_rmsnorm_fwd/bwd) are called with meta tensors, so what is compiled is exactly
what they would launch: the same constexprs, pinned config, specialisation and grid.  Triton's bundled ptxas
(-v) gives registers, spill stores/loads and the stack frame; Triton's metadata gives the shared memory; the
TTGIR shows whether each tl.dot got a tensor-core layout (#mma) and the PTX counts mma.sync / wgmma.
Occupancy estimate per SM (H100: 65536 registers allocated per warp in units of 256, 228 KB shared memory of
which 1 KB is reserved per CTA, 2048 threads, 32 CTAs): CTAs/SM = min over the three limits; waves = CTAs of
the grid / (132 SMs x CTAs/SM).

Precisions: bf16 (x, B, C in bfloat16), tf32 (fp32 with allow_tf32=True), fp32 (allow_tf32=False: the quadratic
path's exact "ieee" dots, the chunked path's "tf32x3").
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

if __name__ == "__main__":  # compile for real, pinned configs: before triton and the package are imported
    os.environ.pop("TRITON_INTERPRET", None)  # (triton reads it at import; an importer keeps its own mode)
    os.environ.pop("MMM4REC_AUTOTUNE", None)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import triton  # noqa: E402

SHAPES = {  # (b, L, H, P, n, G): the kernel-issue shapes (tools/gpu_check.py SHAPES)
    "paper": (1024, 20, 8, 64, 64, 8),
    "wide-head": (2048, 50, 1, 512, 64, 1),
    "L200": (256, 200, 8, 64, 64, 8),
    "L1024": (64, 1024, 8, 64, 64, 8),
}
PRECISIONS = {"bf16": (torch.bfloat16, False), "tf32": (torch.float32, True), "fp32": (torch.float32, False)}
SM_COUNT, REGS_PER_SM, SMEM_PER_SM, SMEM_PER_CTA_MAX, THREADS_PER_SM, CTAS_PER_SM = 132, 65536, 233472, 232448, \
    2048, 32
SMEM_RESERVED = 1024


def bundled_ptxas() -> str | None:
    """Path of the ptxas that ships with triton (None when absent or not executable)."""
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return path if os.path.isfile(path) and os.access(path, os.X_OK) else None


# ------------------------------------------------------------------------------------------ compile-only launch
class _Sm90Driver:
    """Stands in for the CUDA driver: reports an H100 (sm_90) target; nothing is ever launched."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", 90, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("meta")

    def map_python_to_cpp_type(self, ty):
        return ty


RECORDS: list[dict] = []
_STATS: dict[str, dict] = {}


def _ptxas_stats(kernel, log: str) -> dict:
    """registers, spill bytes, stack from ptxas -v (the captured compile log, else a second ptxas run)."""
    if "Used" not in log:
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(kernel.asm["ptx"])
        try:
            log = subprocess.run([bundled_ptxas(), "-lineinfo", "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                                 capture_output=True, text=True, check=True).stderr
        finally:
            os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return dict(regs=int(regs.group(1)) if regs else -1, stack=int(spill.group(1)) if spill else -1,
                spill_st=int(spill.group(2)) if spill else -1, spill_ld=int(spill.group(3)) if spill else -1)


def _dot_stats(kernel) -> dict:
    """tl.dot ops in the TTGIR and how many got a tensor-core (#mma) layout; mma.sync / wgmma in the PTX."""
    dots = tc = 0
    for line in kernel.asm["ttgir"].splitlines():
        if " tt.dot " in line or "ttng.warp_group_dot " in line:
            dots += 1
            tc += "warp_group_dot" in line or "#mma" in line.split("->")[-1]
    ptx = kernel.asm["ptx"]
    return dict(dots=dots, dots_tc=tc, mma_sync=ptx.count("mma.sync"), wgmma=ptx.count("wgmma.mma_async"))


def occupancy(regs: int, smem: int, num_warps: int) -> tuple[int, str]:
    """(CTAs per SM, limiter) on an H100 from registers/thread, shared bytes/CTA and warps/CTA."""
    per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    limits = {"regs": (REGS_PER_SM // per_warp) // num_warps,
              "smem": SMEM_PER_SM // (smem + SMEM_RESERVED) if smem > 0 else CTAS_PER_SM,
              "threads": THREADS_PER_SM // (32 * num_warps), "ctas": CTAS_PER_SM}
    name = min(limits, key=limits.get)
    return limits[name], name


def _grid_ctas(fn, grid, args, kwargs) -> int:
    import inspect
    if callable(grid):
        names = list(inspect.signature(fn.fn).parameters)
        bound = dict(zip(names, args))
        bound.update({k: v for k, v in kwargs.items()})
        grid = grid(bound)
    return int(math.prod(grid))


def _install():
    from triton import knobs
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    driver.set_active(_Sm90Driver())
    knobs.nvidia.dump_ptxas_log = True
    original = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        buf = io.StringIO()
        t0 = time.time()
        with contextlib.redirect_stdout(buf):
            kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
        secs = time.time() - t0
        stats = _STATS.get(kernel.hash)
        if stats is None:
            stats = dict(_ptxas_stats(kernel, buf.getvalue()), **_dot_stats(kernel), smem=kernel.metadata.shared)
            _STATS[kernel.hash] = stats
        warps = kernel.metadata.num_warps
        ctas_sm, limiter = occupancy(stats["regs"], stats["smem"], warps)
        ctas = _grid_ctas(self, grid, args, kwargs)
        cfg = {k: v for k, v in kwargs.items() if k.startswith("BLOCK") or k in ("Q",)}
        RECORDS.append(dict(triton=triton.__version__,
                            kernel=self.fn.__module__.rsplit(".", 1)[-1] + "." + self.fn.__name__.strip("_"),
                            config=" ".join(f"{k.replace('BLOCK_', '')}={v}" for k, v in sorted(cfg.items())),
                            warps=warps, stages=kernel.metadata.num_stages, ctas=ctas, ctas_per_sm=ctas_sm,
                            limiter=limiter, waves=round(ctas / (SM_COUNT * max(ctas_sm, 1)), 2),
                            compile_s=round(secs, 1), **stats))
        return kernel

    JITFunction.run = compile_only


# ------------------------------------------------------------------------------------------ cases
def _paths(shape, which):
    from mmm4rec_kernels.dispatch import crossover_length
    from mmm4rec_kernels.triton.quadratic import QUADRATIC_MAX_LEN
    b, L, H, P, n, G = SHAPES[shape]
    auto = "quadratic" if L <= crossover_length(P, n) else "chunked"
    if which == "auto":
        return [auto], auto
    return [p for p in ("quadratic", "chunked") if p == "chunked" or L <= QUADRATIC_MAX_LEN], auto


def run_case(job) -> list[dict]:
    """Compile one (shape, precision, path) through the package's host code; returns the table rows."""
    shape, prec, path, sweep = job
    from mmm4rec_kernels.triton import configs
    configs.OVERRIDE.clear()
    if sweep:
        configs.OVERRIDE[sweep[0]] = sweep[1]
    dtype, tf32 = PRECISIONS[prec]
    b, L, H, P, n, G = SHAPES[shape]
    T = b * L
    m = dict(device="meta")
    x, dy = torch.empty(T, H, P, dtype=dtype, **m), torch.empty(T, H, P, dtype=dtype, **m)
    Bm, Cm = torch.empty(T, G, n, dtype=dtype, **m), torch.empty(T, G, n, dtype=dtype, **m)
    dt, E = torch.empty(T, H, **m), torch.empty(T, H, **m)
    A, bias, D = torch.empty(H, **m), torch.empty(H, **m), torch.empty(H, **m)
    ss, sl = torch.empty(b, dtype=torch.int64, **m), torch.empty(b, dtype=torch.int32, **m)
    opts = dict(d_skip_delta=True, dt_softplus=True, allow_tf32=tf32)
    del RECORDS[:]
    err = None
    try:
        if path == "quadratic":
            from mmm4rec_kernels.triton.quadratic import tissd_quadratic_bwd, tissd_quadratic_fwd
            if not (sweep and sweep[0].startswith("quadratic_bwd")):
                tissd_quadratic_fwd(x, dt, A, Bm, Cm, E, bias, D, ss, sl, L, padded=True, **opts)
            if not (sweep and sweep[0] == "quadratic_fwd"):
                split = {"quadratic_bwd_fused": False, "quadratic_bwd_dx": True, "quadratic_bwd_dbc": True}.get(
                    sweep[0] if sweep else None)
                tissd_quadratic_bwd(dy, x, dt, A, Bm, Cm, E, bias, D, ss, sl, L, padded=True, split=split, **opts)
        elif path == "chunked":
            from mmm4rec_kernels.triton.chunked import tissd_chunked_bwd, tissd_chunked_fwd
            if not (sweep and sweep[0] == "chunked_bwd"):
                tissd_chunked_fwd(x, dt, A, Bm, Cm, E, bias, D, ss, sl, L, **opts)
            if not (sweep and sweep[0] == "chunked_fwd"):
                tissd_chunked_bwd(dy, None, x, dt, A, Bm, Cm, E, bias, D, ss, sl, L, **opts)
        elif path == "gated_rmsnorm":
            from mmm4rec_kernels.triton.gated_rmsnorm import gated_rmsnorm_bwd, gated_rmsnorm_fwd
            d = H * P
            yz = torch.empty(b, L, d, dtype=dtype, **m)
            w = torch.empty(d, dtype=dtype, **m)
            _, rstd = gated_rmsnorm_fwd(yz, yz, w, 1e-12)
            gated_rmsnorm_bwd(yz, yz, yz, w, rstd, 1e-12)
    except Exception as e:  # noqa: BLE001  a compile error is a result of this table
        err = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    rows = [dict(shape=shape, prec=prec, path=path, **r) for r in RECORDS]
    if err:
        rows.append(dict(shape=shape, prec=prec, path=path, kernel="(compile error)", error=err))
    return rows


SWEEP_ROWS = {"quadratic_fwd": "quadratic.fwd_kernel", "quadratic_bwd_fused": "quadratic.bwd_fused_kernel",
              "quadratic_bwd_dx": "quadratic.bwd_dx_kernel", "quadratic_bwd_dbc": "quadratic.bwd_dc_kernel",
              "chunked_fwd": "chunked.fwd_kernel", "chunked_bwd": "chunked.bwd_kernel"}


def _init_worker():
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="offline_sm90_")  # fresh: every compile logs ptxas
    from triton import knobs
    knobs.cache.dir = os.environ["TRITON_CACHE_DIR"]
    _install()


# ------------------------------------------------------------------------------------------ report
COLS = ("shape", "prec", "path", "kernel", "config", "warps", "stages", "regs", "spill_st", "spill_ld", "smem",
        "dots", "dots_tc", "mma_sync", "wgmma", "ctas", "ctas_per_sm", "limiter", "waves", "compile_s")


# Known spills the gate tolerates up to a byte cap (a regression above the cap fails): (kernel, prec, triton minor
# series) -> (bytes of spill stores + loads, reason).  Keep this list short and say it in RESULTS.md.  Empty: the
# last entry, the exact-fp32 (tf32x3) chunked backward on triton 3.7 (255 registers + 12+12 B), went with its
# kernel change (each chunk's C B^T computed once in pass 1, read back in the reverse sweeps: 253 registers, no
# spill, on 3.6-3.9).
WAIVED_SPILLS: dict[tuple[str, str, str], tuple[int, str]] = {}


def waiver(row) -> str | None:
    """The reason a row's spill is tolerated, or None."""
    series = ".".join(str(row.get("triton", triton.__version__)).split(".")[:2])
    cap, why = WAIVED_SPILLS.get((row.get("kernel"), row.get("prec"), series), (None, None))
    if cap is not None and 0 < row["spill_st"] + row["spill_ld"] <= cap:
        return why
    return None


def problems(row) -> list[str]:
    """Why a row fails the gate: compile error, spill (beyond a WAIVED_SPILLS cap), shared memory over a CTA's
    maximum, a 16-bit or TF32 dot not on tensor cores (exact fp32 "ieee" dots are FMA by design)."""
    if "error" in row:
        return [row["error"]]
    out = []
    if (row["spill_st"] or row["spill_ld"]) and not waiver(row):
        out.append(f"spills {row['spill_st']}+{row['spill_ld']} B")
    if row["smem"] > SMEM_PER_CTA_MAX:
        out.append(f"shared memory {row['smem']} B > {SMEM_PER_CTA_MAX}")
    fma_ok = row["prec"] == "fp32" and row["path"] == "quadratic"
    if row["dots"] != row["dots_tc"] and not fma_ok:
        out.append(f"{row['dots'] - row['dots_tc']} of {row['dots']} dots without tensor cores")
    return out


def markdown(rows) -> str:
    lines = ["| " + " | ".join(COLS) + " | gate |", "|" + "---|" * (len(COLS) + 1)]
    for r in rows:
        gate = "; ".join(problems(r)) or ("WAIVED spill" if "error" not in r and waiver(r) else "ok")
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in COLS) + " | " + gate + " |")
    return "\n".join(lines)


def _spill_rows(rows) -> list[str]:
    return [f"{r['kernel']} {r['shape']} {r['prec']} {r['config']} w{r['warps']}: {r['spill_st']}+{r['spill_ld']} B"
            + (" (waived)" if waiver(r) else "") for r in rows if "error" not in r and (r["spill_st"] or r["spill_ld"])]


def versions_table(versions, triton_dir, args) -> tuple[str, bool]:
    """Run the table (--check --paths auto) under each Triton version in a subprocess (a version other than the
    installed one from `pip install --no-deps --target triton_dir/triton-V`); returns (markdown summary with the
    spilling rows listed under it, whether TRITON_PINNED's run fails the gate)."""
    from mmm4rec_kernels.triton import configs
    lines = ["| triton | role | configs | compiles | spilling rows | other gate failures | result | s |",
             "|---|---|---|---|---|---|---|---|"]
    notes, pinned_fails = [], False
    for v in versions:
        t0 = time.time()
        role = "pinned (CI gate)" if v == configs.TRITON_PINNED else "neighbour (warns)"
        env = {k: val for k, val in os.environ.items() if k not in ("TRITON_INTERPRET", "MMM4REC_AUTOTUNE")}
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        if v != triton.__version__:
            target = os.path.join(triton_dir, f"triton-{v}")
            if not os.path.isdir(os.path.join(target, "triton")):
                tmp = target + ".partial"
                shutil.rmtree(tmp, ignore_errors=True)
                got = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                                      "--no-deps", "--target", tmp, f"triton=={v}"], capture_output=True, text=True)
                if got.returncode != 0:
                    lines.append(f"| {v} | {role} | - | - | - | - | not installable here | - |")
                    notes.append(f"triton {v}: pip failed: {(got.stderr.strip().splitlines() or ['?'])[-1][:200]}")
                    continue
                os.makedirs(triton_dir, exist_ok=True)
                os.replace(tmp, target)
            env["PYTHONPATH"] = target + os.pathsep + env["PYTHONPATH"]
        with tempfile.TemporaryDirectory() as tmpdir:
            out_json = os.path.join(tmpdir, "rows.json")
            cmd = [sys.executable, "-m", "tools.offline_sm90", "--check", "--paths", "auto", "--shapes", args.shapes,
                   "--precisions", args.precisions, "--jobs", str(args.jobs), "--json", out_json]
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            if not os.path.exists(out_json):
                tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or ["no output"]
                lines.append(f"| {v} | {role} | - | - | - | - | table not made | {time.time() - t0:.0f} |")
                notes.append(f"triton {v}: {tail[0][:200]}")
                pinned_fails |= v == configs.TRITON_PINNED
                continue
            with open(out_json) as f:
                rows = json.load(f)
        head = re.search(r"\((pinned|fallback) configs\)", proc.stdout)
        spills = _spill_rows(rows)
        other = [r for r in rows if problems(r) and not any("spills" in p for p in problems(r))]
        failing = [r for r in rows if problems(r)]
        if v == configs.TRITON_PINNED:
            result = "FAIL" if failing else "ok"
            pinned_fails |= bool(failing)
        else:
            result = "WARNING: spills" if spills else ("WARNING: fails the gate" if other else "ok")
        lines.append(f"| {v} | {role} | {head.group(1) if head else '?'} | {len(rows)} | {len(spills)} | "
                     f"{len(other)} | {result} | {time.time() - t0:.0f} |")
        notes += [f"triton {v}: {s}" for s in spills]
        notes += [f"triton {v}: {r['kernel']} {r['shape']} {r['prec']}: {'; '.join(problems(r))}" for r in other]
    return "\n".join(lines + [""] + notes), pinned_fails


def main(argv=None):
    from triton import knobs
    if knobs.runtime.interpret or os.environ.get("MMM4REC_AUTOTUNE") == "1":
        raise SystemExit("offline_sm90: run it as a script (python -m tools.offline_sm90): it must import triton "
                         "without TRITON_INTERPRET and the package without MMM4REC_AUTOTUNE")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--paths", choices=("auto", "all"), default="all",
                    help="auto: the path the dispatcher picks at each shape; all: every path that accepts it")
    ap.add_argument("--no-norm", action="store_true", help="skip the gated RMSNorm kernels")
    ap.add_argument("--sweep", default=None,
                    help="kernel name of configs.candidates(): compile every config of configs.sweep_space(kernel)")
    ap.add_argument("--check", action="store_true", help="exit 1 when any row fails the gate")
    ap.add_argument("--versions", default=None,
                    help="comma-separated Triton versions: summary table of the --paths auto gate under each")
    ap.add_argument("--triton-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "mmm4rec", "triton"),
                    help="where --versions installs the other Tritons (pip --target; reused)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--md", default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if bundled_ptxas() is None:
        print("offline_sm90: triton's bundled ptxas is missing: nothing compiled")
        return 2
    for s in a.shapes.split(","):
        if s not in SHAPES:
            raise SystemExit(f"--shapes: unknown shape {s!r} (known: {', '.join(SHAPES)})")
    for p in a.precisions.split(","):
        if p not in PRECISIONS:
            raise SystemExit(f"--precisions: unknown precision {p!r} (known: {', '.join(PRECISIONS)})")
    if a.versions:
        t0 = time.time()
        table, pinned_fails = versions_table([v.strip() for v in a.versions.split(",") if v.strip()],
                                             a.triton_dir, a)
        print(f"offline sm_90 gate per Triton version (static; --paths auto; {time.time() - t0:.0f} s); "
              f"spills warn except under the pinned version")
        print(table)
        return 1 if (a.check and pinned_fails) else 0

    jobs, sweep_cfgs = [], [None]
    if a.sweep:
        from mmm4rec_kernels.triton import configs
        if a.sweep not in SWEEP_ROWS:
            raise SystemExit(f"--sweep: unknown kernel {a.sweep!r} (known: {', '.join(SWEEP_ROWS)})")
        sweep_cfgs = [(a.sweep, c) for c in configs.sweep_space(a.sweep)]
    autos = {}
    for shape in a.shapes.split(","):
        paths, autos[shape] = _paths(shape, a.paths)
        if a.sweep:
            paths = ["quadratic" if a.sweep.startswith("quadratic") else "chunked"]
            if paths == ["quadratic"] and SHAPES[shape][1] > 256:
                continue  # the quadratic path refuses L > QUADRATIC_MAX_LEN
        for prec in a.precisions.split(","):
            for path in paths:
                jobs += [(shape, prec, path, sw) for sw in sweep_cfgs]
            if not a.no_norm and not a.sweep and prec != "fp32":
                jobs.append((shape, prec, "gated_rmsnorm", None))
    t0 = time.time()
    if a.jobs > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(a.jobs, initializer=_init_worker) as pool:
            results = pool.map(run_case, jobs, chunksize=1)
    else:
        _init_worker()
        results = [run_case(j) for j in jobs]
    rows = [r for rs in results for r in rs]
    if a.sweep:  # the rows of the swept kernel (other kernels of the same calls ran their pinned configs)
        want = SWEEP_ROWS.get(a.sweep)
        rows = [r for r in rows if "error" in r or r["kernel"] == want]
    for r in rows:
        r["auto"] = r["path"] == autos.get(r["shape"])
    md = markdown(rows)
    bad = [r for r in rows if problems(r)]
    from mmm4rec_kernels.triton import configs
    head = (f"offline sm_90 compile table (static, not a timing): triton {triton.__version__} "
            f"({configs.config_set()} configs), "
            f"{len(rows)} kernel compiles in {time.time() - t0:.0f} s on {a.jobs} process(es); "
            f"{len(bad)} failing the gate")
    print(head)
    print(md)
    if a.md:
        with open(a.md, "w") as f:
            f.write(head + "\n\n" + md + "\n")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if (a.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
