"""A capture in which every message is distinct: `python3 benchmarks/distinct_capture.py OUT.pcapng --messages N`.

The generator is benchmarks/distinct_sessions.py (reconnecting vIOMMU sessions), shared by the read and analysis
benchmarks."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from distinct_sessions import build_distinct_capture, distinct_records, main  # noqa: E402

__all__ = ["build_distinct_capture", "distinct_records"]

if __name__ == "__main__":
    sys.exit(main())
