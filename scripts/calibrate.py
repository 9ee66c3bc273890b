#!/usr/bin/env python
"""Calibrate a per-head sparse attention config; see ``sparse_prefill.calibrate`` (also ``sparse-prefill-calibrate``).

python scripts/calibrate.py --model smollm2 --lengths 2k,4k --samples 4 --recall 0.95 --out configs/smollm2.json
"""

from sparse_prefill.calibrate import main

if __name__ == "__main__":
    raise SystemExit(main())
