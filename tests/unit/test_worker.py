"""`posttrade worker`: what it sets up before a service starts."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = """
from posttrade.commands.worker import bound_native_memory
bound_native_memory()
import pyarrow
print(pyarrow.default_memory_pool().backend_name)
"""


def probe(env: dict[str, str]) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("ARROW_DEFAULT_MEMORY_POOL", "MALLOC_ARENA_MAX")}
    done = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_a_worker_puts_arrow_on_the_system_allocator():
    assert probe({}) == "system"


def test_an_explicit_arrow_pool_in_the_environment_wins():
    assert probe({"ARROW_DEFAULT_MEMORY_POOL": "mimalloc"}) == "mimalloc"
