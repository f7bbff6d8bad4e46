"""Tests of moe_jax.train: learning, exact resumption, the command line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

from moe_jax import data, train, writers
from moe_jax.models import TransformerConfig, TransformerLM

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))
import switch_top1  # noqa: E402
import tiny  # noqa: E402  (pytest puts tests/ on sys.path)


def tiny_config(data_dir, **train_overrides):
  """configs/switch_top1.py shrunk to a few seconds of CPU."""
  return tiny.shrink(switch_top1.get_config(), data_dir, **train_overrides)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


def test_training_lowers_the_loss(tmp_path, data_dir):
  config = tiny_config(
    data_dir, num_steps=40, log_every=5, eval_every=40, checkpoint_every=40
  )
  final = train.train_and_evaluate(config, str(tmp_path))
  rows = [
    r for r in writers.read_metrics(str(tmp_path)) if "train/lm_loss" in r
  ]
  assert rows[-1]["train/lm_loss"] < rows[0]["train/lm_loss"] - 0.5
  # Byte-level: the uniform guess costs ln 259 = 5.56 nats.
  assert final["eval/lm_loss"] < np.log(data.VOCAB_SIZE) - 1.0
  for name in ("config.json", "run_info.json", "summary.png"):
    assert (tmp_path / name).stat().st_size > 0
  assert "train/aux/load_balancing_loss" in rows[-1]
  assert len(rows[-1]["train/moe/layer_01/expert_fraction"]) == 4
  # Training logs each batch's MaxVio; evaluation the mean of its batches'
  # and that of the loads pooled over them (Wang 2024 Table 2's global).
  assert "train/moe/layer_01/max_violation" in rows[-1]
  key = "eval/moe/layer_01/max_violation"
  assert key not in final
  assert 0.0 <= final[f"{key}_global"] <= final[f"{key}_batch"]
  # Pooled counts: every real eval token's one (K = 1) choice.
  real = sum(b["mask"].sum() for b in data.create_eval_batches(config.data))
  assert sum(final["eval/moe/layer_01/expert_counts"]) == pytest.approx(real)


class _CrashingIterator:
  """Wraps the train iterator and raises after `crash_after` batches."""

  def __init__(self, inner, crash_after):
    self.inner, self.left = inner, crash_after

  def __next__(self):
    if self.left == 0:
      raise KeyboardInterrupt("simulated kill")
    self.left -= 1
    return next(self.inner)

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)


def _final_params(workdir, config):
  from moe_jax.checkpoint import Checkpointer
  from moe_jax.models import TransformerConfig, TransformerLM

  model = TransformerLM(TransformerConfig.from_config(config, data.VOCAB_SIZE))
  tx, _ = train.make_optimizer(config.optimizer, config.train.num_steps)
  template = train.init_state(
    config, model, tx, data.create_eval_batches(config.data)[0]
  )
  ckpt = Checkpointer(
    f"{workdir}/checkpoints", max_to_keep=5, save_interval_steps=1
  )
  state, data_state = ckpt.restore(template)
  ckpt.close()
  return state, data_state


def run_straight_and_resumed(config, tmp_path, monkeypatch, crash_after=7):
  """Trains `config` once without interruption and once killed after step
  `crash_after` and re-run in the same workdir; returns both workdirs."""
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  train.train_and_evaluate(config, str(straight))
  make_iterator = data.create_train_iterator
  monkeypatch.setattr(
    data,
    "create_train_iterator",
    lambda *a, **k: _CrashingIterator(
      make_iterator(*a, **k), crash_after=crash_after
    ),
  )
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(resumed))
  monkeypatch.setattr(data, "create_train_iterator", make_iterator)
  train.train_and_evaluate(config, str(resumed))
  return straight, resumed


def test_resumed_run_equals_uninterrupted_run(tmp_path, data_dir, monkeypatch):
  """Killed after step 7 with a checkpoint at step 5, then re-run with the
  same workdir: metrics and final state are bit-identical to a run that was
  never interrupted (STYLE rule 10)."""
  config = tiny_config(
    data_dir, num_steps=10, log_every=1, eval_every=5, checkpoint_every=5
  )
  config.model.moe.router_jitter = 0.01  # exercises the per-step rng
  straight, resumed = run_straight_and_resumed(config, tmp_path, monkeypatch)

  def rows(workdir):
    return [
      {k: v for k, v in r.items() if "seconds" not in k}
      for r in writers.read_metrics(str(workdir))
    ]

  assert [r["step"] for r in rows(resumed)] == [
    r["step"] for r in rows(straight)
  ]
  assert rows(resumed) == rows(straight)
  state_a, data_a = _final_params(straight, config)
  state_b, data_b = _final_params(resumed, config)
  assert data_a == data_b
  for a, b in zip(jax_leaves(state_a), jax_leaves(state_b)):
    np.testing.assert_array_equal(a, b)


def jax_leaves(tree):
  import jax

  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_command_line_runs_and_resumes(tmp_path, data_dir):
  """`python -m moe_jax.train` with config overrides; a second call with the
  same workdir finds the run finished and resumes nothing."""
  args = [
    sys.executable,
    "-m",
    "moe_jax.train",
    f"--config={REPO / 'configs' / 'gshard_top2.py'}",
    f"--workdir={tmp_path}",
    f"--config.data.data_dir={data_dir}",
    "--config.data.max_code_bytes=300000",
    "--config.data.seq_len=32",
    "--config.data.batch_size=4",
    "--config.data.eval_batch_size=4",
    "--config.data.num_eval_batches=1",
    "--config.model.d_model=32",
    "--config.model.num_layers=2",
    "--config.model.moe.group_size=64",
    "--config.model.moe.expert_dim=32",
    "--config.train.num_steps=3",
    "--config.train.log_every=1",
    "--config.train.progress_bar=False",
  ]
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    # This checkout's moe_jax, not whichever one is installed.
    PYTHONPATH=os.pathsep.join(
      [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    ),
  )
  first = subprocess.run(
    args, capture_output=True, text=True, env=env, cwd=tmp_path
  )
  assert first.returncode == 0, first.stderr[-3000:]
  assert "validation loss" in first.stdout
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["model"]["moe"]["router"] == "gshard"
  assert config["model"]["d_model"] == 32
  second = subprocess.run(
    args, capture_output=True, text=True, env=env, cwd=tmp_path
  )
  assert second.returncode == 0, second.stderr[-3000:]
  assert "steps 3 -> 3" in second.stdout
  bad = subprocess.run(
    args + ["--config.model.moe.router=nope"],
    capture_output=True,
    text=True,
    env=env,
    cwd=tmp_path,
  )
  assert bad.returncode != 0
  assert "unknown router='nope'" in bad.stderr


def test_every_sown_aux_loss_has_a_weight_or_is_an_error():
  """STYLE rule 11: the trainer adds coefficient x loss for every sown loss;
  a loss without a config.loss weight is an error, never dropped."""
  loss = ml_collections.ConfigDict(
    {
      "load_balancing_weight": 0.5,
      "router_z_loss_weight": 0.25,
      "importance_loss_weight": 0.125,
    }
  )
  assert train.aux_loss_weight(loss, "load_balancing_loss") == 0.5
  assert train.aux_loss_weight(loss, "router_z_loss") == 0.25
  assert train.aux_loss_weight(loss, "importance_loss") == 0.125
  with pytest.raises(ValueError, match="'load_loss'.*loss.load_loss_weight"):
    train.aux_loss_weight(loss, "load_loss")


def test_compute_loss_adds_each_weighted_aux_loss_once(data_dir):
  """total = lm_loss + sum over sown names of weight x (sum over layers)."""
  config = tiny_config(data_dir)
  config.model.num_layers = 4  # two MoE layers
  config.model.moe.router = "noisy_top_k"
  config.model.moe.top_k = 2
  config.loss.load_balancing_weight = 0.5
  config.loss.router_z_loss_weight = 0.25
  config.loss.importance_loss_weight = 2.0
  config.loss.load_loss_weight = 4.0
  model = TransformerLM(TransformerConfig.from_config(config, data.VOCAB_SIZE))
  batch = data.create_eval_batches(config.data)[0]
  params = model.init(jax.random.key(0), batch["inputs"])["params"]
  total, (logged, router_state) = jax.jit(
    lambda p: train.compute_loss(
      p,
      batch,
      {"routing": jax.random.key(1)},
      model=model,
      loss_config=config.loss,
      deterministic=False,
    )
  )(params)
  weights = {
    "load_balancing_loss": 0.5,
    "router_z_loss": 0.25,
    "importance_loss": 2.0,
    "load_loss": 4.0,
  }
  assert {k for k in logged if k.startswith("aux/")} == {
    f"aux/{name}" for name in weights
  }
  expected = float(logged["lm_loss"]) + sum(
    w * float(logged[f"aux/{name}"]) for name, w in weights.items()
  )
  np.testing.assert_allclose(float(total), expected, rtol=1e-6)
  assert router_state == {}  # only the DeepSeek router keeps state
