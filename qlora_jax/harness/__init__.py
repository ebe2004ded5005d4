"""lm-evaluation-harness on our models: the 4-bit base with its unmerged
adapters of a finished run, or any checkpoint alone.

`requests` encodes lm-eval's requests as its Hugging Face backend does
(pure Python); `scoring` runs them through the JAX model in batches of a
few bucketed shapes; `backend` is the `lm_eval.api.model.LM` subclass and
the only module importing lm_eval; `evaluate` loads a model and runs
`lm_eval.simple_evaluate`, importing lm_eval only when asked to.
"""
