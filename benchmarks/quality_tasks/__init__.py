"""The tasks of ``benchmarks/quality.py``: one module per dataset, shared peers and scoring."""
