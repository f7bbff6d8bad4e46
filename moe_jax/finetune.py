"""Fine-tuning recipes: start from a checkpoint, freeze parameter groups,
give the router its own learning rate.

MoE models fine-tune worse than dense ones with a dense recipe (Switch,
Fedus et al. 2021, §4; ST-MoE, Zoph et al. 2022, §4): they overfit, and the
router can send the fine-tuning traffic to a few experts. The recipes here
are config keys (configs/base.py, configs/finetune.py):

* `init_from` + `init_restore`: a fresh run whose state starts from another
  run's checkpoint (`initialize`): the parameters always, the router state
  (DeepSeek bias) and the optimizer state when named; the step restarts at
  0, the data and the learning-rate schedule are the new run's. The
  source's tree must match the new model's exactly: every missing,
  unexpected or reshaped leaf is named in a `ConfigError`, never restored
  in part. `init_upcycle=True` instead converts a dense run
  (`moe_jax.upcycle`, Komatsuzaki et al. 2022).
* `optimizer.freeze`: parameter groups (`PARAM_GROUPS`) that get a zero
  update: no Adam step and no weight decay (ST-MoE §4 fine-tunes the
  non-MoE parameters only and finds it as good as all of them).
* `optimizer.router_learning_rate_multiplier` m: the router's parameters
  take the AdamW step at learning_rate(t) x m (no paper fixes a value; a
  knob to move the router slower than the rest).
* `model.moe.expert_dropout_rate` (Switch §4: 0.4 inside the experts, 0.1
  elsewhere) lives in `layers.Experts`.
* The auxiliary losses stay on while fine-tuning (ST-MoE §4 finds the
  balance loss harmless there): the new run's `config.loss.*_weight` apply
  from its step 0, whatever the source used.

`init_from` is read only when the new workdir holds no checkpoint: a
fine-tuning run that is stopped and relaunched resumes its own checkpoint
(the source may be gone by then). It stays a key of the run's config, so a
relaunch must name the same source (`writers.check_config_change`).
"""

import os
import re
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from moe_jax import errors, upcycle

# Parameter groups of `optimizer.freeze`, matched on the parameter's path
# in the "params" tree ("layer_01/moe/router/kernel"):
#   router      <layer>/moe/router/* (W_r and its bias) and <layer>/moe/
#               noise/* (the noisy routers' W_noise)
#   experts     <layer>/moe/experts/* (routed) and <layer>/moe/
#               shared_experts/* (DeepSeek shared experts)
#   non_expert  every parameter outside the MoE layers: embeddings,
#               attention, layer norms, the dense FFNs (<layer>/mlp/*)
#   embeddings  embed/embedding (tied with the output) and
#               position_embedding; a part of non_expert
PARAM_GROUPS = ("router", "experts", "non_expert", "embeddings")
# What `init_restore` may name.
RESTORABLE = ("params", "router_state", "opt_state")


def path_str(path) -> str:
  """ "layer_01/moe/router/kernel" from a jax key path (flax boxes add no
  part: their "value" attribute is skipped)."""
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      if key.name != "value":
        parts.append(key.name)
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    else:
      parts.append(str(getattr(key, "key", key)))
  return "/".join(parts)


def param_groups(path: str) -> frozenset[str]:
  """The groups of `PARAM_GROUPS` the parameter at `path` belongs to."""
  parts = path.split("/")
  after_moe = parts[parts.index("moe") + 1] if "moe" in parts[:-1] else None
  groups = set()
  if after_moe in ("router", "noise"):
    groups.add("router")
  elif after_moe in ("experts", "shared_experts"):
    groups.add("experts")
  elif after_moe is None:
    groups.add("non_expert")
    if parts[0] in ("embed", "position_embedding"):
      groups.add("embeddings")
  return frozenset(groups)


def check_config(config: ml_collections.ConfigDict):
  """Raises ConfigError on a bad fine-tuning key (init_from, init_restore,
  init_upcycle, optimizer.freeze, optimizer.router_learning_rate_multiplier)
  or data.domains (data.instruction_tasks with source="instructions"); the
  source itself is read at the fresh start."""
  init_from = config.get("init_from", "")
  restore = tuple(config.get("init_restore", ("params",)))
  upcycling = config.get("init_upcycle", False)
  if not isinstance(init_from, str):
    raise errors.ConfigError(
      f"init_from={init_from!r} must be a path string ('' = no source)."
    )
  bad = [p for p in restore if p not in RESTORABLE]
  if bad or "params" not in restore:
    raise errors.ConfigError(
      f"init_restore={restore!r} must name 'params' and any of "
      f"{RESTORABLE[1:]}; got {bad or 'no params'}."
    )
  if not isinstance(upcycling, bool):
    raise errors.ConfigError(f"init_upcycle={upcycling!r} must be a bool.")
  if upcycling and not init_from:
    raise errors.ConfigError(
      "init_upcycle=True needs init_from: the dense run to upcycle."
    )
  if upcycling and "opt_state" in restore:
    raise errors.ConfigError(
      "init_upcycle=True with 'opt_state' in init_restore: the dense run's "
      "Adam moments have no counterpart for the experts and the router; an "
      "upcycled run starts a fresh optimizer (init_restore=('params',))."
    )
  check_optimizer(config.optimizer)
  source = config.data.get("source", "embedded")
  if source == "embedded":
    from moe_jax.data import corpus  # pylint: disable=g-import-not-at-top

    with errors.config_errors():
      corpus.canonical_domains(config.data.domains)
  elif source == "instructions":
    from moe_jax.data import instructions  # pylint: disable=g-import-not-at-top

    with errors.config_errors():
      instructions.canonical_tasks(config.data.get("instruction_tasks", ()))


