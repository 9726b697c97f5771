#!/usr/bin/env bash
# Offline compile table of the CUDA kernels in csrc/tissd_quadratic.cu (no GPU needed; static, not a timing).
# Compiles with the build's own nvcc flags for each arch, then prints per kernel: registers, spill bytes (stores /
# loads), static shared memory, resident blocks per SM (register / smem / thread limits), and from the SASS
# (cuobjdump -sass) the counts of tensor-core MMAs (HMMA), shared loads (LDS + LDSM) and FP32 FMAs (FFMA); without a
# cuobjdump, the PTX mma.sync count instead.
#   bash tools/offline_csrc.sh               table for sm_90 and sm_80 (markdown)
#   bash tools/offline_csrc.sh --check       also exit 1 on a spill or a tensor-core kernel without HMMA
# Env: NVCC (default /usr/local/cuda/bin/nvcc or nvcc on PATH), ARCHS (default "90 80"), CUOBJDUMP.
set -euo pipefail
cd "$(dirname "$0")/.."
CHECK=0
[ "${1:-}" = "--check" ] && CHECK=1
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
ARCHS=${ARCHS:-"90 80"}
find_cuobjdump() {
    command -v cuobjdump && return
    [ -x "$(dirname "$NVCC")/cuobjdump" ] && { echo "$(dirname "$NVCC")/cuobjdump"; return; }
    # triton wheels bundle one
    python3 -c "import os, triton; p = os.path.join(os.path.dirname(triton.__file__), 'backends/nvidia/bin/cuobjdump');
print(p if os.access(p, os.X_OK) else '')" 2>/dev/null || true
}
CUOBJDUMP=${CUOBJDUMP:-$(find_cuobjdump)}
[ -x "$NVCC" ] || { echo "offline_csrc: nvcc not found (NVCC=$NVCC)"; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# the flags of setup.py's CUDAExtension and CMakeLists.txt (no --use_fast_math)
FLAGS=(-O3 -std=c++17 -lineinfo -Icsrc)
echo "nvcc: $("$NVCC" --version | tail -n 2 | head -n 1); flags: ${FLAGS[*]}; cuobjdump: ${CUOBJDUMP:-none (PTX counts)}"
for arch in $ARCHS; do
    "$NVCC" "${FLAGS[@]}" -arch=sm_"$arch" -Xptxas -v -c csrc/tissd_quadratic.cu -o "$work/sm$arch.o" \
        2> "$work/ptxas$arch.log" || { cat "$work/ptxas$arch.log"; exit 1; }
    if [ -n "$CUOBJDUMP" ]; then
        "$CUOBJDUMP" -sass "$work/sm$arch.o" > "$work/sass$arch.txt" 2> /dev/null || : > "$work/sass$arch.txt"
    fi
    if [ ! -s "$work/sass$arch.txt" ]; then
        "$NVCC" "${FLAGS[@]}" -arch=sm_"$arch" -ptx csrc/tissd_quadratic.cu -o "$work/ptx$arch.ptx"
    fi
done
python3 - "$work" "$CHECK" $ARCHS <<'PY'
import os, re, subprocess, sys

work, check, archs = sys.argv[1], sys.argv[2] == "1", sys.argv[3:]
SMEM_PER_SM = {"80": 167936, "86": 102400, "89": 102400, "90": 233472}  # bytes usable by blocks per SM


def pretty(mangled):
    """tissd_apply_kernel<float, 64, true, false> -> 'apply dx fp32 TP=64 exact'."""
    try:
        name = subprocess.run(["c++filt", mangled], capture_output=True, text=True).stdout.strip()
    except OSError:
        name = mangled
    m = re.search(r"(tissd_\w+_kernel)<(.*)>", name)
    if not m:
        return name
    kern, args = m.group(1), [a.strip() for a in m.group(2).split(",")]
    dtype = {"float": "fp32", "__nv_bfloat16": "bf16", "__half": "fp16"}.get(args[0], args[0])
    flag = lambda k: len(args) > k and args[k] == "true"  # builds before the kTC flag: exact FMA
    if kern == "tissd_apply_kernel":
        tp, dx, tc = args[1], flag(2), flag(3)
        what = f"{'apply dx' if dx else 'apply fwd'} TP={tp}"
    else:
        tc, what = flag(1), "grad"
    path = ("tf32 TC" if dtype == "fp32" else "TC") if tc else "exact FMA"
    return f"{what} {dtype} {path}"


def ptxas(arch):
    rows, cur = {}, None
    for line in open(os.path.join(work, f"ptxas{arch}.log")):
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            cur = m.group(1)
            rows[cur] = dict(regs=0, spill_st=0, spill_ld=0, smem=0)
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and cur:
            rows[cur].update(spill_st=int(m.group(1)), spill_ld=int(m.group(2)))
        m = re.search(r"Used (\d+) registers", line)
        if m and cur:
            rows[cur]["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            rows[cur]["smem"] = int(s.group(1)) if s else 0
    return rows


def sass_counts(arch):
    path = os.path.join(work, f"sass{arch}.txt")
    counts, cur = {}, None
    if os.path.exists(path) and os.path.getsize(path):
        for line in open(path):
            m = re.match(r"\s*Function : (\w+)", line)
            if m:
                cur = m.group(1)
                counts[cur] = dict(mma=0, lds=0, ffma=0)
                continue
            if cur:
                op = re.search(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)(?:\.[\w.]*)?\s", line)
                if op:
                    o = op.group(1)
                    counts[cur]["mma"] += o == "HMMA"
                    counts[cur]["lds"] += o in ("LDS", "LDSM")
                    counts[cur]["ffma"] += o == "FFMA"
        return counts, "SASS"
    cur = None
    for line in open(os.path.join(work, f"ptx{arch}.ptx")):
        m = re.match(r"\.visible \.entry (\w+)\(", line) or re.match(r"\.entry (\w+)\(", line)
        if m:
            cur = m.group(1)
            counts[cur] = dict(mma=0, lds=0, ffma=0)
        elif cur:
            counts[cur]["mma"] += bool(re.search(r"\b(wmma\.mma|mma)\.sync", line))
            counts[cur]["lds"] += bool(re.search(r"\b(ld\.shared|wmma\.load)", line))
            counts[cur]["ffma"] += bool(re.search(r"\bfma\.rn\.f32", line))
    return counts, "PTX"


def blocks_per_sm(arch, regs, smem, threads=256):
    warps = threads // 32
    regs_per_warp = ((max(regs, 1) * 32 + 255) // 256) * 256  # allocation unit: 256 registers per warp
    by_regs = 65536 // (regs_per_warp * warps)
    by_smem = SMEM_PER_SM.get(arch, 102400) // (smem + 1024)   # + 1 KB reserved per block
    return min(by_regs, by_smem, 2048 // threads, 32), by_regs, by_smem


bad = []
for arch in archs:
    rows = ptxas(arch)
    counts, src = sass_counts(arch)
    print(f"\n### sm_{arch} (static, not a timing)\n")
    print(f"| kernel | regs | spill st/ld B | smem B | blocks/SM (regs, smem) | {src} MMA | {src} LDS | {src} FFMA |")
    print("|---|---:|---:|---:|---|---:|---:|---:|")
    for mangled in sorted(rows, key=pretty):
        r, c = rows[mangled], counts.get(mangled, dict(mma=-1, lds=-1, ffma=-1))
        occ, by_r, by_s = blocks_per_sm(arch, r["regs"], r["smem"])
        name = pretty(mangled)
        print(f"| {name} | {r['regs']} | {r['spill_st']}/{r['spill_ld']} | {r['smem']} | {occ} ({by_r}, {by_s}) "
              f"| {c['mma']} | {c['lds']} | {c['ffma']} |")
        if r["spill_st"] or r["spill_ld"]:
            bad.append(f"sm_{arch} {name}: spills {r['spill_st']}/{r['spill_ld']} bytes")
        if "TC" in name and c["mma"] == 0:
            bad.append(f"sm_{arch} {name}: no tensor-core instruction")
if bad:
    print("\n" + "\n".join("PROBLEM: " + b for b in bad))
    sys.exit(1 if check else 0)
print("\nno spills; every TC kernel has tensor-core instructions")
PY
