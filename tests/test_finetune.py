"""Tests of the fine-tuning recipes: init_from, data.domains, expert dropout,
frozen parameter groups, the router learning rate (moe_jax.finetune)."""

import json
import shutil
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from moe_jax import data, errors, finetune, train
from moe_jax.checkpoint import Checkpointer
from moe_jax.layers import MoeConfig, MoeLayer
from moe_jax.models import TransformerConfig, TransformerLM

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))
import switch_top1  # noqa: E402
import tiny  # noqa: E402


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


def tiny_config(data_dir, **train_overrides):
  return tiny.shrink(switch_top1.get_config(), data_dir, **train_overrides)


def _flat(tree):
  return {
    finetune.path_str(path): np.asarray(leaf)
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _build(config, batch):
  model = TransformerLM(TransformerConfig.from_config(config, data.VOCAB_SIZE))
  tx, schedule = train.make_optimizer(config.optimizer, config.train.num_steps)
  return model, tx, schedule, train.init_state(config, model, tx, batch)


def _checkpoint_state(workdir, config, step=None):
  """The train state saved in `workdir` (restored with `config`'s
  template)."""
  batch = data.create_eval_batches(config.data)[0]
  *_, template = _build(config, batch)
  with Checkpointer(
    f"{workdir}/checkpoints", max_to_keep=5, save_interval_steps=1
  ) as ckpt:
    state, _ = ckpt.restore(template, step)
  return state


@pytest.fixture(scope="module")
def source_run(tmp_path_factory, data_dir):
  """A tiny Switch run of 3 steps: (workdir, config)."""
  workdir = tmp_path_factory.mktemp("source")
  config = tiny_config(data_dir, num_steps=3, eval_every=3, checkpoint_every=3)
  train.train_and_evaluate(config, str(workdir))
  return workdir, config


# ---- parameter groups ------------------------------------------------------


def test_param_groups_by_path():
  # Every kind of parameter path the models have, with its groups by hand.
  expected = {
    "embed/embedding": {"non_expert", "embeddings"},
    "position_embedding": {"non_expert", "embeddings"},
    "layer_00/attention/query/kernel": {"non_expert"},
    "layer_00/mlp/wi": {"non_expert"},
    "layer_01/ffn_norm/scale": {"non_expert"},
    "final_norm/bias": {"non_expert"},
    "layer_01/moe/router/kernel": {"router"},
    "layer_01/moe/router/bias": {"router"},
    "layer_01/moe/noise/kernel": {"router"},
    "layer_01/moe/experts/wi_gate": {"experts"},
    "layer_01/moe/shared_experts/wo": {"experts"},
  }
  for path, groups in expected.items():
    assert finetune.param_groups(path) == groups, path


def _opt_config(**kw):
  opt = ml_collections.ConfigDict(
    {
      "learning_rate": 1e-2,
      "warmup_steps": 0,
      "schedule": "constant",
      "final_learning_rate_fraction": 1.0,
      "weight_decay": 0.1,
      "b1": 0.9,
      "b2": 0.98,
      "grad_clip_norm": 1e6,
      "freeze": (),
      "router_learning_rate_multiplier": 1.0,
    }
  )
  opt.update(kw)
  return opt


def _synthetic_params():
  """A params tree with the model's path names, random values."""
  rng = np.random.default_rng(0)

  def w(*shape):
    return jnp.asarray(rng.normal(size=shape), jnp.float32)

  return {
    "embed": {"embedding": w(5, 3)},
    "position_embedding": w(4, 3),
    "layer_00": {"mlp": {"wi": w(3, 6)}, "ffn_norm": {"scale": w(3)}},
    "layer_01": {
      "moe": {
        "router": {"kernel": w(3, 2)},
        "experts": {"wi": w(2, 3, 6)},
      }
    },
  }


@pytest.mark.parametrize(
  "freeze, frozen_paths",
  [
    (("router",), {"layer_01/moe/router/kernel"}),
    (("embeddings",), {"embed/embedding", "position_embedding"}),
    (("experts",), {"layer_01/moe/experts/wi"}),
    (
      ("non_expert",),
      {
        "embed/embedding",
        "position_embedding",
        "layer_00/mlp/wi",
        "layer_00/ffn_norm/scale",
      },
    ),
  ],
)
def test_frozen_groups_get_exactly_zero_updates(freeze, frozen_paths):
  params = _synthetic_params()
  tx, _ = train.make_optimizer(_opt_config(freeze=freeze), 10)
  state = tx.init(params)
  rng = np.random.default_rng(1)
  current = params
  for _ in range(3):
    grads = jax.tree.map(
      lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), current
    )
    updates, state = tx.update(grads, state, current)
    current = jax.tree.map(lambda p, u: p + u, current, updates)
  before, after = _flat(params), _flat(current)
  for path in before:
    if path in frozen_paths:  # no Adam step and no weight decay either
      np.testing.assert_array_equal(after[path], before[path], err_msg=path)
    else:
      assert not np.allclose(after[path], before[path]), path


