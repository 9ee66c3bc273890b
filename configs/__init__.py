"""Shipped per-model configs (JSON), installed as ``sparse_prefill.configs``."""
