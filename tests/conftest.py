"""Settings for the whole test session.

Every test process (pytest's and the command-line runs tests start) shares
one persistent XLA compilation cache in a temporary folder, removed at the
end: many tests build the same tiny models and train steps, and a program
XLA has compiled once is then read back instead of compiled again
(every program that took 20 ms or more to compile: most of the suite's
take 0.02-0.2 s, and reading one back is faster; three of the heaviest
test files took 107-113 s with this threshold, 118-129 s at 0.2 s). The
cache changes no result (its key is the program and the compile options);
set JAX_COMPILATION_CACHE_DIR to use a folder of your own.

Test processes compile with LLVM's optimization level 0
(`--xla_backend_optimization_level=0` added to XLA_FLAGS unless XLA_FLAGS
sets a level): the suite's programs are tiny, so compiling is most of its
time, and level 0 takes ~20% less of it. XLA's own passes, which decide
what is computed, are the same (its CPU backend uses no fast-math), and
the matmuls run in the same precompiled library kernels.

They also emit fused elementwise loops with XLA's older LLVM IR emitter
(`--xla_cpu_use_fusion_emitters=false`, unless XLA_FLAGS names it): the
newer MLIR fusion emitters compile each fusion through more passes, and
with them the steps, dense-layer and lowering tests took 122 s on 2 cores
against 69 s without them, every test passing either way.

With pytest-xdist (`-n 2`) each worker process keeps its own subfolder
(shared with the command-line runs its tests start): JAX writes cache
entries in place, so two processes compiling the same program at once
could otherwise read a half-written entry.
"""

import os
import shutil
import signal
import tempfile

# The longest test files, longest first (seconds of one worker on 2 CPU
# cores, AMD EPYC with AVX-512, from `--durations=0` on 2026-12-08: 122,
# 83, 55, 53, 40, 39, 29, 28, 25, 25, 24, 23, 22, 22, 20, 19). `--dist
# loadfile` hands whole files to the two workers in collection order, by
# default reordered by test count; a long file handed out last keeps one
# worker busy while the other idles, so the session hands these out first
# and the short files fill in around them.
LONG_FILES = (
  "train_tasks_test.py",
  "train_test.py",
  "models_gemma3_test.py",
  "models_smollm2_test.py",
  "dpo_test.py",
  "predict_test.py",
  "merge_table_test.py",
  "memory_test.py",
  "sweep_test.py",
  "predict_families_test.py",
  "grpo_test.py",
  "nn_cpu_kernel_test.py",
  "interop_export_test.py",
  "harness_scoring_test.py",
  "interop_gguf_lora_test.py",
  "steps_test.py",
)

# A suite started in the background of a shell without job control
# inherits SIGINT ignored (bash ignores it for asynchronous commands), and
# the Ctrl-C tests would then see no KeyboardInterrupt. Deliver it as a
# terminal does, here and in the processes the tests start (an ignored
# signal stays ignored across exec, a handled one does not).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
  signal.signal(signal.SIGINT, signal.default_int_handler)

_ROOT_ENV = "QLORA_JAX_TEST_XLA_CACHE"
_LEVEL = "--xla_backend_optimization_level"

_EMITTERS = "--xla_cpu_use_fusion_emitters"

if _LEVEL not in os.environ.get("XLA_FLAGS", ""):
  flags = os.environ.get("XLA_FLAGS", "")
  os.environ["XLA_FLAGS"] = f"{flags} {_LEVEL}=0".strip()
if _EMITTERS not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += f" {_EMITTERS}=false"

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="qlora_jax_test_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  os.environ[_ROOT_ENV] = _CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.02")
else:
  _CACHE = None

_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if _WORKER and os.environ.get(_ROOT_ENV):
  _MINE = os.path.join(os.environ[_ROOT_ENV], _WORKER)
  os.makedirs(_MINE, exist_ok=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _MINE


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if _CACHE is not None:
    shutil.rmtree(_CACHE, ignore_errors=True)


def pytest_configure(config):
  if hasattr(config.option, "loadscopereorder"):  # pytest-xdist
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(LONG_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
