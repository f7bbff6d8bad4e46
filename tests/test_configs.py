"""Every config in configs/ loads, locks, documents its command and trains."""

import importlib.util
from pathlib import Path

import pytest
import tiny  # (pytest puts tests/ on sys.path)

from moe_jax import routing, train

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(p for p in CONFIG_DIR.glob("*.py") if p.name != "base.py")


def load(path: Path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_there_are_configs():
  names = {p.stem for p in CONFIGS}
  assert {"switch_top1", "gshard_top2", "dense"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_is_a_run_book(path):
  """STYLE rule 4: the docstring gives the exact command to run it."""
  module = load(path)
  command = (
    f"python -m moe_jax.train --config=configs/{path.name} "
    f"--workdir=runs/{path.stem}"
  )
  assert command in module.__doc__
  config = module.get_config()
  config.lock()
  with pytest.raises(AttributeError):
    config.model.no_such_field = 1  # locked: typos in overrides fail


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_trains_two_steps(path, tmp_path_factory):
  config = load(path).get_config()
  config.data.data_dir = str(tmp_path_factory.getbasetemp() / "tfds")
  config.data.max_code_bytes = 300_000
  config.data.seq_len = 16
  config.data.batch_size = 4
  config.data.eval_batch_size = 4
  config.data.num_eval_batches = 1
  config.model.d_model = 16
  config.model.num_layers = 2
  config.model.num_heads = 2
  config.model.mlp_dim = 32
  config.model.moe.expert_dim = 32
  config.model.moe.group_size = 32
  config.train.num_steps = 2
  config.train.progress_bar = False
  final = train.train_and_evaluate(config, str(tmp_path_factory.mktemp("run")))
  assert final["eval/lm_loss"] > 0


MOE_CONFIGS = [p for p in CONFIGS if load(p).get_config().model.moe.num_experts]


@pytest.mark.parametrize("path", MOE_CONFIGS, ids=lambda p: p.stem)
def test_dense_twin_is_flop_matched(path):
  """`--config.model.moe.num_experts=0` turns an MoE config into its dense
  twin; XLA's FLOP count of a forward pass must then match the MoE
  model's within 1%, at the config's widths (d_model, expert_dim, shared
  experts, gating). To keep the compiles short: 2 sequences of the
  config's length, and moe_every blocks, the last one holding the MoE
  layer (every MoE block is the same code, so one shows the match).

  What is compared. The MoE model's FLOPs minus its routers' matmuls,
  2 T D E per MoE layer (T tokens; twice for noisy_top_k, whose noise has
  a second D x E matmul; none for hash and random routing), against the
  twin's. The rest of the routing (softmax or sigmoid, top-k, slot counting,
  the gate-weighted combine, the sown losses and metrics) stays in and must
  fit in the 1%: measured 0.10-0.42% of the model here. It must also be
  >= 0: a twin wider than the MoE layer fails. A twin of width K F alone,
  without DeepSeek's shared expert, is 8% short and fails.

  Expert FLOPs are compared at the level of the (token, expert) pairs, K
  per token: dispatch="indices" (gathers, no one-hot einsum FLOPs) with
  the capacity rule "gshard", capacity factor 1 and min_capacity 0, so the
  E x C expert buffers hold exactly K S slots per group, the work a
  dropless layer does, and no capacity slack (a factor > 1 would run the
  experts over empty slots). Not dispatch="dropless" itself: XLA cannot
  count its grouped matmul (a loop with data-dependent trip counts on CPU,
  or a dense masked ragged_dot doing E times the work). Expert choice keeps
  its own c (C = c S / E tokens per expert is its compute: c experts per
  token on average)."""
  config = load(path).get_config()
  moe = config.model.moe
  if routing.ROUTING_SCHEMES[moe.router].family != "expert_choice":
    moe.dispatch = "indices"
    moe.capacity_rule = "gshard"  # C = ceil(CF * K * S / E) = K S / E
    moe.capacity_factor = 1.0
    moe.min_capacity = 0
  config.model.num_layers = config.model.moe_every
  # Expert dropout's random bits (configs/finetune.py) are no FFN FLOPs,
  # and the twin has no expert to drop in.
  moe.expert_dropout_rate = 0.0
  twin = config.copy_and_resolve_references()
  twin.model.moe.num_experts = 0
  B = 2
  moe_flops, cfg = tiny.xla_forward_flops(config, B)
  twin_flops, twin_cfg = tiny.xla_forward_flops(twin, B)

  T, D, E = B * config.data.seq_len, cfg.d_model, moe.num_experts
  layers = sum(cfg.is_moe_block(i) for i in range(cfg.num_layers))
  scheme = routing.ROUTING_SCHEMES[moe.router]
  matmuls = 0 if not scheme.learned else 2 if moe.router == "noisy_top_k" else 1
  router_flops = layers * matmuls * 2 * T * D * E
  routing_overhead = moe_flops - router_flops - twin_flops
  assert 0 <= routing_overhead <= 0.01 * twin_flops, (
    f"{path.stem}: MoE {moe_flops:.4g} - routers {router_flops:.4g} vs "
    f"dense twin {twin_flops:.4g} (width {twin_cfg.dense_moe_dim})"
  )
