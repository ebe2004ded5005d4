"""Ablations: sweeps of config overrides (one process per point), their
results on disk, tables, figures, and the data types' quantization error.

Imports the engine and the layers below it; never `bench` or `experiments`.
"""
