"""``python -m lightning_norm.report LOGDIR [--out DIR]``: the S18 figures and HTML page."""

import sys

from lightning_norm.cli import main

sys.exit(main(["report", *sys.argv[1:]]))
