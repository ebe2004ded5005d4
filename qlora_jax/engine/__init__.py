"""The training engine: a run's settings, setup, the jitted steps, losses,
the optimizer, sharding, checkpoints, metrics, the console, exports and
predictions of a finished run, and the one way outputs are written
(`outputs`: whole or not at all, never over an input).

`train.train_and_evaluate(config, workdir)` is the entry point. The
ConfigDict stops at `settings.Settings.from_config`; everything else takes
typed settings. Imports `quant`, `nn`, `models`, `data` and `interop`;
never `ablations`, `bench` or `experiments`.
"""