def check_optimizer(opt: ml_collections.ConfigDict):
  """Raises ConfigError on a bad optimizer.freeze or router multiplier."""
  freeze = opt.get("freeze", ())
  if isinstance(freeze, str) or not all(f in PARAM_GROUPS for f in freeze):
    raise errors.ConfigError(
      f"optimizer.freeze={freeze!r} must be a tuple of parameter groups "
      f"among {PARAM_GROUPS} (see moe_jax.finetune.PARAM_GROUPS)."
    )
  m = opt.get("router_learning_rate_multiplier", 1.0)
  if isinstance(m, bool) or not isinstance(m, (int, float)) or not m >= 0:
    raise errors.ConfigError(
      f"optimizer.router_learning_rate_multiplier={m!r} must be a number "
      ">= 0 (1.0: the router learns at the common rate)."
    )
  if "router" in freeze and m != 1.0:
    raise errors.ConfigError(
      f"optimizer.freeze={tuple(freeze)!r} freezes the router, so "
      f"router_learning_rate_multiplier={m} has nothing to scale; leave it "
      "at 1.0."
    )


def trains_all_alike(opt: ml_collections.ConfigDict) -> bool:
  """True when no group is frozen and the router has the common rate: the
  plain AdamW chain (and its optimizer-state tree) applies."""
  return not opt.get("freeze", ()) and (
    opt.get("router_learning_rate_multiplier", 1.0) == 1.0
  )


def _labels_fn(freeze: tuple[str, ...], router_rate: bool) -> Callable:
  """params -> a tree of "frozen" | "router" | "default" labels; raises
  ConfigError when a frozen group matches no parameter or every parameter
  is frozen."""

  def labels(params):
    used = set()

    def label(path, _):
      groups = param_groups(path_str(path))
      used.update(groups)
      if groups & set(freeze):
        return "frozen"
      return "router" if router_rate and "router" in groups else "default"

    tree = jax.tree_util.tree_map_with_path(label, params)
    unmatched = [f for f in freeze if f not in used]
    if unmatched:
      raise errors.ConfigError(
        f"optimizer.freeze={freeze!r}: {unmatched} match no parameter of "
        "this model (a dense model has no router or experts; hash and "
        "random routing have no router)."
      )
    if all(x == "frozen" for x in jax.tree.leaves(tree)):
      raise errors.ConfigError(
        f"optimizer.freeze={freeze!r} freezes every parameter: nothing "
        "would train."
      )
    return tree

  return labels


def grouped_optimizer(
  opt: ml_collections.ConfigDict,
  clip: optax.GradientTransformation,
  adamw: Callable[[optax.Schedule], optax.GradientTransformation],
  schedule: optax.Schedule,
) -> optax.GradientTransformation:
  """`clip` then AdamW, with the frozen groups zeroed and the router on its
  own schedule.

  The frozen parameters' gradients are zeroed first, so they do not count
  in the clipped global norm; their update is then exactly zero
  (`optax.set_to_zero`: no Adam step, no weight decay, no optimizer state).
  The router's parameters get AdamW at learning rate m * schedule(t) (the
  same betas, eps and weight decay: AdamW's decay is scaled by the learning
  rate, so it too is m times); every other parameter the common AdamW.

  Args:
    opt: config.optimizer (freeze, router_learning_rate_multiplier).
    clip: the global-norm clipping transformation.
    adamw: learning-rate schedule -> the AdamW transformation.
    schedule: the common learning-rate schedule.
  """
  check_optimizer(opt)
  freeze = tuple(opt.get("freeze", ()))
  m = float(opt.get("router_learning_rate_multiplier", 1.0))
  labels = _labels_fn(freeze, router_rate=m != 1.0)

  def frozen_mask(params):
    return jax.tree.map(lambda x: x == "frozen", labels(params))

  return optax.chain(
    optax.masked(optax.set_to_zero(), frozen_mask),
    clip,
    optax.multi_transform(
      {
        "default": adamw(schedule),
        "router": adamw(lambda count: m * schedule(count)),
        "frozen": optax.set_to_zero(),
      },
      labels,
    ),
  )


# ---- init_from ------------------------------------------------------------


