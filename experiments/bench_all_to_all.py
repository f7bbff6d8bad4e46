"""Bytes the expert all-to-all moves per training step, for a config and mesh.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
  python experiments/bench_all_to_all.py --config=configs/switch_top1.py \\
      --config.mesh.shape="(2,4,1)"

prints the communication cost line of that config, e.g.

  all-to-all per step: 2 MoE layers x 4 buffers [E=8, G=4, C=80, D=128] f32;
  1.97 MB operands per device, 1.47 MB leave each device, 11.80 MB in all
  over 8 devices; compiled HLO: 1.97 MB operands per device (matches)

The formula (GShard §3.2, Alg. 2). A forward MoE layer moves the dispatched
buffers `[E, G, C, D]` to the experts' devices and the expert outputs (same
shape) back: two all-to-alls of E*G*C*D elements in all. The backward pass
moves their gradients the same way: four per layer per step. Each device
holds E * G/(n_d n_e) * C * D elements of a buffer (its own groups) and sends
the fraction (n_e - 1)/n_e of it, the slots of the experts on the other
n_e - 1 devices of its `expert` axis; the `model` axis repeats the exchange
on each of its n_m devices (its replicas hold the same tokens):

  operands per device = 4 x layers x E * G/(n_d n_e) * C * D * bytes
  sent per device     = operands per device x (n_e - 1)/n_e
  sent in all         = sent per device x n_d n_e n_m

G, C and the dtype are those of training (`capacity_factor`); the eval step
moves half as much (no backward). The cross-check sums the sizes of the
operands of every all-to-all in the compiled step of one device (XLA's SPMD
program), which must equal "operands per device".
"""

import math
import re
import sys

import jax
import jax.numpy as jnp
from absl import app, flags

from moe_jax import data, routing, shapes, sharding, train
from moe_jax.models import TransformerConfig, TransformerLM

_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4}
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


def formula(config, mesh_shape) -> dict:
  """All-to-all bytes per training step of `config` on a mesh of
  `mesh_shape` (data, expert, model), from the formula above."""
  n_d, n_e, n_m = mesh_shape
  moe, model = config.model.moe, config.model
  tokens = config.data.batch_size * config.data.seq_len
  S = shapes.group_size_for(tokens, moe.group_size)
  G, E, D = tokens // S, moe.num_experts, model.d_model
  C = routing.compute_capacity(
    S,
    E,
    moe.top_k,
    moe.capacity_factor,
    moe.capacity_rule,
    moe.min_capacity,
  )
  layers = sum(
    (layer + 1) % model.moe_every == 0 for layer in range(model.num_layers)
  )
  elements = 4 * layers * E * G * C * D // (n_d * n_e)
  operands = elements * _DTYPE_BYTES[model.dtype]
  sent = operands * (n_e - 1) / n_e
  return {
    "layers": layers,
    "E": E,
    "G": G,
    "C": C,
    "D": D,
    "dtype": model.dtype,
    "operand_elements_per_device": elements,
    "operand_bytes_per_device": operands,
    "sent_bytes_per_device": sent,
    "sent_bytes_total": sent * n_d * n_e * n_m,
  }


def _instructions(hlo: str, opcode: str) -> list[str]:
  """The result types of every `opcode` instruction of an HLO text."""
  pattern = re.compile(rf"=\s*(.*?)\s+{re.escape(opcode)}\(")
  return [m.group(1) for m in map(pattern.search, hlo.splitlines()) if m]


def hlo_collectives(hlo: str | None) -> dict[str, int]:
  """How many of each collective the HLO text holds."""
  names = ("all-to-all", "all-gather", "all-reduce", "collective-permute")
  return {n: len(_instructions(hlo or "", n)) for n in names}


def hlo_all_to_all(hlo: str | None) -> dict:
  """Elements and bytes of the all-to-all operands of an HLO text (summed
  over all parts of a tuple all-to-all), and their dtypes."""
  elements, num_bytes, dtypes = 0, 0, set()
  for result in _instructions(hlo or "", "all-to-all"):
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", result):
      size = math.prod(int(d) for d in dims.split(",") if d)
      elements += size
      num_bytes += size * _BYTES[dtype]
      dtypes.add(dtype)
  return {"elements": elements, "bytes": num_bytes, "dtypes": sorted(dtypes)}


def compiled_step_hlo(config) -> str:
  """The optimized HLO of one device's train step on the mesh of
  `config.mesh` (nothing is allocated or run)."""
  layout = sharding.Layout.from_config(config)
  if layout.mesh is None:
    raise ValueError(
      f"mesh.shape={tuple(config.mesh.shape)} is one device: nothing moves."
    )
  model = TransformerLM(TransformerConfig.from_config(config, data.VOCAB_SIZE))
  tx, schedule = train.make_optimizer(config.optimizer, 10)
  B, L = config.data.batch_size, config.data.seq_len
  batch_sharding = layout.sharding(("batch",))
  batch = {
    k: jax.ShapeDtypeStruct((B, L), dtype, sharding=batch_sharding)
    for k, dtype in (
      ("inputs", jnp.int32),
      ("targets", jnp.int32),
      ("mask", jnp.float32),
    )
  }
  state = train.abstract_state(config, model, tx, batch, layout)
  step_fn = layout.jit_train_step(
    train.bind_train_step(config, model, tx, schedule),
    state,
  )
  return step_fn.lower(state, batch).compile().as_text()


def _mb(num_bytes: float) -> str:
  return f"{num_bytes / 1e6:.2f} MB"


def cost_line(config) -> str:
  """The communication cost line of `config`: the formula, cross-checked
  element for element against the compiled HLO (XLA:CPU widens bfloat16
  collectives to float32, so there the bytes differ and the count does not)."""
  shape = sharding.mesh_shape(config.mesh.shape, jax.device_count())
  f = formula(config, shape)
  measured = hlo_all_to_all(compiled_step_hlo(config))
  same = measured["elements"] == f["operand_elements_per_device"]
  return (
    f"all-to-all per step: {f['layers']} MoE layers x 4 buffers "
    f"[E={f['E']}, G={f['G']}, C={f['C']}, D={f['D']}] {f['dtype']}; "
    f"{_mb(f['operand_bytes_per_device'])} operands per device, "
    f"{_mb(f['sent_bytes_per_device'])} leave each device, "
    f"{_mb(f['sent_bytes_total'])} in all over {math.prod(shape)} devices; "
    f"compiled HLO ({jax.default_backend()}): {_mb(measured['bytes'])} "
    f"operands per device in {'/'.join(measured['dtypes'])} "
    f"({'elements match' if same else 'DIFFERS'})"
  )


def main(argv):
  del argv
  # --config (and its --config.a.b overrides) is moe_jax.train's flag.
  config = flags.FLAGS["config"].value
  if config is None:
    raise app.UsageError("--config is required.")
  line = cost_line(config)
  print(line)
  if "DIFFERS" in line:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
