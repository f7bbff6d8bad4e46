"""The three sizes every reproduction suite runs at, applied to a config.

smoke  seconds per arm: a width-32, 2-layer model, 8 x 32 tokens per batch,
       a few steps; what CI runs (`--scale=smoke`) to prove every arm builds,
       trains, evaluates and reports. Its numbers mean nothing.
cpu    the base config's tiny LM (d 128, 4 layers, 4 heads, 16 x 128 bytes
       per batch, ~2.6M parameters), a few hundred steps: minutes per arm on
       a 2-core CPU.
gpu    a single-accelerator LM: d 768, 12 layers, 12 heads, FFN 3072
       (~85M active parameters in the dense twin), sequences of 1024 in
       batches of 128, bfloat16 activations with a float32 router; the step
       counts of the suite's "gpu" entry. Not run here: a run book.
"""

import ml_collections


def apply_scale(
  config: ml_collections.ConfigDict, scale: str, steps: dict, seed: int
) -> ml_collections.ConfigDict:
  """Sets sizes, steps and logging of `scale`; `steps[scale]` training steps.

  Widths that an arm sets relative to d_model (expert_dim, mlp_dim) are
  rescaled by the suite after this call if it needs other ratios.
  """
  config.seed = seed
  num_steps = steps[scale]
  if scale == "smoke":
    config.data.max_code_bytes = 300_000
    config.data.seq_len = 32
    config.data.batch_size = 8
    config.data.eval_batch_size = 8
    config.data.num_eval_batches = 1
    config.model.d_model = 32
    config.model.num_layers = 2
    config.model.num_heads = 2
    config.model.mlp_dim = 64
    config.model.moe.expert_dim = 64
    config.model.moe.group_size = 64
    config.optimizer.warmup_steps = 1
    config.train.log_every = 1
    config.train.eval_every = num_steps
  elif scale == "cpu":
    config.optimizer.warmup_steps = min(100, num_steps // 10)
    config.train.log_every = 10
    config.train.eval_every = max(num_steps // 4, 1)
  elif scale == "gpu":
    config.data.seq_len = 1024
    config.data.batch_size = 128
    config.data.eval_batch_size = 128
    config.data.num_eval_batches = 16
    config.data.max_code_bytes = 100_000_000
    config.model.d_model = 768
    config.model.num_layers = 12
    config.model.num_heads = 12
    config.model.mlp_dim = 3072
    config.model.moe.expert_dim = 3072
    config.model.moe.group_size = 1024
    config.model.dtype = "bfloat16"  # the router stays float32
    config.optimizer.learning_rate = 6e-4
    config.optimizer.warmup_steps = 1000
    config.train.log_every = 50
    config.train.eval_every = max(num_steps // 10, 1)
  else:
    raise ValueError(f"scale={scale!r}; allowed: 'smoke', 'cpu', 'gpu'.")
  config.train.num_steps = num_steps
  config.train.checkpoint_every = max(min(200, num_steps), 1)
  config.train.max_checkpoints_to_keep = 1
  config.train.progress_bar = scale != "smoke"
  config.train.summary_plot = scale != "smoke"
  return config


def load_base():
  """configs/base.py's get_base_config, imported by path."""
  import importlib.util
  from pathlib import Path

  path = Path(__file__).resolve().parents[1] / "base.py"
  spec = importlib.util.spec_from_file_location("moe_jax_configs_base", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_base_config()
