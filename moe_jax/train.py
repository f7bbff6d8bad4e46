"""Trains an MoE (or dense) language model from a config file.

  python -m moe_jax.train --config=configs/switch_top1.py \
      --workdir=runs/switch --config.model.moe.num_experts=16

A workdir belongs to one run of one config; its guarantees (each checked by
the test named; see also the README's "Guarantees"):

* Resuming. Re-running the same command with the same --workdir resumes
  from the latest checkpoint ("resuming from step N (checkpoint <path>)")
  and continues exactly as an uninterrupted run would: the state, the input
  pipeline's position and the metric log are restored together, and every
  step's randomness is derived from (seed, step)
  (test_resumed_run_equals_uninterrupted_run). Without a checkpoint the run
  "starts fresh": the rows a stopped launch logged are dropped and
  TensorBoard hides its events (test_killed_before_the_first_checkpoint_
  starts_clean).
* Damaged checkpoints. The newest checkpoint that passes orbax's commit
  marker, a readable restore and its saved fingerprint is restored; each
  newer bad one is named on one stderr line ("warning: skipped the bad
  checkpoint <path> (moved to <path>.corrupt): <why>") and moved aside,
  never deleted; a killed write's tmp directory is removed with a warning.
  With no good checkpoint, `checkpoint.NoGoodCheckpointError` names the
  directory and the ways out (test_a_bad_latest_checkpoint_resumes_from_
  the_previous_good_one, test_sigkill_at_drawn_steps_and_during_a_write_
  resumes_exactly).
* One config. A launch whose config differs from <workdir>/config.json is
  refused before anything is written or compiled, naming each key with both
  values (test_a_different_config_is_refused_before_anything_is_written).
  `--allow_config_change=KEY,...` lets a launch change keys of
  `writers.SAFE_CHANGES` (train.num_steps, the logging / evaluation /
  checkpoint intervals and kept checkpoint steps, the mesh); a longer
  train.num_steps recomputes the learning-rate schedule for the new length
  from the step it takes effect on. Each launch after the first and each
  change is appended to <workdir>/history.jsonl; run_info.json stays the
  first launch's (test_extending_a_run_recomputes_the_schedule_and_records_it).
* Divergence. A non-finite loss term (lm_loss, an aux/<name> loss, the
  gradient norm) or train state stops the run with `errors.DivergenceError`
  (a FloatingPointError: "training diverged at step N: non-finite ..."), a
  {"step": N, "event": "diverged", "terms": [...]} row in metrics.jsonl,
  and a newest checkpoint from before step N: the steps that checkpoint (or
  evaluate) read their own loss before saving (test_divergence_names_step_
  and_terms_and_keeps_a_finite_checkpoint). With optimizer.on_nonfinite =
  "skip" such a step is skipped instead (`optax.apply_if_finite`): params,
  optimizer state and router state stay bit-identical, the step counter and
  the data move on, a {"step": N, "event": "skipped_nonfinite", "terms":
  [...]} row is logged and train/skipped_nonfinite_steps counts them; more
  than optimizer.max_consecutive_nonfinite_skips in a row stop the run as
  above, at the first step past the limit (test_skip_nonfinite_*).
* Fine-tuning. With config.init_from a fresh run starts from another run's
  checkpoint (`finetune.initialize`: all of config.init_restore or, on any
  mismatch, a ConfigError naming the paths before anything is written;
  recorded in run_info.json); once the run has a checkpoint it resumes
  that instead (test_init_from_starts_at_the_source_params_and_resumes_
  its_own in tests/test_finetune.py).
* Errors. A configuration mistake (`errors.ConfigError`: a bad value, an
  unknown key, a config file that does not load, a refused workdir, a
  workdir that is a file or not writable or whose disk has too little free
  space for the run's checkpoints, a TFDS dataset that is not prepared) is
  one line on stderr, `error: <message>`, and exit status 2; other
  exceptions keep their traceback (test_command_line_config_mistakes_
  are_one_line). `check_config` validates the whole config before anything
  is read or compiled (test_a_drawn_config_is_refused_before_compiling_or_
  trains).
* Full disk. A disk that fills up mid-run (ENOSPC while a checkpoint or
  the metric log is written) stops the run with `errors.DiskFullError`
  (one line, exit status 1) naming the newest checkpoint on disk; the
  re-run of the same command resumes from the newest good one
  (test_a_disk_that_fills_mid_run_is_one_clear_error).

The progress bar counts steps whose metrics were read back and leaves
evaluation and checkpoint time out of its rate; the final summary prints
the train-only tokens/s (`reproduction.train_tokens_per_second`).

The workdir receives config.json, run_info.json (git revision, versions),
history.jsonl (later launches), metrics.jsonl, TensorBoard events,
checkpoints/ (every train.checkpoint_every steps and the last one; the
newest train.max_checkpoints_to_keep of them and those of
train.keep_checkpoint_steps stay) and summary.png (unless
train.summary_plot is False).

On several devices, `--config.mesh.shape=(data,expert,model)` shards the run
(`moe_jax.sharding`); with `--distributed` (and on one machine
`--coordinator_address --num_processes --process_id`) every process runs the
same command and jax.distributed joins them. See the README's "Distributed
training".
"""

import contextlib
import functools
import os
import shutil
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from moe_jax import (
  checkpoint,
  data,
  errors,
  finetune,
  metrics,
  plotting,
  reproduction,
  sharding,
  writers,
)
from moe_jax.checkpoint import Checkpointer
from moe_jax.models import TransformerConfig, TransformerLM


