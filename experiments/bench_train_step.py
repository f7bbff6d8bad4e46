"""Tokens/s of a full training step of the MoE LM against its FLOP-matched
dense LM, one row per dispatch backend.

  python experiments/bench_train_step.py --json=runs/bench_train_step.json
  python experiments/bench_train_step.py --config=configs/gshard_top2.py

The models come from a config file (default configs/switch_top1.py: 4
blocks, d 128, 8 experts of width 512 in every other block, top-1, batch
16 x 128); the dense LM is the same config with num_experts = 0, whose MoE
blocks become dense FFNs of width top_k * expert_dim (Switch §2,
"FLOP-matched"). Each variant runs `moe_jax.train.train_step` (forward,
backward, AdamW update; donated state) on one fixed batch of random tokens.
After one warm-up step, `--rounds` rounds run `--steps` steps of every
variant in a rotating order in this one process; the table reports the
median over rounds of the time per step and tokens/s = B * L / time.
"""

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import data, train
from moe_jax.models import TransformerConfig, TransformerLM

REPO = Path(__file__).resolve().parents[1]


def load_config(path: str):
  spec = importlib.util.spec_from_file_location(Path(path).stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def build_step(config, batch):
  """(jitted train_step closed over the model, initial state)."""
  model = TransformerLM(TransformerConfig.from_config(config, data.VOCAB_SIZE))
  tx, schedule = train.make_optimizer(config.optimizer, config.train.num_steps)
  step = jax.jit(
    train.bind_train_step(config, model, tx, schedule),
    donate_argnums=0,
  )
  return step, train.init_state(config, model, tx, batch)


def random_batch(config):
  B, L = config.data.batch_size, config.data.seq_len
  tokens = jax.random.randint(
    jax.random.key(0), (B, L + 1), 0, data.VOCAB_SIZE, jnp.int32
  )
  return dict(
    inputs=tokens[:, :-1],
    targets=tokens[:, 1:],
    mask=jnp.ones((B, L), jnp.float32),
  )


def variant_configs(args) -> dict:
  """{"dense": ..., backend: ...} from the base config and overrides."""
  base = load_config(args.config)
  base.data.batch_size = args.batch_size or base.data.batch_size
  base.data.seq_len = args.seq_len or base.data.seq_len
  base.model.dtype = args.dtype
  if args.num_experts:
    base.model.moe.num_experts = args.num_experts
  if args.quick:  # a tiny model, for a smoke test
    base.model.d_model, base.model.num_layers = 16, 2
    base.model.num_heads, base.model.mlp_dim = 2, 32
    base.model.moe.expert_dim, base.model.moe.group_size = 32, 32
  configs = {}
  dense = base.copy_and_resolve_references()
  dense.model.moe.num_experts = 0
  configs["dense"] = dense
  for backend in args.backends:
    config = base.copy_and_resolve_references()
    config.model.moe.dispatch = backend
    configs[backend] = config
  return configs


def run(args) -> list[dict]:
  configs = variant_configs(args)
  batch = random_batch(configs["dense"])
  steps, states, params = {}, {}, {}
  for name, config in configs.items():
    steps[name], states[name] = build_step(config, batch)
    params[name] = sum(x.size for x in jax.tree.leaves(states[name].params))
    states[name], _ = steps[name](states[name], batch)  # compile, warm up
    jax.block_until_ready(states[name])
  names = list(configs)
  seconds = {name: [] for name in names}
  for r in range(args.rounds):
    for name in names[r % len(names) :] + names[: r % len(names)]:
      start = time.perf_counter()
      for _ in range(args.steps):
        states[name], logged = steps[name](states[name], batch)
      jax.block_until_ready((states[name], logged))
      seconds[name].append((time.perf_counter() - start) / args.steps)
  tokens = configs["dense"].data.batch_size * configs["dense"].data.seq_len
  dense = float(np.median(seconds["dense"]))
  records = []
  for name in names:
    step_seconds = float(np.median(seconds[name]))
    records.append(
      dict(
        variant=name,
        step_seconds=step_seconds,
        tokens_per_second=tokens / step_seconds,
        vs_dense=dense / step_seconds,
        parameters=int(params[name]),
      )
    )
  return records


def markdown(records) -> str:
  rows = [
    "| variant | ms / step | tokens/s | vs dense | parameters |",
    "|---|---|---|---|---|",
  ]
  for r in records:
    rows.append(
      f"| {r['variant']} | {r['step_seconds'] * 1e3:.1f} "
      f"| {r['tokens_per_second']:,.0f} | {r['vs_dense']:.2f} "
      f"| {r['parameters']:,} |"
    )
  return "\n".join(rows)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default=str(REPO / "configs/switch_top1.py"))
  parser.add_argument(
    "--backends",
    type=lambda s: s.split(","),
    default=["einsum", "indices", "dropless"],
  )
  parser.add_argument("--num_experts", type=int, default=0, help="0: config")
  parser.add_argument("--batch_size", type=int, default=0, help="0: config")
  parser.add_argument("--seq_len", type=int, default=0, help="0: config")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=5, help="per round")
  parser.add_argument("--json", default="", help="where to write results")
  parser.add_argument(
    "--quick", action="store_true", help="tiny sizes, for a smoke test"
  )
  args = parser.parse_args(argv)
  if args.quick:
    args.batch_size, args.seq_len, args.rounds, args.steps = 2, 16, 1, 1
  return args


def main(argv=None):
  args = parse_args(argv)
  print(
    f"{jax.default_backend()} {jax.devices()[0].device_kind}, jax "
    f"{jax.__version__}, {Path(args.config).name}, {args.dtype}\n"
  )
  records = run(args)
  print(markdown(records))
  if args.json:
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    out = dict(
      command=command,
      jax=jax.__version__,
      backend=jax.default_backend(),
      arguments=vars(args),
      records=records,
    )
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
