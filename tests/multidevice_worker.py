"""Multi-device checks that tests/test_expert_parallel.py runs in subprocesses.

The main test process keeps its single CPU device; this script runs with
simulated devices and prints one JSON line of measurements for the test to
judge:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
      python tests/multidevice_worker.py equivalence
  ... python tests/multidevice_worker.py restore WORKDIR 1,2,4 OUT.npz
  ... python tests/multidevice_worker.py deepseek
"""

import json
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np

from moe_jax import data, sharding, train
from moe_jax.checkpoint import Checkpointer
from moe_jax.models import TransformerConfig, TransformerLM

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))
from base import get_base_config  # noqa: E402

sys.path.insert(0, str(REPO / "experiments"))
import bench_all_to_all  # noqa: E402

MESH_SHAPE = (2, 2, 2)  # data, expert, model: every kind of split at once


def equivalence_config(implementation: str):
  """A one-block MoE LM whose routing exercises every per-group rule: top-2
  with jitter, GShard's random second choice, drops (CF 1.0), padding."""
  config = get_base_config()
  config.data.seq_len = 16
  config.data.batch_size = 16
  config.model.d_model = 16
  config.model.num_layers = 1
  config.model.moe_every = 1
  config.model.num_heads = 2
  moe = config.model.moe
  moe.num_experts, moe.expert_dim, moe.group_size = 8, 32, 16
  moe.router, moe.top_k, moe.capacity_rule = "gshard", 2, "gshard"
  moe.second_policy, moe.router_jitter = "random", 0.1
  moe.capacity_factor, moe.min_capacity = 1.0, 1
  config.loss.load_balancing = "gshard"
  config.optimizer.grad_clip_norm = 0.05  # active: the norm is far above it
  config.mesh.expert_parallel = implementation
  return config


def synthetic_batch(config) -> dict:
  rng = np.random.default_rng(0)
  B, L = config.data.batch_size, config.data.seq_len
  mask = np.ones((B, L), np.float32)
  mask[::3, L // 2 :] = 0.0  # padded tails
  return {
    "inputs": rng.integers(0, data.VOCAB_SIZE, (B, L), dtype=np.int32),
    "targets": rng.integers(0, data.VOCAB_SIZE, (B, L), dtype=np.int32),
    "mask": mask,
  }


def run_one_step(config, batch, layout, initial=None, decisions=True):
  """One train step on `layout`, from a fresh sharded init or from the host
  state `initial`. Returns host copies of what the test compares."""
  model = TransformerLM(TransformerConfig.from_config(config, data.VOCAB_SIZE))
  tx, schedule = train.make_optimizer(config.optimizer, 10)
  if initial is None:
    state = train.init_state(config, model, tx, batch, layout)
  else:
    template = train.abstract_state(config, model, tx, batch, layout)
    shardings = jax.tree.map(lambda t: t.sharding, template)
    state = jax.device_put(initial, shardings)
  out = {"initial": jax.device_get(state)}
  step_fn = layout.jit_train_step(
    train.bind_train_step(config, model, tx, schedule),
    state,
  )
  placed = layout.put_batch(batch)

  def route(params, batch):
    _, sown = model.apply(
      {"params": params},
      batch["inputs"],
      batch["mask"] > 0,
      deterministic=False,
      rngs={"jitter": jax.random.key(1), "routing": jax.random.key(2)},
      mutable=["intermediates"],
    )
    return sown["intermediates"]["layer_00"]["moe"]

  if decisions and layout.mesh is None:
    out["routing"] = jax.device_get(jax.jit(route)(state.params, placed))
  elif decisions:
    with jax.set_mesh(layout.mesh):  # the model also runs under jax's mesh
      out["routing"] = jax.device_get(jax.jit(route)(state.params, placed))
  compiled = step_fn.lower(state, placed).compile()
  state, metrics = compiled(state, placed)
  out["hlo"] = compiled.as_text()
  out["metrics"] = jax.device_get(metrics)
  # Adam's first moment after one step is 0.1 x the clipped gradient.
  out["clipped_gradient"] = jax.device_get(state.opt_state[1][0].mu)
  out["router_state"] = jax.device_get(state.router_state)
  out["router_state_replicated"] = all(
    x.sharding.is_fully_replicated for x in jax.tree.leaves(state.router_state)
  )
  return out


def _relative_difference(a, b) -> float:
  """max |a - b| / max |a| over all leaves."""
  a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(a)])
  b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(b)])
  return float(np.max(np.abs(a - b)) / np.max(np.abs(a)))


