"""Holding freed memory: after the settings, a step's worth of freed blocks is reused, not faulted in
again (run in a child process, so the test process's allocator is left as it was)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent("""
    import resource, torch
    from ept.memory import hold_freed_memory
    print(hold_freed_memory())
    faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for step in range(12):
        if step == 2:
            before = faults()
        blocks = [torch.ones(2 << 20) for _ in range(10)]  # 80 MiB of a step's activations
        del blocks
    print(faults() - before)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_held_heap_serves_the_next_step_without_page_faults():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
    took, faults = out.stdout.split()
    assert took == "True"
    pages = 10 * 10 * (8 << 20) // 4096  # what ten steps would fault if nothing were reused
    assert int(faults) < 0.001 * pages