@flax.struct.dataclass
class TrainState:
  """Everything a step changes; checkpointed as one pytree.

  Attributes:
    step: int32 number of steps taken.
    params: the model's trained parameters (Flax collection "params").
    opt_state: the optimizer's state of `params`.
    router_state: the Flax collection "router_state": variables the MoE
      layers update themselves, without gradient or optimizer (the
      DeepSeek loss-free balancing bias `{layer: {"moe": {"bias": [E]}}}`);
      {} for every other model.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  router_state: Any


# optimizer.on_nonfinite: what a step with a non-finite loss term or
# gradient norm does (see `make_optimizer` and `train_step`).
NONFINITE_POLICIES = ("stop", "skip")


def nonfinite_skip_limit(opt: ml_collections.ConfigDict) -> int | None:
  """optimizer.max_consecutive_nonfinite_skips when optimizer.on_nonfinite
  is "skip", None when it is "stop" (configs older than the keys: "stop").

  Raises:
    ConfigError: on_nonfinite is not one of NONFINITE_POLICIES, or the
      limit is not an integer >= 1.
  """
  policy = opt.get("on_nonfinite", "stop")
  if policy not in NONFINITE_POLICIES:
    raise errors.ConfigError(
      f"optimizer.on_nonfinite={policy!r}; allowed: "
      f"{', '.join(repr(p) for p in NONFINITE_POLICIES)}."
    )
  limit = opt.get("max_consecutive_nonfinite_skips", 5)
  if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
    raise errors.ConfigError(
      f"optimizer.max_consecutive_nonfinite_skips={limit!r} must be an "
      "integer >= 1."
    )
  return limit if policy == "skip" else None


def _is_number(value) -> bool:
  return not isinstance(value, bool) and isinstance(value, (int, float))


# optimizer.<key>: (whether a value is allowed, what is allowed), numbers.
_OPTIMIZER_RANGES = {
  "learning_rate": (lambda v: 0 < v < float("inf"), "a finite number > 0"),
  "grad_clip_norm": (lambda v: 0 < v < float("inf"), "a finite number > 0"),
  "weight_decay": (lambda v: 0 <= v < float("inf"), "a finite number >= 0"),
  "final_learning_rate_fraction": (lambda v: 0 <= v <= 1, "in [0, 1]"),
  "b1": (lambda v: 0 <= v < 1, "in [0, 1)"),
  "b2": (lambda v: 0 <= v < 1, "in [0, 1)"),
}


def _check_optimizer_numbers(opt: ml_collections.ConfigDict):
  """Raises ConfigError unless the numbers of config.optimizer are in
  `_OPTIMIZER_RANGES` and warmup_steps is an integer >= 0."""
  for key, (allowed, what) in _OPTIMIZER_RANGES.items():
    value = opt[key]
    if not (_is_number(value) and allowed(value)):
      raise errors.ConfigError(f"optimizer.{key}={value!r} must be {what}.")
  warmup = opt.warmup_steps
  if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
    raise errors.ConfigError(
      f"optimizer.warmup_steps={warmup!r} must be an integer >= 0."
    )


def make_optimizer(opt: ml_collections.ConfigDict, num_steps: int):
  """AdamW with linear warmup, then cosine/linear decay (or constant);
  with optimizer.freeze or optimizer.router_learning_rate_multiplier, the
  groups of `finetune.grouped_optimizer`. With optimizer.on_nonfinite =
  "skip", all of it wrapped in `optax.apply_if_finite` (its state, and so
  the checkpoint's opt_state, gains the counters of non-finite steps)."""
  _check_optimizer_numbers(opt)
  max_skips = nonfinite_skip_limit(opt)
  peak, warmup = opt.learning_rate, opt.warmup_steps
  end = peak * opt.final_learning_rate_fraction
  decay_steps = max(num_steps - warmup, 1)
  decays = {
    "cosine": optax.cosine_decay_schedule(peak, decay_steps, end / peak),
    "linear": optax.linear_schedule(peak, end, decay_steps),
    "constant": optax.constant_schedule(peak),
  }
  if opt.schedule not in decays:
    raise errors.ConfigError(
      f"unknown schedule={opt.schedule!r}; allowed: {sorted(decays)}."
    )
  schedule = optax.join_schedules(
    [optax.linear_schedule(0.0, peak, warmup), decays[opt.schedule]], [warmup]
  )

  def decay_mask(params):  # no weight decay on biases and norm scales
    return jax.tree.map(lambda p: p.ndim >= 2, params)

  def adamw(learning_rate):
    return optax.adamw(
      learning_rate,
      opt.b1,
      opt.b2,
      weight_decay=opt.weight_decay,
      mask=decay_mask,
    )

  clip = optax.clip_by_global_norm(opt.grad_clip_norm)
  if finetune.trains_all_alike(opt):
    tx = optax.chain(clip, adamw(schedule))
  else:  # frozen groups or a router learning rate (optimizer.freeze, ...)
    tx = finetune.grouped_optimizer(opt, clip, adamw, schedule)
  if max_skips is not None:
    tx = optax.apply_if_finite(tx, max_consecutive_errors=max_skips)
  return tx, schedule


# How the per-layer auxiliary losses are combined (config.loss.layer_reduction).
LAYER_REDUCTIONS = {"sum": jnp.sum, "mean": jnp.mean}


def _layer_values(collection) -> dict[str, jax.Array]:
  """{"layer_01/name": v} from a sown {layer: {"moe": {name: (v,)}}}."""
  out = {}
  for layer, modules in collection.items():
    for name, values in modules["moe"].items():
      out[f"{layer}/{name}"] = values[0]
  return out


def aux_loss_weight(loss_config: ml_collections.ConfigDict, name: str):
  """The coefficient of the sown auxiliary loss `name`: config.loss.<name>
  with "_weight" appended, or with "_loss" replaced by "_weight"
  (load_balancing_loss -> load_balancing_weight). A loss without a weight is
  an error, never silently dropped."""
  keys = (f"{name}_weight", f"{name.removesuffix('_loss')}_weight")
  for key in keys:
    if key in loss_config:
      return loss_config[key]
  raise errors.ConfigError(
    f"the model sows the auxiliary loss {name!r} but config.loss has no "
    f"weight for it; add config.loss.{keys[0]}."
  )


def compute_loss(
  params,
  batch,
  rngs,
  *,
  model,
  loss_config,
  deterministic,
  router_state=None,
):
  """LM cross-entropy + weight x each auxiliary loss, and what to log.

  Returns:
    (total loss, (logged metrics, router_state)): in training the
    router_state as the layers updated it from this batch (the DeepSeek
    bias), else the one given.
  """
  variables = {"params": params}
  mutable = ["aux_loss", "moe_metrics"]
  if router_state:
    variables["router_state"] = router_state
    if not deterministic:
      mutable.append("router_state")
  logits_BLV, sown = model.apply(
    variables,
    batch["inputs"],
    batch["mask"] > 0,
    deterministic=deterministic,
    rngs=rngs,
    mutable=mutable,
  )
  mask_BL = batch["mask"].astype(jnp.float32)
  token_losses_BL = optax.softmax_cross_entropy_with_integer_labels(
    logits_BLV, batch["targets"]
  )
  lm_loss = jnp.sum(token_losses_BL * mask_BL) / jnp.maximum(mask_BL.sum(), 1)
  aux = _layer_values(sown.get("aux_loss", {}))
  reduce = LAYER_REDUCTIONS[loss_config.layer_reduction]
  terms, total = {}, lm_loss
  for name in sorted({key.split("/", 1)[1] for key in aux}):
    per_layer = [v for k, v in aux.items() if k.split("/", 1)[1] == name]
    terms[name] = reduce(jnp.stack(per_layer))
    total = total + aux_loss_weight(loss_config, name) * terms[name]
  logged = {"loss": total, "lm_loss": lm_loss}
  logged.update({f"aux/{k}": v for k, v in terms.items()})
  logged.update(
    {
      f"moe/{k}": v
      for k, v in _layer_values(sown.get("moe_metrics", {})).items()
    }
  )
  return total, (logged, sown.get("router_state", router_state or {}))


def train_step(
  state, batch, *, model, tx, schedule, loss_config, seed, max_skips=None
):
  """One optimizer step; randomness derived from (seed, step). The
  router_state (DeepSeek bias) moves after the step, from this batch's load,
  outside the optimizer; this step routed with the bias of steps < t.

  With `max_skips` (optimizer.on_nonfinite="skip"; `tx` is then wrapped in
  `optax.apply_if_finite(inner, max_skips)`), a step whose loss terms
  (loss, lm_loss, aux/<name>) or gradient norm are not finite is skipped:
  its gradients are made NaN, so that apply_if_finite, which looks at the
  gradients only, rejects the update and keeps the inner optimizer state,
  and the params and router_state are selected from before the step
  (jnp.where: bit-identical, no host sync). state.step and the data still
  move on. The (max_skips + 1)-th such step in a row is applied, as
  apply_if_finite does; the trainer stops the run at it
  (`_SkippedSteps`). Logged then: skipped_nonfinite_steps (so far, this
  step included) and consecutive_nonfinite_steps (0 after a finite step);
  learning_rate is the schedule at the count of applied steps, which the
  optimizer's schedule counts by (it stays behind state.step by the number
  of skipped steps).
  """
  step_key = jax.random.fold_in(jax.random.key(seed), state.step)
  names = ("jitter", "routing", "dropout")
  rngs = dict(zip(names, jax.random.split(step_key, len(names))))
  grad_fn = jax.value_and_grad(
    functools.partial(
      compute_loss, model=model, loss_config=loss_config, deterministic=False
    ),
    has_aux=True,
  )
  (_, (logged, router_state)), grads = grad_fn(
    state.params, batch, rngs, router_state=state.router_state
  )
  logged["grad_norm"] = optax.tree.norm(grads)
  if max_skips is None:
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    logged["learning_rate"] = schedule(state.step)
    new_state = state.replace(
      step=state.step + 1,
      params=params,
      opt_state=opt_state,
      router_state=router_state,
    )
    return new_state, logged

  finite = jnp.all(
    jnp.stack([jnp.isfinite(logged[name]) for name in _loss_term_names(logged)])
  )
  grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.nan), grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  skipped = ~opt_state.last_finite & (opt_state.notfinite_count <= max_skips)

  def unless_skipped(new, old):
    return jax.tree.map(lambda n, o: jnp.where(skipped, o, n), new, old)

  logged["learning_rate"] = schedule(
    state.step - _skipped_so_far(state.opt_state, max_skips)
  )
  logged["skipped_nonfinite_steps"] = _skipped_so_far(opt_state, max_skips)
  logged["consecutive_nonfinite_steps"] = opt_state.notfinite_count
  new_state = state.replace(
    step=state.step + 1,
    params=unless_skipped(
      optax.apply_updates(state.params, updates), state.params
    ),
    opt_state=opt_state,
    router_state=unless_skipped(router_state, state.router_state),
  )
  return new_state, logged


