"""``onnxgrad.memory``: glibc's malloc is set, once, to keep freed blocks for the
next training step, unless the user turned that off or tuned malloc already.

Each case runs in a fresh interpreter: the setting is made once per process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import onnxgrad
from onnxgrad import memory
assert memory._state is None, memory._state  # importing the package leaves malloc alone
from onnxgrad.backend import get_backend
get_backend("cpu")
print(memory._state, memory.keep_freed_memory())
"""


def _probe(**env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("ONNXGRAD_KEEP_MEMORY", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    return subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env},
                          capture_output=True, text=True, timeout=120)


def _glibc() -> bool:
    return sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION") is not None


@pytest.mark.skipif(not _glibc(), reason="the setting applies to glibc's malloc only")
def test_first_use_of_the_cpu_backend_sets_malloc_once():
    run = _probe()
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["set", "set"]


@pytest.mark.parametrize("env, state", [
    ({"ONNXGRAD_KEEP_MEMORY": "0"}, "disabled"),
    ({"MALLOC_TRIM_THRESHOLD_": "1000000"}, "environment"),
    ({"MALLOC_MMAP_THRESHOLD_": "1000000"}, "environment"),
])
def test_the_user_can_turn_it_off_or_tune_malloc_alone(env, state):
    run = _probe(**env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [state, state]


def test_a_bad_value_of_the_variable_is_an_error_that_names_it():
    run = _probe(ONNXGRAD_KEEP_MEMORY="yes")
    assert run.returncode != 0
    assert "ONNXGRAD_KEEP_MEMORY='yes'" in run.stderr
    assert "expected 1 (the default) or 0" in run.stderr


FAULTS = """
import resource
import numpy as np
from onnxgrad.backend import get_backend
get_backend("cpu")

def cycle():
    blocks = [np.ones(1 << 18, dtype=np.float32) for _ in range(64)]  # 64 MiB, touched
    del blocks

cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not _glibc(), reason="the setting applies to glibc's malloc only")
def test_memory_freed_by_one_step_is_reused_by_the_next_without_page_faults():
    """64 MiB of 1 MiB arrays, freed and allocated again: with the setting the second
    round touches pages the process kept (few faults); glibc's defaults give the
    memory back and fault every page in again (16,384 pages of 4 KiB)."""
    def faults(**env):
        clean = {k: v for k, v in os.environ.items()
                 if k not in ("ONNXGRAD_KEEP_MEMORY", "MALLOC_MMAP_THRESHOLD_",
                              "MALLOC_TRIM_THRESHOLD_")}
        run = subprocess.run([sys.executable, "-c", FAULTS], env={**clean, **env},
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        return int(run.stdout)

    kept, returned = faults(), faults(ONNXGRAD_KEEP_MEMORY="0")
    assert kept < 2000 < 8000 < returned, (kept, returned)
