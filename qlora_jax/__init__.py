"""qlora_jax: LoRA and QLoRA fine-tuning in JAX/Flax.

One package per layer, each importing only those before it:
quant <- nn <- models <- (data) <- interop <- engine <- ablations / bench.
"""
