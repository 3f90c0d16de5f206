"""Test-wide settings: offline W&B, a non-interactive matplotlib backend, quiet Lightning."""

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("PL_DISABLE_FORK", "1")
