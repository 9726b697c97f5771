"""mmm4rec_kernels.cpu.retain_freed_memory: after it, a freed 64 MiB tensor's memory is reused by the next one of the
same size (no page faults); without it glibc unmaps the block on free and every new one faults each of its pages.
Each case runs in a fresh process (the setting is process-wide)."""
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's malloc only")

PROBE = textwrap.dedent("""
    import resource, sys, torch
    from mmm4rec_kernels.cpu import retain_freed_memory
    if sys.argv[1] == "retain":
        said = retain_freed_memory()
        assert retain_freed_memory() == said        # idempotent
        print(said, file=sys.stderr)
    faults = []
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = torch.empty(16 * 2 ** 20)              # 64 MiB, written whole, then freed
        t.fill_(1.0)
        del t
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(max(faults[3:]))                          # the first ones fault either way (the heap grows)
""")


def faults(mode):
    r = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip()), r.stderr


def test_retained_memory_is_reused_without_page_faults():
    default, _ = faults("default")
    kept, said = faults("retain")
    assert "kept for reuse" in said, said
    if default < 1000:                              # 16384 with 4 KiB pages; transparent huge pages fault per 2 MiB
        pytest.skip(f"a fresh 64 MiB block took only {default} page faults here (huge pages?): nothing to compare")
    assert kept < 500, (kept, default)

