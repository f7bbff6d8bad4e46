"""Forward+backward time of one MoE layer per dispatch backend, against a
dense FFN with the same active FLOPs.

  python experiments/bench_moe_layer.py --json=runs/bench_moe_layer.json
  python experiments/bench_moe_layer.py --quick  # a minute, small sizes

For every (tokens T, experts E, top-k K) of the grid it builds, on the same
tokens x `[T / 256, 256, D]`:
  - dense: `layers.MlpBlock` of width K*F, the FLOP-matched baseline (Switch
    §2: same FLOPs per token as the MoE layer's active parameters);
  - one `layers.MoeLayer` per dispatch backend (`--backends`): top-K router,
    capacity factor 1.25 with C = ceil(K * S * CF / E) per group of S tokens
    (GShard §2.2; dropless ignores capacity), training mode.
Each variant is `jit(value_and_grad(sum(y * cot)))` w.r.t. the parameters
and x, compiled once; then `--rounds` rounds time one call of every
variant, in a rotating order, in this one process, and the table reports
medians. Columns:
  ms          median wall time of forward + backward;
  vs dense    that time over the dense FFN's (1.00 = as cheap as dense);
  GFLOP/s     useful FLOPs / time, useful = 12 T D K F (two matmuls of
              T x D x KF, 2 FLOPs per multiply-add, backward = 2 x forward;
              the router and capacity padding are not useful work);
  temp MB     XLA's temporary buffers of the compiled step
              (`compile().memory_analysis().temp_size_in_bytes`): everything
              but the inputs and outputs, i.e. activations and dispatch;
  dropped     share of the (token, choice) pairs dropped by capacity.
The JSON holds every number, the arguments and the JAX environment.
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.layers import DTYPES, MlpBlock, MoeConfig, MoeLayer

SEQUENCE = 256  # tokens are laid out as [T / 256, 256, D]


def _mode(module: nn.Module) -> dict:
  """MoE layers run in training mode (training capacity factor)."""
  return {"deterministic": False} if isinstance(module, MoeLayer) else {}


def _loss_and_grads(module: nn.Module):
  def loss(params, x_BLD, cot_BLD):
    y_BLD = module.apply({"params": params}, x_BLD, **_mode(module))
    return jnp.sum(y_BLD.astype(jnp.float32) * cot_BLD)

  return jax.value_and_grad(loss, argnums=(0, 1))


def build_variants(tokens, num_experts, top_k, args):
  """{name: (compiled fn, its arguments, temp bytes, dropped fraction)}."""
  dtype = DTYPES[args.dtype]
  key_x, key_cot, key_init = jax.random.split(jax.random.key(tokens), 3)
  shape = (tokens // SEQUENCE, SEQUENCE, args.d_model)
  x_BLD = jax.random.normal(key_x, shape, jnp.float32).astype(dtype)
  cot_BLD = jax.random.normal(key_cot, shape, jnp.float32)
  modules = {
    "dense": MlpBlock(top_k * args.expert_dim, "gelu", dtype=dtype),
  }
  for backend in args.backends:
    config = MoeConfig(
      num_experts=num_experts,
      top_k=top_k,
      router="top_k",
      expert_dim=args.expert_dim,
      group_size=args.group_size,
      capacity_factor=args.capacity_factor,
      capacity_rule="gshard",
      dispatch=backend,
      grouped_matmul=args.grouped_matmul,
      tile_size=args.tile_size,
      activation="gelu",
      dtype=args.dtype,
    )
    modules[backend] = MoeLayer(config)
  variants = {}
  for name, module in modules.items():
    init = jax.jit(lambda key, x, m=module: m.init(key, x, **_mode(m)))
    params = init(key_init, x_BLD)["params"]
    arguments = (params, x_BLD, cot_BLD)
    compiled = jax.jit(_loss_and_grads(module)).lower(*arguments).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    dropped = None
    if name != "dense":
      _, sown = jax.jit(
        lambda p, x, m=module: m.apply(
          {"params": p}, x, deterministic=False, mutable=["moe_metrics"]
        )
      )(params, x_BLD)
      ranks = [
        float(v[0]) for k, v in sown["moe_metrics"].items() if "_rank_" in k
      ]
      dropped = float(np.mean(ranks))
    variants[name] = (compiled, arguments, temp, dropped)
  return variants


def time_rounds(variants, rounds: int) -> dict[str, float]:
  """Median seconds per call; every round calls each variant once, the
  order rotating from round to round."""
  names = list(variants)
  for name in names:  # warm up
    jax.block_until_ready(variants[name][0](*variants[name][1]))
  seconds = {name: [] for name in names}
  for r in range(rounds):
    for name in names[r % len(names) :] + names[: r % len(names)]:
      compiled, arguments = variants[name][:2]
      start = time.perf_counter()
      jax.block_until_ready(compiled(*arguments))
      seconds[name].append(time.perf_counter() - start)
  return {name: float(np.median(s)) for name, s in seconds.items()}


def run(args) -> list[dict]:
  records = []
  for tokens in args.tokens:
    for top_k in args.top_k:
      for num_experts in args.experts:
        variants = build_variants(tokens, num_experts, top_k, args)
        medians = time_rounds(variants, args.rounds)
        useful = 12 * tokens * args.d_model * top_k * args.expert_dim
        for name, (_, _, temp, dropped) in variants.items():
          records.append(
            dict(
              tokens=tokens,
              num_experts=num_experts,
              top_k=top_k,
              variant=name,
              seconds=medians[name],
              vs_dense=medians[name] / medians["dense"],
              useful_gflops=useful / medians[name] / 1e9,
              temp_bytes=temp,
              dropped=dropped,
            )
          )
        print(markdown_rows(records[-len(variants) :]), flush=True)
  return records


HEADER = (
  "| T | E | K | variant | ms | vs dense | GFLOP/s | temp MB | dropped |\n"
  "|---|---|---|---|---|---|---|---|---|"
)


def markdown_rows(records) -> str:
  rows = []
  for r in records:
    dropped = "-" if r["dropped"] is None else f"{r['dropped']:.1%}"
    rows.append(
      f"| {r['tokens']} | {r['num_experts']} | {r['top_k']} | {r['variant']} "
      f"| {r['seconds'] * 1e3:.1f} | {r['vs_dense']:.2f} "
      f"| {r['useful_gflops']:.0f} | {r['temp_bytes'] / 2**20:.1f} "
      f"| {dropped} |"
    )
  return "\n".join(rows)


def pivot(records) -> str:
  """One row per (T, E, K): the dense time, each backend's ratio to it,
  the useful GFLOP/s and temp MB of each, and the drops by capacity."""
  cells = {}
  for r in records:
    cells.setdefault((r["tokens"], r["num_experts"], r["top_k"]), {})[
      r["variant"]
    ] = r
  names = [n for n in next(iter(cells.values())) if n != "dense"]
  header = (
    "| T | E | K | dense ms | "
    + " | ".join(f"{n} x dense" for n in names)
    + " | GFLOP/s "
    + "/".join(names)
    + " | temp MB dense/"
    + "/".join(names)
    + " | dropped by capacity |"
  )
  rows = [header, "|" + "---|" * (header.count("|") - 1)]
  for (tokens, num_experts, top_k), by_name in cells.items():
    dropped = [
      by_name[n]["dropped"] for n in names if by_name[n]["dropped"] is not None
    ]
    rows.append(
      f"| {tokens} | {num_experts} | {top_k} "
      f"| {by_name['dense']['seconds'] * 1e3:.0f} | "
      + " | ".join(f"{by_name[n]['vs_dense']:.2f}" for n in names)
      + " | "
      + "/".join(f"{by_name[n]['useful_gflops']:.0f}" for n in names)
      + " | "
      + "/".join(
        f"{by_name[n]['temp_bytes'] / 2**20:.0f}" for n in ["dense", *names]
      )
      + f" | {max(dropped, default=0):.1%} |"
    )
  return "\n".join(rows)


def summary(records) -> str:
  """The issue's targets, from the measured records. The E scaling compares
  ratios to dense (each measured in its own rounds), so that a change of
  machine load between grid cells cancels out."""
  lines = []
  cells = {}
  for r in records:
    if r["variant"] != "dense":
      cells.setdefault((r["tokens"], r["top_k"], r["variant"]), {})[
        r["num_experts"]
      ] = r
  best = {}
  for (tokens, top_k, _), by_e in cells.items():
    for num_experts, r in by_e.items():
      cell = (tokens, num_experts, top_k)
      if cell not in best or r["vs_dense"] < best[cell]["vs_dense"]:
        best[cell] = r
  for (tokens, num_experts, top_k), r in sorted(best.items()):
    lines.append(
      f"T={tokens} E={num_experts} K={top_k}: best {r['variant']} "
      f"{r['vs_dense']:.2f}x dense (target <= 1.25)"
    )
  for (tokens, top_k, variant), by_e in sorted(cells.items()):
    low, high = by_e[min(by_e)], by_e[max(by_e)]
    if low is not high:
      lines.append(
        f"T={tokens} K={top_k} {variant}: E={high['num_experts']} vs "
        f"E={low['num_experts']} = {high['vs_dense'] / low['vs_dense']:.2f} "
        f"relative to dense ({high['seconds'] / low['seconds']:.2f} in raw "
        "time; target <= 1.3)"
      )
  return "\n".join(lines)


def environment() -> dict:
  return dict(
    jax=jax.__version__,
    backend=jax.default_backend(),
    devices=[d.device_kind for d in jax.devices()],
    cpu_count=os.cpu_count(),
    machine=platform.machine(),
    python=platform.python_version(),
    command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
  )


def _ints(text: str) -> list[int]:
  return [int(v) for v in text.split(",")]


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tokens", type=_ints, help="default 4096,16384")
  parser.add_argument("--experts", type=_ints, help="default 8,32,128")
  parser.add_argument("--top_k", type=_ints, help="default 1,2")
  parser.add_argument("--d_model", type=int, default=256)
  parser.add_argument("--expert_dim", type=int, default=512)
  parser.add_argument("--group_size", type=int, default=1024)
  parser.add_argument("--capacity_factor", type=float, default=1.25)
  parser.add_argument(
    "--backends",
    type=lambda s: s.split(","),
    default=["einsum", "indices", "dropless"],
  )
  parser.add_argument("--grouped_matmul", default="auto")
  parser.add_argument("--tile_size", type=int, default=0, help="0: auto")
  parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--json", default="", help="where to write results")
  parser.add_argument(
    "--quick",
    action="store_true",
    help="tiny sizes (T 512, D 32, F 64, S 256, E 4,8), two rounds",
  )
  args = parser.parse_args(argv)
  grid = dict(tokens=[4096, 16384], experts=[8, 32, 128], top_k=[1, 2])
  if args.quick:
    grid.update(tokens=[512], experts=[4, 8])
    args.d_model, args.expert_dim, args.group_size = 32, 64, 256
    args.rounds = 2
  for name, default in grid.items():
    if getattr(args, name) is None:
      setattr(args, name, default)
  for tokens in args.tokens:
    if tokens % SEQUENCE or tokens % min(args.group_size, tokens):
      raise ValueError(
        f"tokens={tokens} must be a multiple of {SEQUENCE} and of "
        f"group_size={args.group_size}."
      )
  return args


def main(argv=None):
  args = parse_args(argv)
  env = environment()
  print(
    f"{env['backend']} {env['devices'][0]} x{len(env['devices'])}, "
    f"{env['cpu_count']} CPUs, jax {env['jax']}, {args.dtype}, "
    f"D={args.d_model} F={args.expert_dim} S={args.group_size} "
    f"CF={args.capacity_factor}\n"
  )
  print(HEADER, flush=True)
  records = run(args)
  print("\n" + pivot(records) + "\n\n" + summary(records))
  if args.json:
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    out = dict(environment=env, arguments=vars(args), records=records)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