def test_router_learning_rate_multiplier_scales_the_first_adam_step():
  """AdamW's first step (Kingma & Ba 2015 Alg. 1, Loshchilov & Hutter 2019
  decoupled decay): m_hat = g, v_hat = g^2, so the update is
  -lr (g / (|g| + eps) + wd p), wd only on matrices (ndim >= 2)."""
  params = _synthetic_params()
  rng = np.random.default_rng(2)
  grads = jax.tree.map(
    lambda p: jnp.asarray(rng.normal(size=p.shape) * 1e-3, jnp.float32), params
  )
  lr, wd, eps = 1e-2, 0.1, 1e-8
  updates = {}
  for m in (1.0, 0.5):
    opt = _opt_config(router_learning_rate_multiplier=m)
    tx, _ = train.make_optimizer(opt, 10)
    updates[m] = _flat(tx.update(grads, tx.init(params), params)[0])
  g, p = _flat(grads), _flat(params)
  for path in g:
    g64, p64 = g[path].astype(np.float64), p[path].astype(np.float64)
    decay = wd * p64 if p64.ndim >= 2 else 0.0
    step = -lr * (g64 / (np.abs(g64) + eps) + decay)
    router = path == "layer_01/moe/router/kernel"
    np.testing.assert_allclose(updates[1.0][path], step, rtol=1e-5, atol=1e-9)
    scale = 0.5 if router else 1.0
    np.testing.assert_allclose(
      updates[0.5][path], scale * step, rtol=1e-5, atol=1e-9, err_msg=path
    )


def test_optimizer_config_mistakes_are_config_errors():
  cases = [
    (dict(freeze=("routers",)), "routers"),
    (dict(router_learning_rate_multiplier=-1.0), ">= 0"),
    (dict(freeze=("router",), router_learning_rate_multiplier=0.5), "nothing"),
  ]
  for overrides, fragment in cases:
    with pytest.raises(errors.ConfigError, match=fragment):
      train.make_optimizer(_opt_config(**overrides), 10)
  # Freezing every parameter, or a group this model lacks, is refused when
  # the optimizer first sees the parameters.
  params = {"embed": {"embedding": jnp.ones((2, 2))}}
  tx, _ = train.make_optimizer(_opt_config(freeze=("embeddings",)), 10)
  with pytest.raises(errors.ConfigError, match="every parameter"):
    tx.init(params)
  tx, _ = train.make_optimizer(_opt_config(freeze=("router",)), 10)
  with pytest.raises(errors.ConfigError, match="match no parameter"):
    tx.init({"embed": {"embedding": jnp.ones((2, 2))}, "b": jnp.ones(2)})


def test_freezing_non_expert_in_the_real_train_step(data_dir):
  """A few real steps with freeze=("non_expert",) and weight decay: the
  non-MoE parameters are bit-identical, the router and experts moved."""
  config = tiny_config(data_dir, num_steps=3)
  config.optimizer.freeze = ("non_expert",)
  config.optimizer.weight_decay = 0.5
  config.optimizer.warmup_steps = 1
  batches = data.create_train_iterator(config.data, seed=0)
  first = next(batches)
  model, tx, schedule, state = _build(config, first)
  step = jax.jit(train.bind_train_step(config, model, tx, schedule))
  start = _flat(state.params)
  for _ in range(3):
    state, _ = step(state, next(batches))
  end = _flat(state.params)
  moving = {p for p in start if "/moe/" in p}
  assert moving == {
    "layer_01/moe/router/kernel",
    "layer_01/moe/experts/wi",
    "layer_01/moe/experts/wo",
  }
  for path in start:
    if path in moving:
      assert not np.allclose(end[path], start[path]), path
    else:
      np.testing.assert_array_equal(end[path], start[path], err_msg=path)


# ---- expert dropout --------------------------------------------------------


