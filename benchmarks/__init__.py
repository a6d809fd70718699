"""kvmpy's benchmark suite: kvmpy side by side with the hardware limit and its peers.

Run ``python -m benchmarks`` from the repository root (``--smoke`` for a quick check that
the runner works, ``--help`` for the options). Every figure is measured in one run with
kvmpy and its baselines interleaved, repetition by repetition, and reported as the median
with its spread. See ``BENCHMARKS.md`` for the latest results and how to read them.

The baselines:

* ``raw_kvm.c`` - the same work in plain C on the KVM API (compiled by the runner): the limit;
* :mod:`benchmarks.rawpy` - plain Python on the KVM API (``fcntl.ioctl`` and ``ctypes``):
  what a user without kvmpy writes;
* :mod:`benchmarks.unicorn_cases` - the Unicorn CPU emulator running the same guest bytes.
"""
