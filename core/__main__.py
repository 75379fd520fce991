import sys

from core.cli import run_process

sys.exit(run_process())