def _steps(checkpoints_dir: str) -> list[int]:
  """The finished checkpoint steps of a checkpoints/ folder (orbax writes
  a step under a temporary name and renames it when done)."""
  if not os.path.isdir(checkpoints_dir):
    return []
  return sorted(
    int(name)
    for name in os.listdir(checkpoints_dir)
    if re.fullmatch(r"\d+", name)
    and os.path.isdir(os.path.join(checkpoints_dir, name, "state"))
  )


def has_checkpoint(checkpoints_dir: str) -> bool:
  """Whether a run's checkpoints/ folder holds a finished checkpoint."""
  return bool(_steps(checkpoints_dir))


def resolve_source(init_from: str) -> tuple[str, int]:
  """(step directory, step) of `init_from`: a workdir (its newest
  checkpoint), its checkpoints/ folder (the newest) or a step directory
  <workdir>/checkpoints/<step>."""
  path = os.path.abspath(os.path.expanduser(init_from))
  name = os.path.basename(path)
  if re.fullmatch(r"\d+", name) and os.path.isdir(os.path.join(path, "state")):
    return path, int(name)
  for folder in (os.path.join(path, "checkpoints"), path):
    steps = _steps(folder)
    if steps:
      return os.path.join(folder, str(steps[-1])), steps[-1]
  raise errors.ConfigError(
    f"init_from={init_from!r} holds no checkpoint: name a workdir with a "
    "checkpoints/ folder, or a step directory <workdir>/checkpoints/<step> "
    "(with a state/ folder)."
  )


def _flat(tree) -> dict[str, Any]:
  """{"layer_01/moe/router/kernel": leaf} for a template (tuples,
  NamedTuples, flax boxes) and for orbax's template-free restore of the
  same tree (lists, dicts), alike."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {path_str(path): leaf for path, leaf in leaves}


def _describe(names: list[str]) -> str:
  shown = ", ".join(names[:8])
  return shown + (f" and {len(names) - 8} more" if len(names) > 8 else "")


def match_tree(source, template, what: str, origin: str):
  """`template`'s tree filled with the leaves of `source` (same paths,
  shapes and dtypes), each placed like the template's leaf.

  Raises:
    ConfigError: naming every path missing from `source`, present only in
      `source`, or of another shape or dtype. Nothing is restored in part.
  """
  want, have = _flat(template), _flat(source)
  missing = sorted(set(want) - set(have))
  extra = sorted(set(have) - set(want))
  differ = [
    f"{n} {tuple(np.shape(have[n]))} {np.asarray(have[n]).dtype} in the "
    f"source, {tuple(want[n].shape)} {want[n].dtype} here"
    for n in sorted(set(want) & set(have))
    if tuple(np.shape(have[n])) != tuple(want[n].shape)
    or np.asarray(have[n]).dtype != want[n].dtype
  ]
  if missing or extra or differ:
    problems = []
    if missing:
      problems.append(f"missing from the source: {_describe(missing)}")
    if extra:
      problems.append(f"not in this model: {_describe(extra)}")
    if differ:
      problems.append(f"different shape or dtype: {_describe(differ)}")
    raise errors.ConfigError(
      f"init_from: the {what} of {origin} do not match this run's: "
      f"{'; '.join(problems)}. The architecture (and, for opt_state, the "
      "optimizer) must be the same; nothing was restored."
    )
  leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
  values = []
  for path, leaf in leaves:
    value = have[path_str(path)]
    sharding = getattr(leaf, "sharding", None)
    values.append(jax.device_put(value, sharding) if sharding else value)
  return jax.tree_util.tree_unflatten(treedef, values)


def initialize(config: ml_collections.ConfigDict, state):
  """The fresh `state` (a train.TrainState at step 0) with the parts of
  `config.init_restore` taken from the checkpoint of `config.init_from`
  (or, with `config.init_upcycle`, the params upcycled from it).

  Returns:
    (state, info): the step stays 0; info = {"source": step directory,
    "source_step", "restored": parts, "upcycled": bool}, for run_info.json.

  Raises:
    ConfigError: no checkpoint at init_from, or a tree that does not match
      (naming the paths).
  """
  step_dir, step = resolve_source(config.init_from)
  origin = f"{step_dir} (step {step})"
  checkpointer = ocp.StandardCheckpointer()
  try:
    saved = checkpointer.restore(os.path.join(step_dir, "state"))
  finally:
    checkpointer.close()
  parts = tuple(config.init_restore)
  upcycling = bool(config.get("init_upcycle", False))
  restored = {}
  for part in parts:
    if part not in saved:
      raise errors.ConfigError(
        f"init_from: {origin} holds no {part!r}; it holds {sorted(saved)}."
      )
    template = getattr(state, part)
    if part == "params" and upcycling:
      with errors.config_errors():
        dense = jax.tree.map(np.asarray, saved["params"])
        value = upcycle.upcycle(dense, jax.device_get(template))
      restored[part] = match_tree(value, template, part, origin)
    else:
      restored[part] = match_tree(saved[part] or {}, template, part, origin)
  info = {
    "source": step_dir,
    "source_step": step,
    "restored": list(parts),
    "upcycled": upcycling,
  }
  return state.replace(**restored), info