def _loss_term_names(names) -> list[str]:
  """Those of the metric `names` whose non-finite value is a divergence:
  loss, lm_loss, aux/<name> (the z-loss is aux/router_z_loss), grad_norm."""
  aux = sorted(k for k in names if k.startswith("aux/"))
  return ["loss", "lm_loss", *aux, "grad_norm"]


def _skipped_so_far(opt_state: optax.ApplyIfFiniteState, max_skips: int):
  """The steps apply_if_finite rejected: its count of non-finite steps
  less those past max_skips in a row, which it applied."""
  applied = jnp.maximum(opt_state.notfinite_count - max_skips, 0)
  return opt_state.total_notfinite - applied


def bind_train_step(config, model, tx, schedule):
  """`train_step` as a function of (state, batch) only, for the jit of
  the trainer, the benchmarks and the tests."""
  return functools.partial(
    train_step,
    model=model,
    tx=tx,
    schedule=schedule,
    loss_config=config.loss,
    seed=config.seed,
    max_skips=nonfinite_skip_limit(config.optimizer),
  )


def eval_step(variables, batch, *, model, loss_config):
  """Deterministic loss and routing metrics of one batch (eval capacity);
  `variables` = {"params": ..., "router_state": ...} (see `eval_variables`).
  """
  _, (logged, _) = compute_loss(
    variables["params"],
    batch,
    {},
    model=model,
    loss_config=loss_config,
    deterministic=True,
    router_state=variables["router_state"],
  )
  return logged


