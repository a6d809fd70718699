"""``python -m kvmpy.fuzz replay harness.py INPUT...``."""

import sys

from kvmpy.fuzz._cli import cli

sys.exit(cli())
