"""The command-line tools built on sparse_prefill: evaluation, calibration, the demo and config checks.

Nothing in the library imports this package; each module here imports the library like any user would.
"""