def eval_variables(state: TrainState) -> dict[str, Any]:
  """What evaluation reads of the train state."""
  return {"params": state.params, "router_state": state.router_state}


def evaluate(eval_fn, variables, batches) -> dict[str, Any]:
  """The eval metrics over the fixed validation batches: the mean of each
  over the batches, except the expert counts, which are summed, and MaxVio,
  reported both as the mean of the batches' (`max_violation_batch`) and of
  the summed counts (`max_violation_global`); see `metrics.pool_batches`."""
  per_batch = [jax.device_get(eval_fn(variables, b)) for b in batches]
  return metrics.pool_batches(per_batch)


def _host_metrics(prefix: str, logged: dict) -> dict[str, Any]:
  out = {}
  for key, value in jax.device_get(logged).items():
    value = np.asarray(value)
    out[f"{prefix}/{key}"] = value.tolist() if value.ndim else float(value)
  return out


def _initializer(config, model, tx, batch):
  """() -> fresh TrainState, parameters boxed with their logical axis names
  (params rng: fold_in(seed, -1)); only the batch's shape is used."""
  shape = np.shape(batch["inputs"])

  def init():
    rng = jax.random.fold_in(jax.random.key(config.seed), 2**31 - 1)
    variables = model.init(rng, jnp.zeros(shape, jnp.int32))
    params = variables["params"]
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      router_state=variables.get("router_state", {}),
    )

  return init


def init_state(config, model, tx, batch, layout=None) -> TrainState:
  """Fresh parameters and optimizer state, placed by `layout` (default: one
  device): on a mesh each array is created already sharded."""
  layout = layout or sharding.Layout()
  return layout.init(_initializer(config, model, tx, batch))


def abstract_state(config, model, tx, batch, layout=None) -> TrainState:
  """`init_state` as ShapeDtypeStructs with the shardings of `layout`: a
  checkpoint restore template for any layout, that allocates nothing."""
  layout = layout or sharding.Layout()
  return layout.abstract_init(_initializer(config, model, tx, batch))


def _open_data(config):
  """The train iterator and the eval batches. Every process reads the same
  global batches; in a multi-process run process 0 prepares the corpus
  first, while the others wait (they would race to write it)."""
  first = jax.process_index() == 0
  if not first:
    multihost_utils.sync_global_devices("moe_jax: corpus prepared")
  train_iter = data.create_train_iterator(config.data, seed=config.seed)
  eval_batches = data.create_eval_batches(config.data)
  if first and jax.process_count() > 1:
    multihost_utils.sync_global_devices("moe_jax: corpus prepared")
  return train_iter, eval_batches


def check_train_config(train_config: ml_collections.ConfigDict):
  """Raises ConfigError unless the loop's counts of config.train are >= 1
  and each of train.keep_checkpoint_steps is a step of the run (1 ..
  num_steps)."""
  for key in (
    "num_steps",
    "log_every",
    "eval_every",
    "checkpoint_every",
    "max_checkpoints_to_keep",
  ):
    value = train_config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise errors.ConfigError(
        f"train.{key}={value!r} must be an integer >= 1."
      )
  keep = train_config.get("keep_checkpoint_steps", ())
  num_steps = train_config.num_steps
  if not isinstance(keep, (tuple, list)) or not all(
    isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= num_steps
    for s in keep
  ):
    raise errors.ConfigError(
      f"train.keep_checkpoint_steps={keep!r} must be a tuple of integer "
      f"steps in 1 .. train.num_steps={num_steps}."
    )


class CheckedConfig(NamedTuple):
  """What `check_config` builds from a valid config."""

  layout: sharding.Layout
  model_config: TransformerConfig
  tx: optax.GradientTransformation
  schedule: optax.Schedule


def check_config(config: ml_collections.ConfigDict) -> CheckedConfig:
  """Validates every key of a run config, and their combinations, before
  anything is written, read or compiled (no device computation).

  Checks config.train (`check_train_config`), config.loss
  (`check_loss_config`), config.data (`data.check_config`: source, sizes,
  seq_len against the corpus records), the fine-tuning keys and
  config.optimizer (`finetune.check_config`), config.mesh against the
  devices and the model (`sharding.Layout.from_config`), config.model
  (`TransformerConfig` and `layers.MoeConfig`: router, top_k against the
  experts, capacity factors and rules, dispatch, dtypes, drop orders, ...),
  the groups against both batches (`check_groups`) and the schedule.

  Raises:
    errors.ConfigError: naming the first bad key, its value and what is
      allowed.
  """
  with errors.config_errors():
    check_train_config(config.train)
    check_loss_config(config.loss)
    data.check_config(config.data)
    finetune.check_config(config)
    layout = sharding.Layout.from_config(config)
    model_config = TransformerConfig.from_config(config, data.VOCAB_SIZE)
    check_groups(config)
    tx, schedule = make_optimizer(config.optimizer, config.train.num_steps)
  return CheckedConfig(layout, model_config, tx, schedule)


def check_loss_config(loss_config: ml_collections.ConfigDict):
  """Raises ConfigError unless loss.layer_reduction is one of
  `LAYER_REDUCTIONS` and every loss.<name>_weight is a finite number >= 0
  (a negative weight would reward imbalance). The load-balancing loss's
  name is checked with the model (`layers.MoeConfig`)."""
  reduction = loss_config.get("layer_reduction", "sum")
  if reduction not in LAYER_REDUCTIONS:
    raise errors.ConfigError(
      f"unknown loss.layer_reduction={reduction!r}; allowed: "
      f"{sorted(LAYER_REDUCTIONS)}."
    )
  for key in sorted(k for k in loss_config.keys() if k.endswith("_weight")):
    value = loss_config[key]
    if (
      isinstance(value, bool)
      or not isinstance(value, (int, float))
      or not 0 <= value < float("inf")
    ):
      raise errors.ConfigError(
        f"loss.{key}={value!r} must be a finite number >= 0 (0: off)."
      )


