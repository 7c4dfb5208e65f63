"""The one place for helpers shared by several test modules: tiny recipes and models, runs, what runs leave."""

import os

# DeepSpeed picks its accelerator at import time; say "CPU" before any test imports it (every helper
# module imports this package first, so scripts and tools that import helpers outside pytest get it too).
os.environ.setdefault("DS_ACCELERATOR", "cpu")