@pytest.mark.parametrize("dispatch", ["einsum", "indices", "dropless"])
def test_expert_dropout_drops_hidden_units_in_training_only(dispatch):
  """Evaluation does not depend on the rate. In training, each token's
  output is (h * keep / (1 - r)) wo_e with h = act(x wi_e) and keep a 0/1
  vector: solved for `keep` from the output (wo_e has independent rows,
  F <= D), every entry must be 0 or 1, about r of them 0."""
  E, D, F, r = 2, 16, 8, 0.5
  rng = np.random.default_rng(0)
  x_BLD = jnp.asarray(rng.normal(size=(4, 16, D)), jnp.float32)

  def layer(rate):
    return MoeLayer(
      MoeConfig(
        num_experts=E,
        top_k=1,
        router="mixtral",  # gate 1 at top-1: y = FFN_e(x)
        expert_dim=F,
        group_size=16,
        capacity_factor=float(E),  # C = S: nothing dropped
        eval_capacity_factor=float(E),
        dispatch=dispatch,
        activation="relu",
        expert_dropout_rate=rate,
      )
    )

  variables = layer(0.0).init(jax.random.key(0), x_BLD, deterministic=True)
  outputs = {}
  for rate in (0.0, r):
    for deterministic in (True, False):
      y, sown = layer(rate).apply(
        variables,
        x_BLD,
        deterministic=deterministic,
        rngs={"dropout": jax.random.key(7)},
        mutable=["intermediates", "aux_loss", "moe_metrics"],
      )
      outputs[rate, deterministic] = (np.asarray(y), sown)
  np.testing.assert_array_equal(outputs[r, True][0], outputs[0.0, True][0])
  np.testing.assert_array_equal(outputs[0.0, False][0], outputs[0.0, True][0])
  y_train, sown = outputs[r, False]
  assert not np.allclose(y_train, outputs[0.0, True][0])
  # Solve y_t = (h_t * keep_t / (1 - r)) wo_e for keep_t, in float64.
  experts = nn.unbox(variables["params"])["experts"]
  wi_EDF = np.asarray(experts["wi"], np.float64)
  wo_EFD = np.asarray(experts["wo"], np.float64)
  index_BL = np.asarray(sown["intermediates"]["expert_index"][0])[..., 0]
  x = np.asarray(x_BLD, np.float64)
  keeps, hidden = [], []
  for b in range(x.shape[0]):
    for t in range(x.shape[1]):
      e = index_BL[b, t]
      h_F = np.maximum(x[b, t] @ wi_EDF[e], 0.0)
      scaled_F = np.linalg.lstsq(wo_EFD[e].T, y_train[b, t], rcond=None)[0]
      alive = h_F > 1e-3
      keeps.append(scaled_F[alive] * (1 - r) / h_F[alive])
      hidden.append(alive.sum())
  keep = np.concatenate(keeps)
  assert len(keep) > 100
  np.testing.assert_allclose(keep, np.round(keep), atol=1e-3)
  assert set(np.round(keep)) == {0.0, 1.0}
  assert 0.35 < 1 - keep.mean() < 0.65  # about r = 0.5 dropped


def test_expert_dropout_rate_is_validated():
  with pytest.raises(errors.ConfigError, match="expert_dropout_rate"):
    MoeConfig(expert_dropout_rate=1.0)


# ---- data.domains ----------------------------------------------------------


@pytest.mark.parametrize("domain", ["code", "prose"])
def test_domains_restrict_every_batch(data_dir, domain):
  config = tiny_config(data_dir)
  config.data.domains = (domain,)
  config.data.validation_fraction = 0.3  # the 300 kB of code: ~30 files
  index = data.DOMAINS.index(domain)
  batches = data.create_train_iterator(config.data, seed=0)
  for _ in range(5):
    assert set(next(batches)["domain"].tolist()) == {index}
  for batch in data.create_eval_batches(config.data):
    assert set(batch["domain"].tolist()) == {index}