def check_groups(config: ml_collections.ConfigDict):
  """Raises ConfigError unless model.moe.group_size S cuts the tokens of a
  training batch and of an evaluation batch (batch_size x seq_len) into
  whole groups: S divides them, or S >= them (one group of all tokens,
  `shapes.group_size_for`). A dense model (num_experts 0) has no groups."""
  moe, data_config = config.model.moe, config.data
  if moe.num_experts <= 0:
    return
  L, S = data_config.seq_len, moe.group_size
  for key in ("batch_size", "eval_batch_size"):
    tokens = data_config[key] * L
    if S < tokens and tokens % S:
      raise errors.ConfigError(
        f"model.moe.group_size={S} does not divide the {tokens} tokens of a "
        f"batch (data.{key}={data_config[key]} x data.seq_len={L}); choose "
        f"a group_size that divides them, or one >= {tokens} (one group)."
      )


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  allow_config_change: Sequence[str] | str = (),
):
  """Runs (or resumes) training in `workdir`; returns the final metrics.

  Args:
    config: the run's config.
    workdir: the run's directory. If it holds a config.json, `config` must
      equal it (`writers.check_config_change`), except in the keys named in
      `allow_config_change`.
    allow_config_change: keys of `writers.SAFE_CHANGES` this launch may
      change (a sequence or a comma-separated string).

  Raises:
    errors.ConfigError: a bad config value, or a config the workdir's run
      cannot continue with; nothing was written then.
    errors.DivergenceError: a non-finite loss or train state at some step
      (a FloatingPointError; the message reads "... at step N: ..."). The
      newest checkpoint is from before that step.
  """
  # ---- The config's validity and the workdir's contract, before anything
  # is written or compiled.
  num_steps = config.train.num_steps
  layout, model_config, tx, schedule = check_config(config)
  changes = writers.check_config_change(workdir, config, allow_config_change)
  for change in changes:
    if change.key == "optimizer.on_nonfinite" and change.added:
      if change.new != "stop":
        raise errors.ConfigError(
          f"optimizer.on_nonfinite={change.new!r} in {workdir}, whose run "
          "began without the key (as 'stop'): its checkpoints' optimizer "
          "state holds no counters of non-finite steps. Start the run in a "
          "new workdir (or keep 'stop')."
        )
  writers.check_workdir(workdir)
  model = TransformerLM(model_config)
  shape_only = {
    "inputs": np.zeros(
      (config.data.eval_batch_size, config.data.seq_len), np.int32
    )
  }
  check_disk_space(
    workdir,
    config.train,
    state_bytes(abstract_state(config, model, tx, shape_only, layout)),
  )

  # ---- Data, model, optimizer, devices (one, or the mesh of config.mesh).
  # The data's mistakes (a TFDS dataset that is not prepared, a split that
  # holds no windows...) are the config's: ConfigError names the path.
  with errors.config_errors():
    train_iter, eval_batches = _open_data(config)
  state = init_state(config, model, tx, eval_batches[0], layout)
  state, init_info = _initialize_from(config, workdir, state)
  step_fn = layout.jit_train_step(
    bind_train_step(config, model, tx, schedule),
    state,
  )
  eval_fn = layout.jit_eval_step(
    functools.partial(eval_step, model=model, loss_config=config.loss),
    eval_variables(state),
  )
  eval_batches = [layout.put_batch(b) for b in eval_batches]

  # ---- Fresh start or resume from the latest checkpoint. In a multi-process
  # run every process saves its shards; only process 0 writes the logs.
  ckpt = Checkpointer(
    f"{workdir}/checkpoints",
    max_to_keep=config.train.max_checkpoints_to_keep,
    save_interval_steps=config.train.checkpoint_every,
    keep_steps=config.train.get("keep_checkpoint_steps", ()),
  )
  for path in ckpt.unfinished_writes:
    _warn(
      f"removed {path}: an unfinished checkpoint write (a launch was "
      "stopped while saving)"
    )
  if ckpt.latest_step() is not None:
    state, data_state, _, bad = ckpt.restore_newest_good(state)
    for b in bad:
      where = f"moved to {b.moved_to}" if b.moved_to else "left in place"
      _warn(
        f"skipped the bad checkpoint {b.path} ({where}): {b.reason}",
        limit=600,
      )
    train_iter.set_state(data_state)
  start = int(state.step)
  if start > num_steps:
    ckpt.close()
    raise errors.ConfigError(
      f"train.num_steps={num_steps} is below step {start} of the checkpoint "
      f"in {ckpt.directory}: a run cannot be cut back past its checkpoint."
    )
  main_process = jax.process_index() == 0
  writer = writers.NullWriter()
  if main_process:
    writers.write_run_info(
      workdir, config, step=start, changes=changes, extra=init_info
    )
    writer = writers.MetricWriter(workdir)
  # Rows logged after `start` (all of them when there is no checkpoint)
  # belong to a launch that was stopped: they are logged again.
  dropped = writer.truncate_after(start)
  if start:
    print(f"resuming from step {start} (checkpoint {ckpt.step_path(start)})")
  else:
    print(f"starting fresh at step 0 in {workdir} (no checkpoint)")
  if init_info:
    print(_describe_init(init_info["init_from"]))
  if dropped:
    print(f"dropped {dropped} metric rows of steps > {start} (logged again)")
  for change in changes:
    print(f"config change from step {start}: {_describe(change)}")
  with errors.config_errors():
    baseline = data.unigram_baseline(config.data)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  print(
    f"parameters: {n_params:,}; steps {start} -> {num_steps}; "
    f"unigram baseline {baseline:.3f} nats/token; {layout.describe()}"
  )

  # ---- Train; step t's metrics are read after step t+1 is dispatched,
  # except at the steps that evaluate or checkpoint: these first check that
  # step t's loss terms (and, before a save, the state) are finite, so a
  # diverged state is never evaluated or saved. On any exit (a crash,
  # Ctrl-C) the checkpoint in flight is finished.
  pending, last_eval, tick = None, {}, time.perf_counter()
  max_skips = nonfinite_skip_limit(config.optimizer)
  skips = None if max_skips is None else _SkippedSteps(max_skips)
  # The bar counts steps whose metrics were read back, i.e. finished on the
  # device, not steps dispatched (the host runs up to log_every steps
  # ahead). It redraws at each update (mininterval=0), so that `unpause`
  # after an evaluation or a save drops exactly their time from its rate:
  # the ETA is that of the training steps alone.
  bar = tqdm.tqdm(
    initial=start,
    total=num_steps,
    disable=not (config.train.progress_bar and main_process),
    desc="train",
    mininterval=0,
    miniters=1,
  )
  # A full disk (ENOSPC) while a checkpoint or the metric log is written
  # becomes one DiskFullError naming the newest checkpoint on disk.
  try:
    try:
      for step in range(start, num_steps):
        state, logged = step_fn(state, layout.put_batch(next(train_iter)))
        done = step + 1
        if skips is not None:
          skips.add(done, logged)
        if pending is not None:
          _report(writer, bar, ckpt, *pending, skips)
          pending = None
        evaluating = done % config.train.eval_every == 0 or done == num_steps
        saving = ckpt.should_save(done, force=done == num_steps)
        if done % config.train.log_every == 0 or done == num_steps:
          pending = (done, logged, time.perf_counter() - tick)
          tick = time.perf_counter()
        if evaluating or saving:
          if pending is not None:
            _report(writer, bar, ckpt, *pending, skips)
            pending = None
          else:
            host = _host_metrics("train", logged)
            _check_finite(writer, ckpt, done, host, skips)
            bar.update(done - bar.n)
        if saving:
          _check_state_finite(writer, ckpt, done, state)
        if evaluating:
          last_eval = _host_metrics(
            "eval", evaluate(eval_fn, eval_variables(state), eval_batches)
          )
          last_eval["eval/unigram_baseline"] = baseline
          writer.write(done, last_eval)
        if saving:
          ckpt.save(done, state, train_iter.get_state(), force=True)
        if evaluating or saving:
          bar.unpause()
      if pending is not None:
        _report(writer, bar, ckpt, *pending, skips)
    finally:
      bar.close()
      try:
        ckpt.close()
      finally:
        writer.close()
  except Exception as e:
    if not errors.is_disk_full(e):
      raise
    raise errors.DiskFullError(_disk_full_message(workdir, ckpt, e)) from e

  # ---- Final summary.
  if main_process:
    tokens_per_second = reproduction.train_tokens_per_second(
      writers.read_metrics(workdir), config.to_dict()
    )
    plot_path = (
      plotting.plot_run(workdir)
      if config.train.summary_plot
      else "none (train.summary_plot=False)"
    )
    _print_summary(last_eval, baseline, plot_path, tokens_per_second)
  return last_eval


