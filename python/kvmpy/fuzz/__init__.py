"""Fuzzing with kvmpy: targets whose mistakes fault, one input per run from a snapshot,
outcomes classified and crashes bucketed.

```python
from kvmpy import fuzz

target = fuzz.Target.from_elf("parser.elf", entry="parse", max_len=4096, timeout_ms=20)
outcome = target.run(b"BUG!")        # Outcome(kind="crash", name="#PF", rip=..., ...)
```
"""

from kvmpy.fuzz._afl import read_afl_stats
from kvmpy.fuzz._cli import load_harness, main
from kvmpy.fuzz._fuzzer import Fuzzer, FuzzStats, read_corpus
from kvmpy.fuzz._target import OUTCOME_KINDS, Outcome, Target
from kvmpy.fuzz._triage import Bucket, Triage

__all__ = [
    "OUTCOME_KINDS",
    "Bucket",
    "FuzzStats",
    "Fuzzer",
    "Outcome",
    "Target",
    "Triage",
    "load_harness",
    "main",
    "read_afl_stats",
    "read_corpus",
]