def test_unknown_domain_is_a_config_error(data_dir, tmp_path):
  config = tiny_config(data_dir)
  config.data.domains = ("code", "poetry")
  with pytest.raises(errors.ConfigError, match="'poetry'.*'code', 'prose'"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


# ---- init_from -------------------------------------------------------------


def test_init_from_starts_at_the_source_params_and_resumes_its_own(
  source_run, data_dir, tmp_path, capsys
):
  """A 1-step fine-tuning run on code only: its step 0 learning rate is 0
  (linear warmup from 0), so its step-1 checkpoint holds exactly the
  source's final params. Relaunched after the source is deleted, it resumes
  its own checkpoint."""
  source, source_config = source_run
  config = tiny_config(data_dir, num_steps=1, eval_every=1, checkpoint_every=1)
  config.init_from = str(source)
  config.data.domains = ("code",)
  config.data.validation_fraction = 0.3  # the 300 kB of code: ~30 files
  config.model.moe.expert_dropout_rate = 0.4
  config.optimizer.router_learning_rate_multiplier = 0.5
  workdir = tmp_path / "ft"
  train.train_and_evaluate(config, str(workdir))
  assert "initialised from" in capsys.readouterr().out
  want = _flat(_checkpoint_state(source, source_config).params)
  got = _checkpoint_state(workdir, config, step=1)
  assert int(got.step) == 1  # counted from 0 in the new run
  got = _flat(got.params)
  assert want.keys() == got.keys()
  for path in want:
    np.testing.assert_array_equal(got[path], want[path], err_msg=path)
  info = json.loads((workdir / "run_info.json").read_text())["init_from"]
  assert info["source"] == str(source / "checkpoints" / "3")
  assert info["source_step"] == 3
  assert info["restored"] == ["params", "router_state"]
  assert info["upcycled"] is False
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["init_from"] == str(source)
  # The source is not read again once the run has its own checkpoint.
  moved = tmp_path / "gone"
  shutil.move(str(source), str(moved))
  try:
    config.train.num_steps = 2
    train.train_and_evaluate(
      config, str(workdir), allow_config_change="train.num_steps"
    )
    assert "resuming from step 1" in capsys.readouterr().out
  finally:
    shutil.move(str(moved), str(source))


def test_init_from_restores_the_optimizer_state_when_asked(
  source_run, data_dir
):
  source, source_config = source_run
  config = tiny_config(data_dir, num_steps=3)
  config.init_from = str(source / "checkpoints" / "3")  # a step directory
  config.init_restore = ("params", "opt_state")
  batch = data.create_eval_batches(config.data)[0]
  *_, fresh = _build(config, batch)
  state, info = finetune.initialize(config, fresh)
  assert int(state.step) == 0 and info["source_step"] == 3
  want = _flat(_checkpoint_state(source, source_config).opt_state)
  got = _flat(state.opt_state)
  assert want.keys() == got.keys() and any("mu" in k for k in got)
  for path in want:
    np.testing.assert_array_equal(got[path], want[path], err_msg=path)
  # Without opt_state, the moments stay the fresh zeros.
  config.init_restore = ("params",)
  state, _ = finetune.initialize(config, fresh)
  mu = [v for k, v in _flat(state.opt_state).items() if "/mu/" in k]
  assert mu and all(not v.any() for v in mu)


def test_init_from_another_architecture_names_the_paths(
  source_run, data_dir, tmp_path
):
  source, _ = source_run
  config = tiny_config(data_dir, num_steps=1)
  config.init_from = str(source)
  config.model.moe.num_experts = 8
  with pytest.raises(errors.ConfigError) as raised:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  message = str(raised.value)
  assert "layer_01/moe/experts/wi (4, 32, 64)" in message
  assert "layer_01/moe/router/kernel" in message
  assert "nothing was restored" in message
  assert not (tmp_path / "run").exists()
  # An optimizer of another structure (frozen groups) cannot give its
  # opt_state; the params alone can.
  config = tiny_config(data_dir, num_steps=1)
  config.init_from = str(source)
  config.optimizer.freeze = ("embeddings",)
  config.init_restore = ("params", "opt_state")
  *_, fresh = _build(config, data.create_eval_batches(config.data)[0])
  with pytest.raises(errors.ConfigError, match="opt_state.*missing"):
    finetune.initialize(config, fresh)


def test_init_config_mistakes(tmp_path, data_dir):
  base = tiny_config(data_dir)
  cases = [
    (dict(init_from=str(tmp_path)), "holds no checkpoint"),
    (dict(init_restore=("opt_state",)), "'params'"),
    (dict(init_restore=("params", "data")), "data"),
    (dict(init_upcycle=True), "needs init_from"),
    (
      dict(
        init_from="x",
        init_upcycle=True,
        init_restore=("params", "opt_state"),
      ),
      "fresh optimizer",
    ),
  ]
  for overrides, fragment in cases:
    config = base.copy_and_resolve_references()
    config.update(overrides)
    with pytest.raises(errors.ConfigError, match=fragment):
      finetune.check_config(config)
      finetune.resolve_source(config.init_from)