# Room left for what a run writes besides its checkpoints (metrics.jsonl,
# TensorBoard events, summary.png, orbax's metadata), in bytes.
DISK_MARGIN_BYTES = 64 * 2**20


def state_bytes(state) -> int:
  """Bytes of the arrays of a train state (concrete or ShapeDtypeStructs):
  about what one checkpoint of it takes on disk (orbax stores the arrays
  uncompressed)."""
  return sum(
    int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
    for x in jax.tree.leaves(state)
  )


def _existing_ancestor(path: str) -> str:
  path = os.path.abspath(path)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return path


def _directory_bytes(path: str) -> int:
  """Bytes of the files under `path`, leaving out `*.corrupt` checkpoints
  (set aside, never deleted: no room for the run)."""
  total = 0
  for root, dirs, files in os.walk(path):
    dirs[:] = [d for d in dirs if ".corrupt" not in d]
    for name in files:
      with contextlib.suppress(OSError):
        total += os.lstat(os.path.join(root, name)).st_size
  return total


def check_disk_space(
  workdir: str, train_config: ml_collections.ConfigDict, checkpoint_bytes: int
):
  """Raises ConfigError when the workdir's disk cannot hold the run.

  The run keeps train.max_checkpoints_to_keep checkpoints plus those of
  train.keep_checkpoint_steps, and writes one more before orbax deletes
  the oldest, each `checkpoint_bytes`; plus DISK_MARGIN_BYTES for the
  logs. The checkpoints already in <workdir>/checkpoints count as room (a
  resumed run replaces them), those moved aside as `*.corrupt` do not.
  """
  keep_steps = len(set(train_config.get("keep_checkpoint_steps", ())))
  copies = train_config.max_checkpoints_to_keep + keep_steps + 1
  needed = copies * checkpoint_bytes + DISK_MARGIN_BYTES
  free = shutil.disk_usage(_existing_ancestor(workdir)).free
  reusable = _directory_bytes(os.path.join(workdir, "checkpoints"))
  if free + reusable >= needed:
    return
  held = f" (and {reusable:,} in its checkpoints)" if reusable else ""
  raise errors.ConfigError(
    f"not enough disk space for --workdir={workdir}: {free:,} bytes free"
    f"{held}, but the run needs about {needed:,}: {copies} checkpoints "
    f"(train.max_checkpoints_to_keep={train_config.max_checkpoints_to_keep}"
    f" + {keep_steps} of train.keep_checkpoint_steps + 1 being written) x "
    f"{checkpoint_bytes:,} bytes (parameters and optimizer state) + "
    f"{DISK_MARGIN_BYTES:,} for the logs. Free some space, choose another "
    "--workdir, or lower train.max_checkpoints_to_keep or "
    "train.keep_checkpoint_steps."
  )


