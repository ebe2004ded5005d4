"""Ablations: sweeps of config overrides (one process per point), their
results on disk, tables, figures, the data types' quantization error, and
what merging an adapter into a 4-bit base costs (`merging`, table 8).

Imports the engine and the layers below it; never `bench` or `experiments`.
"""
