"""GPU-only tests: on a machine without CUDA they are not collected at all (rather than reported skipped)."""

from __future__ import annotations

import torch

collect_ignore_glob = [] if torch.cuda.is_available() else ["test_*.py"]
