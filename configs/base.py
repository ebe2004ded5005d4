"""The schema of every run's config: each field, its default and what it
means. Not an experiment: a config file starts from it and sets what its
experiment needs (configs/minilm_docstrings.py, configs/default.py);
`qlora_jax.engine.settings` checks every field in one pass.

The fields without a useful default are the model (`model.checkpoint`,
or `model.hf_config` for a random init) and the data (`data.source`,
`data.train_path` / `data.eval_path` for "jsonl" and "text").
"""

from ml_collections import config_dict


def get_config() -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()

  c.model = config_dict.ConfigDict()
  # A Hugging Face folder, a .gguf file, or a name ("smollm2", "minilm");
  # "" with model.hf_config for a randomly initialised model.
  c.model.checkpoint = ""
  c.model.task = "causal_lm"  # or "classification" (BERT)
  c.model.dtype = "float32"  # compute dtype (bfloat16 on GPU/TPU)
  c.model.base_dtype = "float32"  # storage of float (unquantized) weights
  # Storage of the frozen embedding tables ("": base_dtype). They are only
  # gathered from: "bfloat16" over a bfloat16 checkpoint halves their bytes
  # and changes no result.
  c.model.embed_dtype = ""
  c.model.scan_layers = False  # nn.scan over blocks: compile one block
  c.model.remat = False  # recompute blocks in the backward pass
  c.model.hf_config = {}  # a config.json as a dict: random init, no checkpoint
  # Matmul of quantized layers: "auto" (the fused Pallas kernel on one GPU
  # or TPU, the fused C++ kernel for decoding on one CPU, XLA otherwise),
  # "xla", "pallas" or "cpu".
  c.model.matmul_kernel = "auto"
  c.model.adapter = ""  # a PEFT LoRA adapter folder to start from

  c.quant = config_dict.ConfigDict()
  c.quant.data_type = "nf4"  # "none", nf4, fp4, fp8, nf<k>, int<k>
  c.quant.block_size = 64  # elements per absmax block
  c.quant.double_quant = True  # quantize the block absmax again (8-bit)
  c.quant.targets = "all-linear"  # which linear layers are quantized
  c.quant.exclude = ""  # regex of layers kept in float

  c.lora = config_dict.ConfigDict()
  c.lora.enabled = True  # False with train.mode "lora": train only heads
  c.lora.rank = 8
  # Scale alpha / rank (alpha / sqrt(rank) with rslora); 0 (a no-op
  # adapter) is refused.
  c.lora.alpha = 16.0
  c.lora.targets = "all-linear"  # "all-linear", a regex, or a list of names
  c.lora.exclude = ""  # regex of layers without adapters
  c.lora.rank_pattern = {}  # regex -> rank
  c.lora.alpha_pattern = {}  # regex -> alpha
  c.lora.rslora = False
  c.lora.dropout = 0.05  # on the adapter input
  c.lora.init = "kaiming"  # kaiming | gaussian | pissa | loftq
  c.lora.loftq_iters = 1
  c.lora.dora = False
  c.lora.qa = False  # QA-LoRA: needs quant.data_type "int<k>_asym"

  c.data = config_dict.ConfigDict()
  # stdlib_docstrings | stdlib_questions | assistant | jsonl | text |
  # synthetic ("assistant": data.assistant's conversations, summaries and
  # docstring questions)
  c.data.source = "jsonl"
  c.data.train_path = ""  # JSONL (or .txt for language modelling)
  c.data.eval_path = ""
  c.data.max_length = 64  # tokens per row
  c.data.packing = False  # language modelling: pack documents into rows
  c.data.instruction = False  # prompt/completion JSONL (loss on completion)
  # Chat template: "" the checkpoint's own | chatml | gemma | llama3 (built
  # in, for base models) | a Jinja file | "none" (prompt + completion as is)
  c.data.chat_template = ""
  c.data.text_split = "paragraph"  # .txt: one document per paragraph | line
  c.data.synthetic_examples = 256  # rows of random tokens (benchmarks)
  c.data.synthetic_eval_examples = 32
  # Instruction data of a causal LM: answer this many eval prompts by
  # greedy generation at each evaluation (accuracy: the answer equals the
  # completion); 0 turns it off.
  c.data.eval_generate = 0
  c.data.max_new_tokens = 16  # tokens per generated eval answer
  # data.source "stdlib_questions": the docstring task asked of a decoder.
  c.data.questions_per_class = 170  # training rows per package (at most 170)
  c.data.eval_questions_per_class = 45  # eval rows per package (at most 45)

  c.opt = config_dict.ConfigDict()
  c.opt.learning_rate = 1e-3
  c.opt.schedule = "linear"  # constant | linear | cosine, after warmup
  c.opt.warmup_ratio = 0.06
  c.opt.warmup_steps = 0  # overrides warmup_ratio when > 0
  c.opt.weight_decay = 0.0
  c.opt.b1 = 0.9
  c.opt.b2 = 0.999
  c.opt.eps = 1e-8
  c.opt.max_grad_norm = 0.3  # QLoRA's clipping; 0 turns it off
  c.opt.lora_plus_ratio = 1.0  # LoRA+: B's learning rate over A's

  # Every step is checked before its checkpoint is saved; a NaN or Inf, an
  # update over 100x the weights' norm, or a loss at ln V with a gradient
  # of 0 stops the run (qlora_jax/engine/divergence.py).
  c.train = config_dict.ConfigDict()
  c.train.mode = "lora"  # lora (adapters + heads) | full (every weight)
  # sft (next-token loss) | dpo (preference pairs; the `dpo` section).
  c.train.objective = "sft"
  c.train.train_modules = []  # regexes of base variables that train too
  c.train.seed = 0
  c.train.batch_size = 32  # global, over all devices
  c.train.grad_accum = 1  # micro-batches per step
  c.train.epochs = 5
  c.train.steps = 0  # overrides epochs when > 0
  c.train.eval_every = 0  # steps; 0 = once per epoch
  c.train.checkpoint_every = 0  # steps; 0 = at every eval
  c.train.keep_checkpoints = 2
  c.train.log_every = 10
  c.train.show_predictions = 6
  # Before loading: a run the memory model predicts not to fit a device
  # is refused ("error"), or only warned of ("warn"), or not checked.
  c.train.memory_check = "error"

  # train.objective "dpo": JSONL rows {"prompt" | "messages", "chosen",
  # "rejected"}; the reference is the base with adapters off.
  c.dpo = config_dict.ConfigDict()
  c.dpo.beta = 0.1  # the KL strength: rewards are beta * log(pi / ref)
  c.dpo.loss = "sigmoid"  # sigmoid (DPO) | ipo
  c.dpo.label_smoothing = 0.0  # sigmoid only: conservative DPO's e

  # train.objective "grpo": JSONL rows {"prompt" | "messages", ...} (or
  # data.source "stdlib_questions"); train.batch_size prompts per
  # generation batch, each answered group_size times. The loss is DAPO's
  # token-level mean over every completion token of the batch (a long
  # completion's tokens weigh as much as a short one's).
  c.grpo = config_dict.ConfigDict()
  c.grpo.group_size = 4  # G completions per prompt (>= 2)
  c.grpo.temperature = 1.0  # sampling; log-probs are of logits / T too
  c.grpo.top_p = 1.0
  c.grpo.max_new_tokens = 16  # per completion; prompts get the rest
  c.grpo.mu = 1  # optimizer steps per generation batch
  c.grpo.epsilon = 0.2  # the ratio's clip: [1 - epsilon, 1 + epsilon]
  c.grpo.epsilon_high = 0.0  # DAPO's upper clip; 0: epsilon
  c.grpo.beta = 0.0  # KL to the adapters-off reference (k3), as DAPO
  # Advantages (r - group mean) / (group std + 1e-4) as GRPO; False:
  # r - group mean (Dr. GRPO).
  c.grpo.scale_rewards = True
  # exact | contains | regex (the row's answer_field is the target or the
  # pattern) | "module:function" called as (prompt, completion, row).
  c.grpo.reward = "exact"
  c.grpo.answer_field = "answer"
  c.grpo.pass_reward = 1.0  # held-out pass@1: a greedy reward >= this

  # lm-evaluation-harness tasks run on the model at each evaluation (and
  # before training) of a causal LM: their metrics go into metrics.jsonl
  # as "task/metric", the console table and the curves.
  c.eval = config_dict.ConfigDict()
  c.eval.tasks = ()  # task names, e.g. ("stdlib_docstring_mc",)
  c.eval.include_path = ""  # a folder of task YAMLs (e.g. "tasks")
  c.eval.num_fewshot = 0
  c.eval.limit = 0  # documents per task; 0: all
  c.eval.apply_chat_template = False  # render prompts as a chat
  c.eval.batch_size = 0  # rows per model call; 0: train.batch_size
  # "auto": lm-eval when installed, else the zero-shot local
  # multiple-choice tasks that qlora_jax/harness/native.py runs alone
  # (the same numbers); "lm_eval" or "native" to insist.
  c.eval.backend = "auto"

  c.mesh = config_dict.ConfigDict()
  c.mesh.data = -1  # -1: every device not used by fsdp
  c.mesh.fsdp = 1

  c.distributed = config_dict.ConfigDict()
  c.distributed.enabled = False  # jax.distributed.initialize (multi-host)
  c.distributed.coordinator_address = config_dict.placeholder(str)
  c.distributed.num_processes = config_dict.placeholder(int)
  c.distributed.process_id = config_dict.placeholder(int)
  c.distributed.cpu_collectives = config_dict.placeholder(str)  # "gloo"
  return c
