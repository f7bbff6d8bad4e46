"""Shrinks a run config to seconds of CPU and trains it briefly; shared by
tests/test_train.py and tests/test_router_training.py. Also XLA's FLOP
count of a config's forward pass (tests/test_configs.py, tests/test_cost.py).
"""

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import data, train
from moe_jax.models import TransformerConfig, TransformerLM


def shrink(config, data_dir, **train_overrides):
  """`config` at a tiny size: 2 layers of width 32, 4 experts, 8 x 32 tokens
  per batch, groups of 64 tokens, the corpus capped at 300 kB."""
  config.data.data_dir = str(data_dir)
  config.data.max_code_bytes = 300_000
  config.data.seq_len = 32
  config.data.batch_size = 8
  config.data.eval_batch_size = 8
  config.data.num_eval_batches = 2
  config.model.d_model = 32
  config.model.num_layers = 2
  config.model.num_heads = 2
  config.model.mlp_dim = 64
  config.model.moe.num_experts = 4
  config.model.moe.expert_dim = 64
  config.model.moe.group_size = 64
  config.optimizer.warmup_steps = 2
  config.train.progress_bar = False
  config.train.update(train_overrides)
  return config


def train_briefly(config, num_steps):
  """`num_steps` of `train.train_step` without evaluation, checkpoints or
  writers; returns each step's logged metrics as host NumPy values."""
  model = TransformerLM(TransformerConfig.from_config(config, data.VOCAB_SIZE))
  tx, schedule = train.make_optimizer(config.optimizer, num_steps)
  batches = data.create_train_iterator(config.data, seed=config.seed)
  first = next(batches)
  state = train.init_state(config, model, tx, first)
  step_fn = jax.jit(train.bind_train_step(config, model, tx, schedule))
  rows, batch = [], first
  for _ in range(num_steps):
    state, logged = step_fn(state, batch)
    rows.append(logged)
    batch = next(batches)
  return [jax.tree.map(np.asarray, row) for row in jax.device_get(rows)]


def xla_forward_flops(config, batch_size):
  """XLA's count of the FLOPs of one training-mode forward pass (compiled
  HLO, `Compiled.cost_analysis()`: a dict in jax 0.10) at the config's
  widths, on `batch_size` sequences of its length. Returns (FLOPs, the
  model's TransformerConfig)."""
  model = TransformerLM(TransformerConfig.from_config(config, data.VOCAB_SIZE))
  tokens = jnp.zeros((batch_size, config.data.seq_len), jnp.int32)
  rngs = {k: jax.random.key(0) for k in ("params", "jitter", "routing")}
  variables = jax.eval_shape(lambda: model.init(rngs, tokens))

  def forward(variables, tokens):
    logits, _ = model.apply(
      variables,
      tokens,
      deterministic=False,
      rngs=rngs,
      mutable=["router_state", "aux_loss", "moe_metrics", "intermediates"],
    )
    return logits

  # The FLOPs are counted on the optimised HLO; LLVM's optimisation level
  # (machine code only) does not change them and saves a third of the time.
  compiled = (
    jax.jit(forward)
    .lower(variables, tokens)
    .compile(compiler_options={"xla_backend_optimization_level": 0})
  )
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per device
    (analysis,) = analysis
  return float(analysis["flops"]), model.config
