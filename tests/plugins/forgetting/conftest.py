"""Puts tests/plugins/hf (hfkit) and tests/plugins/trl (trlkit) on sys.path for the forgetting tests."""

import sys
from pathlib import Path

for folder in ("hf", "trl"):
    path = str(Path(__file__).resolve().parent.parent / folder)
    if path not in sys.path:
        sys.path.insert(0, path)