def _disk_full_message(workdir: str, ckpt: Checkpointer, error) -> str:
  """What DiskFullError says: the write that failed, the newest checkpoint
  on disk, and that a re-run resumes from the newest good one."""
  steps = checkpoint.finished_steps(ckpt.directory)
  if steps:
    resume = (
      f"the newest checkpoint on disk is step {steps[-1]} "
      f"({ckpt.step_path(steps[-1])}); once there is space, re-run the same "
      "command: it resumes from the newest good checkpoint"
    )
  else:
    resume = (
      "no checkpoint was saved yet; once there is space, re-run the same "
      "command: it starts fresh"
    )
  cause = errors.one_line(f"{type(error).__name__}: {error}")[:300]
  return (
    f"the disk of --workdir={workdir} is full (No space left on device) "
    f"while writing the run's checkpoint or metric log; {resume}. "
    f"({cause})"
  )


def _warn(message: str, limit: int = 400):
  """One line on stderr: "warning: <message>" (cut to `limit` characters)."""
  line = errors.one_line(message)
  if len(line) > limit:
    line = line[: limit - 3] + "..."
  print(f"warning: {line}", file=sys.stderr, flush=True)


def _initialize_from(config, workdir: str, state: TrainState):
  """`state`, started from config.init_from when the workdir holds no
  checkpoint of its own (`finetune.initialize`), and {"init_from": what
  was restored} for run_info.json (else None)."""
  if not config.get("init_from") or finetune.has_checkpoint(
    f"{workdir}/checkpoints"
  ):
    return state, None
  state, info = finetune.initialize(config, state)
  return state, {"init_from": info}


def _describe_init(info: dict) -> str:
  how = "upcycled from the dense" if info["upcycled"] else "initialised from"
  return (
    f"{how} checkpoint {info['source']} (its step {info['source_step']}): "
    f"{', '.join(info['restored'])}; this run counts from step 0"
  )


def _describe(change: writers.ConfigChange) -> str:
  if change.added:
    return f"{change.key} = {change.new!r} (a key new to moe_jax)"
  if change.removed:
    return f"{change.key} dropped (moe_jax no longer has it)"
  note = ""
  if change.key == "train.num_steps":
    note = " (the learning-rate schedule is recomputed for the new length)"
  return f"{change.key}: {change.old!r} -> {change.new!r}{note}"


def _report(writer, bar, ckpt, step, logged, seconds, skips=None):
  host = _host_metrics("train", logged)
  _check_finite(writer, ckpt, step, host, skips)
  host["train/seconds_since_last_log"] = seconds
  writer.write(step, host)
  bar.set_postfix(loss=f"{host['train/lm_loss']:.3f}", refresh=False)
  bar.update(step - bar.n)


def _diverged(writer, ckpt, step: int, terms: list[str], what: str):
  """Logs the divergence event and raises DivergenceError."""
  writer.write_event(step, "diverged", terms=terms)
  ckpt.wait_until_finished()
  latest = ckpt.latest_step()
  kept = (
    f"the newest checkpoint is step {latest} ({ckpt.step_path(latest)})"
    if latest is not None
    else "no checkpoint was saved"
  )
  raise errors.DivergenceError(
    f"training diverged at step {step}: non-finite {what}; {kept}.",
    step,
    terms,
  )


def _nonfinite_terms(host: dict) -> list[str]:
  """The non-finite loss terms of `host` (the "train/" metrics of a step):
  lm_loss, each aux/<name> loss, grad_norm; the total loss only when no
  term is."""
  names = [n for n in _loss_term_names(_host_names(host)) if n != "loss"]
  bad = [n for n in names if not np.isfinite(host[f"train/{n}"])]
  if not bad and not np.isfinite(host["train/loss"]):
    bad = ["loss"]
  return bad


def _host_names(host: dict) -> list[str]:
  """The names of `host`'s "train/" metrics without the prefix."""
  return [k.removeprefix("train/") for k in host if k.startswith("train/")]


def _values(host: dict, terms: list[str]) -> str:
  return ", ".join(f"{n}={host[f'train/{n}']}" for n in terms)


def _check_finite(writer, ckpt, step: int, host: dict, skips=None):
  """Raises DivergenceError naming each non-finite loss term of `host` (the
  "train/" metrics of `step`; see `_nonfinite_terms`). With `skips`
  (optimizer.on_nonfinite="skip") the steps up to `step` are first checked
  by `_SkippedSteps.check`: a skipped `step` is no divergence."""
  if skips is not None and skips.check(writer, ckpt, step):
    return
  bad = _nonfinite_terms(host)
  if bad:
    _diverged(writer, ckpt, step, bad, _values(host, bad))


class _SkippedSteps:
  """The host's side of optimizer.on_nonfinite="skip", without a host sync
  per step: it keeps each step's metrics (device arrays) until the next
  step the loop reads back anyway (a logging, evaluation or checkpoint
  step), then reads their consecutive_nonfinite_steps together. Each
  skipped step gets a {"step": N, "event": "skipped_nonfinite", "terms":
  [...]} row; the first step past `max_skips` in a row stops the run as a
  divergence at that step. Every step up to a checkpoint is checked before
  it is saved, so a resumed run logs the same rows."""

  def __init__(self, max_skips: int):
    self.max_skips = max_skips
    self._unread: list[tuple[int, dict]] = []

  def add(self, step: int, logged: dict):
    """Keeps the metrics of `step` (the state.step after it) unread."""
    self._unread.append((step, logged))

  def check(self, writer, ckpt, upto: int) -> bool:
    """Logs the skipped steps <= `upto` and raises DivergenceError at a step
    past the limit; returns whether step `upto` was skipped."""
    steps = [(s, m) for s, m in self._unread if s <= upto]
    self._unread = [(s, m) for s, m in self._unread if s > upto]
    runs = jax.device_get([m["consecutive_nonfinite_steps"] for _, m in steps])
    skipped = set()
    for (step, logged), run in zip(steps, runs):
      if run == 0:
        continue
      host = _host_metrics("train", logged)
      terms = _nonfinite_terms(host)
      if run > self.max_skips:
        _diverged(
          writer,
          ckpt,
          step,
          terms,
          f"{_values(host, terms)} ({int(run)} non-finite steps in a row, "
          "more than optimizer.max_consecutive_nonfinite_skips="
          f"{self.max_skips})",
        )
      writer.write_event(step, "skipped_nonfinite", terms=terms)
      skipped.add(step)
    return upto in skipped