def _identical(a, b) -> bool:
  return all(
    np.array_equal(x, y)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


def _compare(reference: dict, got: dict, config) -> dict:
  m0, m1 = reference["metrics"], got["metrics"]
  drops = [k for k in m0 if "drop_fraction" in k]
  collectives = bench_all_to_all.hlo_collectives(got["hlo"])
  result = {
    "loss": [float(m0["loss"]), float(m1["loss"])],
    "grad_norm": [float(m0["grad_norm"]), float(m1["grad_norm"])],
    "clip_norm": config.optimizer.grad_clip_norm,
    "drop_fraction": float(m0[drops[0]]),
    "drops_identical": all(np.array_equal(m0[k], m1[k]) for k in drops),
    "gradient_difference": _relative_difference(
      reference["clipped_gradient"], got["clipped_gradient"]
    ),
    "hlo_all_to_all": collectives["all-to-all"],
    "hlo_all_gather": collectives["all-gather"],
    "hlo_all_to_all_bytes": bench_all_to_all.hlo_all_to_all(got["hlo"])[
      "bytes"
    ],
    "formula_bytes_per_device": bench_all_to_all.formula(config, MESH_SHAPE)[
      "operand_bytes_per_device"
    ],
    "hlo_excerpt": [
      line.strip()[:200]
      for line in got["hlo"].splitlines()
      if "all-to-all(" in line
    ][:2],
  }
  if "routing" in got:
    result["init_identical"] = _identical(reference["initial"], got["initial"])
    result["routing_identical"] = _identical(
      {k: reference["routing"][k] for k in ("expert_index", "kept")},
      {k: got["routing"][k] for k in ("expert_index", "kept")},
    )
    result["gates_difference"] = _relative_difference(
      reference["routing"]["gates"], got["routing"]["gates"]
    )
  return result


def equivalence() -> dict:
  """shard_map and GSPMD expert parallelism on a 2x2x2 mesh against one
  device, and against each other."""
  config = equivalence_config("shard_map")
  batch = synthetic_batch(config)
  reference = run_one_step(config, batch, sharding.Layout())
  layout = sharding.Layout(sharding.make_mesh(MESH_SHAPE))
  with_shard_map = run_one_step(config, batch, layout)
  gspmd_config = equivalence_config("gspmd")
  with_gspmd = run_one_step(
    gspmd_config, batch, layout, with_shard_map["initial"], decisions=False
  )
  return {
    "shard_map": _compare(reference, with_shard_map, config),
    "gspmd": _compare(reference, with_gspmd, gspmd_config),
    "shard_map_vs_gspmd": _relative_difference(
      with_shard_map["clipped_gradient"], with_gspmd["clipped_gradient"]
    ),
  }


def deepseek() -> dict:
  """One train step of a DeepSeek-V3 MoE LM (sigmoid top-2 within 2 of 4
  expert groups, a shared expert, loss-free bias balancing, the sequence
  loss) on a 2x2x2 mesh against one device: the same loss, and the same
  updated bias, replicated on every device."""
  config = equivalence_config("shard_map")
  moe = config.model.moe
  moe.router, moe.second_policy, moe.router_jitter = "deepseek", "all", 0.0
  moe.num_expert_groups, moe.top_expert_groups = 4, 2
  moe.num_shared_experts, moe.bias_update_rate = 1, 0.01
  moe.capacity_factor = 2.0
  batch = synthetic_batch(config)
  reference = run_one_step(config, batch, sharding.Layout(), decisions=False)
  layout = sharding.Layout(sharding.make_mesh(MESH_SHAPE))
  got = run_one_step(config, batch, layout, decisions=False)
  bias = [
    np.asarray(r["router_state"]["layer_00"]["moe"]["bias"]).tolist()
    for r in (reference, got)
  ]
  return {
    "loss": [
      float(reference["metrics"]["loss"]),
      float(got["metrics"]["loss"]),
    ],
    "sequence_loss": [
      float(r["metrics"]["aux/sequence_balance_loss"]) for r in (reference, got)
    ],
    "bias": bias,
    "replicated": got["router_state_replicated"],
    "gradient_difference": _relative_difference(
      reference["clipped_gradient"], got["clipped_gradient"]
    ),
  }


def restore(workdir: str, shape: str, out: str) -> dict:
  """Restores the latest checkpoint of `workdir` onto a mesh of `shape` and
  writes every leaf to `out` (.npz, keys are leaf paths)."""
  with open(Path(workdir) / "config.json") as f:
    config = ml_collections.ConfigDict(json.load(f))
  model = TransformerLM(TransformerConfig.from_config(config, data.VOCAB_SIZE))
  tx, _ = train.make_optimizer(config.optimizer, config.train.num_steps)
  mesh = sharding.make_mesh(tuple(int(s) for s in shape.split(",")))
  layout = sharding.Layout(mesh)
  batch = {"inputs": np.zeros((config.data.batch_size, config.data.seq_len))}
  template = train.abstract_state(config, model, tx, batch, layout)
  ckpt = Checkpointer(
    Path(workdir) / "checkpoints", max_to_keep=5, save_interval_steps=1
  )
  state, data_state = ckpt.restore(template)
  ckpt.close()
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  shardings_kept = all(
    x.sharding == t.sharding
    for x, t in zip(jax.tree.leaves(state), jax.tree.leaves(template))
  )
  np.savez(out, **{jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves})
  wi = state.params["layer_01"]["moe"]["experts"]["wi"]
  return {
    "step": int(state.step),
    "data_state": data_state,
    "shardings_kept": shardings_kept,
    "wi_spec": str(wi.sharding.spec),
    "wi_shard_shape": list(wi.addressable_shards[0].data.shape),
  }


if __name__ == "__main__":
  mode, *args = sys.argv[1:]
  modes = {"equivalence": equivalence, "restore": restore, "deepseek": deepseek}
  result = modes[mode](*args)
  print("RESULT " + json.dumps(result))
