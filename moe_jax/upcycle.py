"""Sparse upcycling (Komatsuzaki et al. 2022): an MoE model that starts from
a trained dense checkpoint.

Komatsuzaki et al. §3 ("Upcycling"): the MoE model has the dense model's
architecture with some MLP blocks replaced by MoE layers; every expert of a
layer starts as a copy of the dense MLP it replaces, the router starts
fresh, and every other parameter (embeddings, attention, norms, the MLPs
that stay dense) is copied as it is.

In moe_jax the dense run is the MoE config's own dense twin
(`--config.model.moe.num_experts=0`, e.g. configs/dense.py for
configs/switch_top1.py): the same blocks, where block l's FFN
`layer_l/mlp/{wi, wi_gate, wo}` of the MoE positions (`moe_every`) must be
as wide as one expert (dense_twin_dim = top_k * expert_dim, so top_k = 1,
or a dense run with that width). `upcycle` maps

  layer_l/moe/experts/w[e] = layer_l/mlp/w      for every expert e
  layer_l/moe/router/*, layer_l/moe/noise/*     the MoE model's own fresh
                                                initialisation (the run's
                                                seed)
  any other path p                              = dense p

and fails on any parameter it cannot place, either way round.

What the first forward pass then computes. In an MoE block every kept
(token, expert) pair runs the same FFN, so the layer returns
(sum of the token's kept gates) x FFN_dense(x):

* gates that sum to 1 (router="mixtral" or "top_k_renormalized" at top_k=1:
  softmax over the chosen logit = 1; "gshard" at top_k=2 with both kept),
  no pair dropped (dispatch="dropless", or a capacity factor of at least E),
  no router noise or jitter: the upcycled model computes exactly the dense
  model (tests/test_finetune.py checks the logits to 1e-5 in float32);
* Switch top-1 with the raw softmax gate p = max_e softmax(z)_e: each MoE
  block's FFN output is scaled by p, about 1/E from a fresh router
  (router_init_scale 0.1 makes the logits small), so the upcycled model
  starts away from the dense one and must relearn the scale; a token whose
  expert is full loses the FFN altogether (checked at the layer level);
* shared experts (DeepSeek-V3) are not upcycled: a ValueError.

The optimizer state is not carried over: Adam's moments, the step and the
learning-rate schedule (with its warmup) start fresh, as does the DeepSeek
router state. Use it through the trainer: configs/upcycle.py, or
`--config.init_from=<dense workdir> --config.init_upcycle=True
--config.init_restore='("params",)'` with any MoE config.
"""

from typing import Any

import numpy as np

# Parts of an MoE layer that start from the MoE model's own initialisation.
FRESH = ("router", "noise")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{"layer_01/moe/experts/wi": array} from nested dicts."""
  out = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(_flatten(value, f"{path}/"))
    else:
      out[path] = value
  return out


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    *parents, name = path.split("/")
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[name] = value
  return tree


def upcycle(dense_params: dict, moe_params: dict) -> dict:
  """The MoE parameters upcycled from `dense_params`.

  Args:
    dense_params: the dense model's "params" tree (nested dicts of arrays).
    moe_params: the MoE model's freshly initialised "params" (unboxed): the
      template of shapes, and the source of the routers' weights (so the
      router init is the model's own, drawn from the run's seed).

  Returns:
    A tree like `moe_params`: experts = copies of the dense FFN of their
    block (stacked on a leading expert axis), routers from `moe_params`,
    everything else from `dense_params`; NumPy arrays.

  Raises:
    ValueError: naming every MoE parameter without a dense counterpart of
      the right shape, and every dense parameter left unused.
  """
  dense, moe = _flatten(dense_params), _flatten(moe_params)
  out, used, problems = {}, set(), []
  for path, fresh in moe.items():
    parts = path.split("/")
    shape = tuple(np.shape(fresh))
    if "moe" in parts[:-1]:
      at = parts.index("moe")
      kind = parts[at + 1]
      if kind in FRESH:
        out[path] = np.asarray(fresh)
        continue
      if kind != "experts":
        problems.append(
          f"{path} (moe/{kind} has no dense counterpart; upcycling copies "
          "the dense FFN into the routed experts only)"
        )
        continue
      source = "/".join([*parts[:at], "mlp", *parts[at + 2 :]])
      value = dense.get(source)
      if value is None or tuple(np.shape(value)) != shape[1:]:
        got = "missing" if value is None else tuple(np.shape(value))
        problems.append(
          f"{path} {shape} needs {source} of shape {shape[1:]} in the dense "
          f"model ({got}; a dense FFN as wide as one expert)"
        )
        continue
      out[path] = np.broadcast_to(np.asarray(value), shape).copy()
      used.add(source)
      continue
    value = dense.get(path)
    if value is None or tuple(np.shape(value)) != shape:
      got = "missing" if value is None else tuple(np.shape(value))
      problems.append(f"{path} {shape} (dense: {got})")
      continue
    out[path] = np.asarray(value)
    used.add(path)
  unused = sorted(set(dense) - used)
  if unused:
    problems.append(
      f"dense parameters with no place in the MoE model: {', '.join(unused)}"
    )
  if problems:
    raise ValueError(
      "cannot upcycle the dense parameters into this MoE model: "
      + "; ".join(problems)
      + ". The MoE config must be the dense run's config with MoE layers "
      "(same d_model, layers, heads, mlp_dim, moe_every; expert_dim = the "
      "dense FFN width of the MoE blocks)."
    )
  return _unflatten(out)