@jax.jit
def _finite_parts(state: TrainState) -> dict[str, jax.Array]:
  def finite(tree):
    leaves = [
      jnp.all(jnp.isfinite(x))
      for x in jax.tree.leaves(tree)
      if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)

  return {
    name: finite(getattr(state, name))
    for name in ("params", "opt_state", "router_state")
  }


def _check_state_finite(writer, ckpt, step: int, state: TrainState):
  """Raises DivergenceError when the state about to be saved holds a NaN or
  an infinity (a finite loss does not prove it: a NaN in an expert that no
  token reached leaves the loss finite)."""
  parts = jax.device_get(_finite_parts(state))
  bad = [name for name, ok in parts.items() if not ok]
  if bad:
    _diverged(writer, ckpt, step, bad, f"train state ({', '.join(bad)})")


def _print_summary(last_eval, baseline, plot_path, tokens_per_second=None):
  """The final eval loss against the unigram baseline, the routing health
  metrics, and the training throughput: `reproduction.
  train_tokens_per_second` of the metric log (the median over logging
  intervals, without the first, which compiles, and without those holding
  an evaluation; "n/a" when no interval qualifies)."""
  if not last_eval:
    print(f"nothing left to train; plot: {plot_path}")
    return
  loss = last_eval["eval/lm_loss"]
  print(
    f"\nvalidation loss {loss:.4f} nats/token "
    f"({loss / np.log(2):.3f} bits/byte), unigram baseline "
    f"{baseline:.4f}: {loss / baseline:.1%} of it"
  )
  for key in sorted(last_eval):
    name = key.rpartition("/")[2]
    if name in ("drop_fraction", "router_entropy") or (
      name.startswith("max_violation")
    ):
      print(f"  {key:48s} {last_eval[key]:.4f}")
  rate = "n/a" if tokens_per_second is None else f"{tokens_per_second:,.0f}"
  print(
    f"train tokens/s: {rate} (median over logging intervals, without the "
    "first and those with an evaluation)"
  )
  print(f"plot: {plot_path}")


_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Path to a config file in configs/.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where to write the run.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_list(
  "allow_config_change",
  [],
  "Config keys this launch may change in a workdir that holds a run of "
  "another value, e.g. train.num_steps to extend it (see "
  "moe_jax.writers.SAFE_CHANGES); recorded in <workdir>/history.jsonl.",
)
_DISTRIBUTED = flags.DEFINE_bool(
  "distributed",
  False,
  "Join a multi-process run with jax.distributed.initialize(); on TPU pods "
  "and SLURM clusters it finds the other processes by itself.",
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "With --distributed: host:port of process 0."
)
_NUM_PROCESSES = flags.DEFINE_integer(
  "num_processes", None, "With --distributed: how many processes."
)
_PROCESS_ID = flags.DEFINE_integer(
  "process_id", None, "With --distributed: this process's index."
)


def _exit_config_error(message: str):
  """A mistake in the command: one line on stderr, exit status 2."""
  print(f"error: {errors.one_line(message)}", file=sys.stderr)
  sys.exit(2)


def _unknown_key_message(error: BaseException, argv: list[str]) -> str:
  """What ml_collections' KeyError / AttributeError for a misspelled
  --config.<path> override says, readable: its message is the repr of a
  KeyError's ("'routr'\\nDid you mean \\"router\\"..."), unwrapped here."""
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  text = str(error.args[0]) if error.args else str(error)
  name, _, hint = text.partition("\n")
  name = name.strip("'\"")
  flag = next(
    (
      arg.split("=", 1)[0]
      for arg in argv
      if arg.startswith("--config.") and name in arg.split("=", 1)[0].split(".")
    ),
    None,
  )
  where = f" in {flag}" if flag else ""
  hint = f"; {hint.strip()[0].lower()}{hint.strip()[1:]}" if hint else ""
  return f"unknown config key {name!r}{where}{hint}"


def _from_ml_collections(error: BaseException) -> bool:
  frames = traceback.extract_tb(error.__traceback__)
  return bool(frames) and "ml_collections" in frames[-1].filename


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with the mistakes of a command line (a bad flag
  value, an unknown config key, a config file that does not load) turned
  into one-line errors."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _exit_config_error(str(e))
  except (KeyError, AttributeError) as e:
    if not _from_ml_collections(e):
      raise
    _exit_config_error(_unknown_key_message(e, argv))
  except OSError as e:  # overrides of a config file that failed to load
    paths = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    _exit_config_error(_config_load_message(e, paths[-1] if paths else "?"))


def _config_load_message(error: BaseException, path: str) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  reason = lines[-1] if lines else type(error).__name__
  return f"cannot load --config={path}: {reason}"


def _load_config() -> ml_collections.ConfigDict:
  config = _CONFIG.value
  if isinstance(config, ml_collections.ConfigDict):
    return config
  path = config_flags.get_config_filename(flags.FLAGS["config"])
  try:  # a config file that failed to load raises on any attribute
    config.get("train")
  except OSError as e:
    raise errors.ConfigError(_config_load_message(e, path)) from e
  raise errors.ConfigError(
    f"--config={path}: get_config() returned {type(config).__name__}, not a "
    "ConfigDict."
  )


def main(argv):
  del argv
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError("--config and --workdir are required.")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  try:
    config = _load_config()
    if _DISTRIBUTED.value:
      jax.distributed.initialize(
        _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value
      )
    train_and_evaluate(
      config, _WORKDIR.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value
    )
  except errors.ConfigError as e:
    _exit_config_error(str(e))
  except errors.DiskFullError as e:
    print(f"error: {errors.one_line(str(e))}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
