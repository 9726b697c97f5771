"""pytest setup for the benchmarks (collected only when the path is given: `pytest benchmarks/ ...`).

- collects `bench_*.py` here (the repo's python_files default is test_*.py);
- imports are packages from the repo root (`benchmarks.*`, `tools.*`; pyproject's pytest `pythonpath`);
- `--benchmark-disable` (CI quick mode) runs each benchmark body once; see README.md.
"""
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and HERE in str(file_path.parent):
        if parent.session.isinitpath(file_path):
            return None  # named on the command line: pytest's python plugin collects it already
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device")
    config.addinivalue_line("markers", "table4: the Table 4 training-time harness")


@pytest.fixture
def quick(request):
    """True when benchmarks are disabled (each body runs once): keep the work tiny."""
    return bool(request.config.getoption("benchmark_disable", default=False))
