"""The measuring code of the benchmarks (experiments/bench_*.py): training
throughput, quantize / dequantize, train-step memory over layer stacks,
the fused 4-bit kernels.

Imports the engine and the layers below it; never `ablations` or
`experiments`.
"""
