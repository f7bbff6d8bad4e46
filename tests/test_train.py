"""Tests of moe_jax.train: learning, exact resumption, the command line."""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from moe_jax import (
  data,
  dispatch,
  errors,
  expert_parallel,
  grouped_matmul,
  losses,
  routing,
  train,
  writers,
)
from moe_jax.models import TransformerConfig, TransformerLM

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))
import deepseek_v3  # noqa: E402
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


def _final_params(workdir, config, step=None):
  """The (train state, data state) of `workdir`'s checkpoint at `step`
  (None: the newest)."""
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
  state, data_state = ckpt.restore(template, step)
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


def _env():
  return dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    # This checkout's moe_jax, not whichever one is installed.
    PYTHONPATH=os.pathsep.join(
      [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    ),
  )


def _cli(args, cwd, **kwargs):
  """Runs `python -m moe_jax.train *args`; returns the CompletedProcess."""
  return subprocess.run(
    [sys.executable, "-m", "moe_jax.train", *args],
    capture_output=True,
    text=True,
    env=_env(),
    cwd=cwd,
    **kwargs,
  )


def _assert_one_line_error(done, *fragments):
  """Exit status 2 and exactly one stderr line `error: ...` holding each of
  `fragments`, no traceback."""
  assert done.returncode == 2, done.stderr[-3000:]
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1, done.stderr[-3000:]
  assert lines[0].startswith("error: ")
  assert "Traceback" not in done.stderr
  for fragment in fragments:
    assert fragment in lines[0], (fragment, lines[0])


def test_command_line_runs_and_resumes(tmp_path, data_dir):
  """`python -m moe_jax.train` with config overrides; a second call with the
  same workdir finds the run finished and resumes nothing; a third with
  another train.num_steps is refused unless --allow_config_change names it,
  and then extends the run; a bad router is one line of error."""
  args = [
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
  first = _cli(args, tmp_path)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "validation loss" in first.stdout
  assert "starting fresh" in first.stdout
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["model"]["moe"]["router"] == "gshard"
  assert config["model"]["d_model"] == 32
  run_info = (tmp_path / "run_info.json").read_bytes()
  second = _cli(args, tmp_path)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "steps 3 -> 3" in second.stdout
  assert f"resuming from step 3 (checkpoint {tmp_path}/checkpoints/3)" in (
    second.stdout
  )
  longer = [*args, "--config.train.num_steps=5"]
  refused = _cli(longer, tmp_path)
  _assert_one_line_error(
    refused,
    "train.num_steps: 3 in the workdir, 5 now",
    "--allow_config_change=train.num_steps",
  )
  extended = _cli([*longer, "--allow_config_change=train.num_steps"], tmp_path)
  assert extended.returncode == 0, extended.stderr[-3000:]
  assert "steps 3 -> 5" in extended.stdout
  assert [
    r["step"] for r in writers.read_metrics(tmp_path) if "train/loss" in r
  ] == [1, 2, 3, 4, 5]
  assert (
    json.loads((tmp_path / "config.json").read_text())["train"]["num_steps"]
    == 5
  )
  assert (tmp_path / "run_info.json").read_bytes() == run_info
  history = writers.read_history(tmp_path)
  assert [row["event"] for row in history] == [
    "launch",  # the second call
    "launch",  # the extension; the refused call wrote nothing
    "config_change",
  ]
  assert {k: history[2][k] for k in ("key", "old", "new", "step")} == {
    "key": "train.num_steps",
    "old": 3,
    "new": 5,
    "step": 3,
  }
  assert history[1]["run_info"]["command"][-1] == (
    "--allow_config_change=train.num_steps"
  )
  bad = _cli([*longer, "--config.model.moe.router=nope"], tmp_path)
  _assert_one_line_error(bad, "unknown router='nope'", "allowed:", "'switch'")


def test_command_line_config_mistakes_are_one_line(tmp_path):
  """A missing config file and a misspelled --config key: exit status 2 and
  one readable line (ml_collections' own message holds a literal \\n and
  escaped quotes)."""
  missing = _cli(
    [f"--config={tmp_path / 'nope.py'}", f"--workdir={tmp_path / 'run'}"],
    tmp_path,
  )
  _assert_one_line_error(missing, f"--config={tmp_path / 'nope.py'}", "No such")
  misspelled = _cli(
    [
      f"--config={REPO / 'configs' / 'switch_top1.py'}",
      f"--workdir={tmp_path / 'run'}",
      "--config.model.moe.routr=switch",
    ],
    tmp_path,
  )
  _assert_one_line_error(
    misspelled,
    "unknown config key 'routr' in --config.model.moe.routr",
    'did you mean "router"',
  )
  assert "\\" not in misspelled.stderr
  assert not (tmp_path / "run").exists()


def _cli_overrides(config) -> list[str]:
  """The --config.* flags that turn configs/switch_top1.py into `config`."""
  base = writers.flatten_config(switch_top1.get_config())
  return [
    f"--config.{key}={value}"
    for key, value in writers.flatten_config(config).items()
    if base[key] != value
  ]


def _event_files_purge_steps(workdir):
  """The steps of the SessionLog START events in each TensorBoard file."""
  from tensorboardX.proto import event_pb2

  out = []
  for path in sorted((workdir / "tensorboard").glob("events.*")):
    data, offset, starts = path.read_bytes(), 0, []
    while offset < len(data):  # TFRecord: u64 length, u32 crc, data, crc
      length = int.from_bytes(data[offset : offset + 8], "little")
      event = event_pb2.Event.FromString(
        data[offset + 12 : offset + 12 + length]
      )
      if event.HasField("session_log"):
        starts.append(event.step)
      offset += 12 + length + 4
    out.append(starts)
  return out


def test_killed_before_the_first_checkpoint_starts_clean(tmp_path, data_dir):
  """SIGKILL a run after it logged metrics but before any checkpoint; the
  next launch says it starts fresh, cuts the metric log back to nothing
  and TensorBoard's to step 0, and ends with the metric log of a run that
  was never killed (every value but the timings)."""
  config = tiny_config(
    data_dir,
    num_steps=150,
    log_every=10,
    eval_every=150,
    checkpoint_every=1000,
  )
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  common = [f"--config={REPO / 'configs' / 'switch_top1.py'}"]
  common += _cli_overrides(config)
  done = _cli([*common, f"--workdir={straight}"], tmp_path)
  assert done.returncode == 0, done.stderr[-3000:]

  process = subprocess.Popen(
    [sys.executable, "-m", "moe_jax.train", *common, f"--workdir={killed}"],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
    env=_env(),
    cwd=tmp_path,
  )
  try:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
      path = killed / "metrics.jsonl"
      if path.exists() and path.read_text().count("\n") >= 2:
        break
      time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
  finally:
    process.wait()
  assert process.returncode == -signal.SIGKILL
  logged = [r["step"] for r in writers.read_metrics(killed)]
  assert len(logged) >= 2 and max(logged) < 150
  assert not list((killed / "checkpoints").glob("[0-9]*"))

  rerun = _cli([*common, f"--workdir={killed}"], tmp_path)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "starting fresh at step 0" in rerun.stdout
  assert f"dropped {len(logged)} metric rows" in rerun.stdout

  def rows(workdir):
    return [
      {k: v for k, v in r.items() if "seconds" not in k}
      for r in writers.read_metrics(workdir)
    ]

  train_steps = [r["step"] for r in rows(killed) if "train/loss" in r]
  assert train_steps == list(range(10, 151, 10))  # strictly increasing
  assert [r["step"] for r in rows(killed)] == [
    r["step"] for r in rows(straight)
  ]
  assert rows(killed) == rows(straight)  # step 150: a train and an eval row
  # The rerun's event file hides the events of steps >= 1 of the first.
  assert _event_files_purge_steps(killed)[-1] == [1]


def test_keep_checkpoint_steps_survive_max_to_keep(tmp_path, data_dir):
  """max_to_keep 1, checkpoints every 4 of 6 steps, kept steps 2 and 5:
  the run ends with checkpoints 2, 5 (saved off the interval) and 6 (the
  last); step 4 is cleaned up. Changing the kept steps is a safe change:
  an extension to 8 steps keeping 7 ends with 2, 5, 7, 8."""
  config = tiny_config(
    data_dir,
    num_steps=6,
    log_every=3,
    eval_every=100,
    checkpoint_every=4,
    max_checkpoints_to_keep=1,
    keep_checkpoint_steps=(2, 5),
  )
  train.train_and_evaluate(config, str(tmp_path))

  def saved():
    return sorted(
      int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()
    )

  assert saved() == [2, 5, 6]
  config.train.num_steps = 8
  config.train.keep_checkpoint_steps = (2, 5, 7)
  train.train_and_evaluate(
    config,
    str(tmp_path),
    allow_config_change="train.num_steps,train.keep_checkpoint_steps",
  )
  assert saved() == [2, 5, 7, 8]
  for bad in ((0,), (9,), (True,), (2.0,)):
    config.train.keep_checkpoint_steps = bad
    with pytest.raises(errors.ConfigError, match="keep_checkpoint_steps="):
      train.check_train_config(config.train)


def test_a_different_config_is_refused_before_anything_is_written(
  tmp_path, data_dir
):
  """A workdir of num_experts=4 and another launch with 8: ConfigError
  naming the key and both values; config.json keeps its bytes and no file
  appears. Naming the key in allow_config_change does not help: it is not
  one of writers.SAFE_CHANGES."""
  config = tiny_config(data_dir)
  writers.write_run_info(tmp_path, config)
  before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
  other = tiny_config(data_dir)
  other.model.moe.num_experts = 8
  other.train.log_every = 7
  with pytest.raises(errors.ConfigError) as refused:
    train.train_and_evaluate(other, str(tmp_path))
  message = str(refused.value)
  assert "model.moe.num_experts: 4 in the workdir, 8 now" in message
  assert "train.log_every: 50 in the workdir, 7 now" in message
  assert "model.moe.num_experts cannot change within a run" in message
  assert "\n" not in message
  with pytest.raises(errors.ConfigError, match="only these can: train.num_"):
    train.train_and_evaluate(
      other,
      str(tmp_path),
      allow_config_change=["model.moe.num_experts", "train.log_every"],
    )
  # A safe key alone, named: accepted up to the check of the unsafe one.
  with pytest.raises(errors.ConfigError, match="model.moe.num_experts: 4"):
    train.train_and_evaluate(
      other, str(tmp_path), allow_config_change="train.log_every"
    )
  assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_extending_a_run_recomputes_the_schedule_and_records_it(
  tmp_path, data_dir
):
  """4 steps, then train.num_steps=6 with allow_config_change: the run goes
  on from its checkpoint at step 4 with the cosine schedule of 6 steps
  (Loshchilov & Hutter 2017 Eq. 5 after a linear warmup, written out
  here), and history.jsonl records the change at step 4."""
  config = tiny_config(
    data_dir, num_steps=4, log_every=1, eval_every=100, checkpoint_every=2
  )
  train.train_and_evaluate(config, str(tmp_path))
  run_info = (tmp_path / "run_info.json").read_bytes()
  config.train.num_steps = 6
  train.train_and_evaluate(
    config, str(tmp_path), allow_config_change=("train.num_steps",)
  )
  rows = [r for r in writers.read_metrics(tmp_path) if "train/loss" in r]
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
  peak, end, warmup = 3e-3, 3e-4, 2  # configs/base.py, tiny.shrink

  def cosine(step, num_steps):  # the learning rate of optimizer step `step`
    t = (step - warmup) / (num_steps - warmup)
    return end + (peak - end) * 0.5 * (1 + np.cos(np.pi * t))

  # Row `s` logs the learning rate of its update, that of step s - 1.
  lrs = [r["train/learning_rate"] for r in rows]
  np.testing.assert_allclose(lrs[2:4], [cosine(2, 4), cosine(3, 4)], rtol=1e-5)
  np.testing.assert_allclose(lrs[4:], [cosine(4, 6), cosine(5, 6)], rtol=1e-5)
  history = writers.read_history(tmp_path)
  change = [row for row in history if row["event"] == "config_change"]
  assert [(c["key"], c["old"], c["new"], c["step"]) for c in change] == [
    ("train.num_steps", 4, 6, 4)
  ]
  assert [row["event"] for row in history] == ["launch", "config_change"]
  assert history[0]["step"] == 4
  assert (
    json.loads((tmp_path / "config.json").read_text())["train"]["num_steps"]
    == 6
  )
  assert (tmp_path / "run_info.json").read_bytes() == run_info


def test_divergence_names_step_and_terms_and_keeps_a_finite_checkpoint(
  tmp_path, data_dir
):
  """A learning rate of 1e6 makes the loss infinite within a few steps. The
  run stops at the first non-finite step s (found here by a separate plain
  loop) with a FloatingPointError naming s and its non-finite terms, logs
  a "diverged" event, and its newest checkpoint is step s - 1, all finite,
  although it saves every step and logs the loss only every 4th."""
  config = tiny_config(
    data_dir, num_steps=12, log_every=4, eval_every=100, checkpoint_every=1
  )
  config.optimizer.learning_rate = 1e6
  config.optimizer.warmup_steps = 1
  reference = tiny.train_briefly(config, 12)
  aux = sorted(k for k in reference[0] if k.startswith("aux/"))
  assert "aux/load_balancing_loss" in aux
  names = ["lm_loss", *aux, "grad_norm"]
  bad = [
    (step, [n for n in names if not np.isfinite(row[n])])
    for step, row in enumerate(reference, start=1)
  ]
  first, terms = next((s, t) for s, t in bad if t)
  assert 1 < first <= 12

  with pytest.raises(FloatingPointError) as stopped:
    train.train_and_evaluate(config, str(tmp_path))
  error = stopped.value
  assert isinstance(error, errors.DivergenceError)
  assert (error.step, error.terms) == (first, terms)
  # experiments/reproduce.py reads the step with this pattern.
  assert re.search(r"at step (\d+)", str(error)).group(1) == str(first)
  for term in terms:
    assert term in str(error)
  rows = writers.read_metrics(tmp_path)
  assert rows[-1] == {"step": first, "event": "diverged", "terms": terms}
  assert all(r["step"] < first for r in rows[:-1])
  saved = [int(p.name) for p in (tmp_path / "checkpoints").glob("[0-9]*")]
  assert max(saved) == first - 1
  state, _ = _final_params(tmp_path, config)
  assert int(state.step) == first - 1
  for leaf in jax_leaves(state):
    assert np.all(np.isfinite(leaf))


class _PoisonedIterator:
  """Wraps the train iterator; the batches of the (1-based) steps in `bad`
  get a NaN in their loss mask, which makes lm_loss and every gradient NaN
  and leaves the aux losses finite (the model reads only mask > 0)."""

  def __init__(self, inner, bad):
    self.inner, self.bad, self.step = inner, set(bad), 0

  def __next__(self):
    batch = next(self.inner)
    self.step += 1
    if self.step in self.bad:
      batch = dict(batch, mask=np.array(batch["mask"], copy=True))
      batch["mask"][0, 0] = np.nan
    return batch

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)


def _poison(monkeypatch, bad):
  make_iterator = data.create_train_iterator
  monkeypatch.setattr(
    data,
    "create_train_iterator",
    lambda *a, **k: _PoisonedIterator(make_iterator(*a, **k), bad),
  )


def _state_at(workdir, config, step):
  return _final_params(workdir, config, step)[0]


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_skip_nonfinite_leaves_the_state_and_the_bias_unchanged(
  tmp_path, data_dir, monkeypatch
):
  """optimizer.on_nonfinite="skip" and a NaN loss at step 3 of 6 (between
  logging steps 2 and 4): the run finishes; the checkpoint after step 3
  equals the one after step 2 bit for bit (params, Adam state, the DeepSeek
  bias) but its step; one skipped_nonfinite event names lm_loss and
  grad_norm; the count reads 1. The final state equals that of a plain
  loop without the skipping code that trains on the same batches less
  batch 3 (the steps draw no randomness: no jitter, no dropout), to float32
  rounding."""
  config = tiny.shrink(
    deepseek_v3.get_config(),
    data_dir,
    num_steps=6,
    log_every=2,
    eval_every=100,
    checkpoint_every=100,
    keep_checkpoint_steps=(2, 3),
  )
  config.model.moe.update(
    num_experts=8, expert_dim=16, top_k=2, shared_expert_dim=16
  )
  config.model.moe.bias_update_rate = 1e-2
  config.optimizer.on_nonfinite = "skip"
  config.optimizer.max_consecutive_nonfinite_skips = 1
  _poison(monkeypatch, bad=[3])
  train.train_and_evaluate(config, str(tmp_path))

  rows = writers.read_metrics(str(tmp_path))
  events = [r for r in rows if "event" in r]
  assert events == [
    {"step": 3, "event": "skipped_nonfinite", "terms": ["lm_loss", "grad_norm"]}
  ]
  train_rows = {r["step"]: r for r in rows if "train/loss" in r}
  assert sorted(train_rows) == [2, 4, 6]
  assert train_rows[2]["train/skipped_nonfinite_steps"] == 0
  assert train_rows[6]["train/skipped_nonfinite_steps"] == 1
  assert train_rows[6]["train/consecutive_nonfinite_steps"] == 0

  before, after = _state_at(tmp_path, config, 2), _state_at(tmp_path, config, 3)
  assert (int(before.step), int(after.step)) == (2, 3)
  _assert_trees_equal(after.params, before.params)
  _assert_trees_equal(after.router_state, before.router_state)
  _assert_trees_equal(after.opt_state.inner_state, before.opt_state.inner_state)
  assert int(after.opt_state.notfinite_count) == 1
  assert int(after.opt_state.total_notfinite) == 1
  final = _state_at(tmp_path, config, 6)
  bias = [s.router_state["layer_01"]["moe"]["bias"] for s in (before, final)]
  assert np.any(np.asarray(bias[1]) != np.asarray(bias[0]))  # it moves

  # The reference: the same batches but the third, "stop" (no
  # apply_if_finite, no jnp.where), 5 steps on the schedule of 6.
  plain = ml_collections.ConfigDict(config.to_dict())
  plain.optimizer.on_nonfinite = "stop"
  model = TransformerLM(TransformerConfig.from_config(plain, data.VOCAB_SIZE))
  tx, schedule = train.make_optimizer(plain.optimizer, 6)
  monkeypatch.undo()
  batches = data.create_train_iterator(plain.data, seed=plain.seed)
  batches = [next(batches) for _ in range(6)]
  state = train.init_state(plain, model, tx, batches[0])
  step_fn = jax.jit(train.bind_train_step(plain, model, tx, schedule))
  for batch in batches[:2] + batches[3:]:
    state, _ = step_fn(state, batch)
  # Two XLA programs (the reference has no cond and no where): the same
  # arithmetic up to a few float32 ulps (2e-6 relative seen); an applied
  # step 3 would move the parameters by about the learning rate, 1e-3. Not
  # the attention key biases: their gradient is 0 but for rounding (q.b is
  # the same for every key of a query: softmax ignores it), which Adam
  # scales up to steps of the learning rate; they differ by that noise.
  for tree, reference in (
    (final.params, state.params),
    (final.router_state, state.router_state),
  ):
    flat = jax.tree_util.tree_leaves_with_path(tree)
    for (path, x), y in zip(flat, jax_leaves(reference), strict=True):
      if "['key']['bias']" in jax.tree_util.keystr(path):
        continue
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_skip_nonfinite_stops_past_the_limit_in_a_row(
  tmp_path, data_dir, monkeypatch
):
  """Limit 2, NaN losses at steps 2 and 4, 5, 6: steps 2, 4 and 5 are
  skipped (a finite step 3 resets the count), step 6 is the third in a row
  and stops the run as a divergence at step 6, although no step before 8
  reads its metrics back; the checkpoint of step 4 stays."""
  config = tiny_config(
    data_dir, num_steps=8, log_every=8, eval_every=100, checkpoint_every=4
  )
  config.optimizer.on_nonfinite = "skip"
  config.optimizer.max_consecutive_nonfinite_skips = 2
  _poison(monkeypatch, bad=[2, 4, 5, 6])
  with pytest.raises(errors.DivergenceError) as stopped:
    train.train_and_evaluate(config, str(tmp_path))
  error = stopped.value
  assert (error.step, error.terms) == (6, ["lm_loss", "grad_norm"])
  assert "at step 6" in str(error)
  assert "3 non-finite steps in a row" in str(error)
  assert "max_consecutive_nonfinite_skips=2" in str(error)
  events = [r for r in writers.read_metrics(str(tmp_path)) if "event" in r]
  terms = ["lm_loss", "grad_norm"]
  assert events == [
    {"step": 2, "event": "skipped_nonfinite", "terms": terms},
    {"step": 4, "event": "skipped_nonfinite", "terms": terms},
    {"step": 5, "event": "skipped_nonfinite", "terms": terms},
    {"step": 6, "event": "diverged", "terms": terms},
  ]
  saved = [int(p.name) for p in (tmp_path / "checkpoints").glob("[0-9]*")]
  assert saved == [4]


def test_nonfinite_stops_by_default(tmp_path, data_dir, monkeypatch):
  """The default optimizer.on_nonfinite="stop": a single NaN loss at step 3
  stops the run there; nothing counts skipped steps."""
  config = tiny_config(
    data_dir, num_steps=6, log_every=1, eval_every=100, checkpoint_every=100
  )
  assert config.optimizer.on_nonfinite == "stop"
  _poison(monkeypatch, bad=[3])
  with pytest.raises(errors.DivergenceError) as stopped:
    train.train_and_evaluate(config, str(tmp_path))
  assert (stopped.value.step, stopped.value.terms) == (
    3,
    ["lm_loss", "grad_norm"],
  )
  rows = writers.read_metrics(str(tmp_path))
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert rows[-1] == {
    "step": 3,
    "event": "diverged",
    "terms": ["lm_loss", "grad_norm"],
  }
  assert not any("skipped" in key for r in rows for key in r)


def test_on_nonfinite_values_are_checked(tmp_path, data_dir):
  """An unknown optimizer.on_nonfinite or a limit below 1 is a ConfigError
  naming the allowed values; "skip" is refused in a workdir whose run began
  before the key existed (its optimizer state has no counters)."""
  opt = tiny_config(data_dir).optimizer
  opt.on_nonfinite = "ignore"
  with pytest.raises(errors.ConfigError, match="'ignore'; allowed: 'stop', "):
    train.make_optimizer(opt, 10)
  opt.on_nonfinite = "skip"
  for limit in (0, -1):
    opt.max_consecutive_nonfinite_skips = limit
    with pytest.raises(errors.ConfigError, match="an integer >= 1"):
      train.make_optimizer(opt, 10)

  old = tiny_config(data_dir)
  del old.optimizer["on_nonfinite"]
  writers.write_run_info(tmp_path, old)
  skip = tiny_config(data_dir)
  skip.optimizer.on_nonfinite = "skip"
  with pytest.raises(errors.ConfigError, match="began without the key"):
    train.train_and_evaluate(skip, str(tmp_path))


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


def _rows_without_timings(workdir):
  return [
    {k: v for k, v in r.items() if "seconds" not in k}
    for r in writers.read_metrics(str(workdir))
  ]


def _assert_same_final_state(workdir_a, workdir_b, config):
  state_a, data_a = _final_params(workdir_a, config)
  state_b, data_b = _final_params(workdir_b, config)
  assert data_a == data_b
  assert int(state_a.step) == int(state_b.step) == config.train.num_steps
  for a, b in zip(jax_leaves(state_a), jax_leaves(state_b), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory, data_dir):
  """A tiny run of 6 steps with checkpoints at 2, 4, 6 (the last two kept):
  (config, workdir, its metric rows, its stdout)."""
  config = tiny_config(
    data_dir, num_steps=6, log_every=1, eval_every=3, checkpoint_every=2
  )
  config.model.moe.router_jitter = 0.01  # exercises the per-step rng
  workdir = tmp_path_factory.mktemp("six_steps")
  import contextlib
  import io

  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    train.train_and_evaluate(config, str(workdir))
  return config, workdir, _rows_without_timings(workdir), out.getvalue()


def _damage_step(step_dir, how):
  sys.path.insert(0, str(REPO / "tests"))
  import test_checkpoint

  if how == "unfinished_write":  # what a write killed before its rename left
    step_dir.rename(f"{step_dir}.orbax-checkpoint-tmp-1700000000")
  else:
    test_checkpoint._corrupt(step_dir, how)


# Every kind of damage is tested on a Checkpointer in tests/test_checkpoint.py;
# here two, through the trainer: one only the fingerprint catches.
@pytest.mark.parametrize("how", ["one_bit", "unfinished_write"])
def test_a_bad_latest_checkpoint_resumes_from_the_previous_good_one(
  tmp_path, six_steps, how, capsys
):
  """The finished 6-step run's step-6 checkpoint damaged: a rerun warns on
  one stderr line naming it, resumes from step 4, sets step 6 aside as
  6.corrupt (an unfinished write is removed), trains steps 5-6 again and
  ends with the metric log and the bit-identical state of the undamaged
  run."""
  config, reference, rows, _ = six_steps
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  _damage_step(workdir / "checkpoints" / "6", how)
  train.train_and_evaluate(config, str(workdir))
  captured = capsys.readouterr()
  warnings = [
    line for line in captured.err.splitlines() if line.startswith("warning:")
  ]
  assert len(warnings) == 1, captured.err[-3000:]
  bad = workdir / "checkpoints" / "6"
  if how == "unfinished_write":
    assert f"removed {bad}.orbax-checkpoint-tmp-1700000000" in warnings[0]
    assert not list((workdir / "checkpoints").glob("6.*"))
  else:
    assert (
      f"skipped the bad checkpoint {bad} (moved to {bad}.corrupt)"
      in (warnings[0])
    )
    assert (workdir / "checkpoints" / "6.corrupt").is_dir()
  assert "resuming from step 4" in captured.out
  assert _rows_without_timings(workdir) == rows
  _assert_same_final_state(workdir, reference, config)


def _wait_for(predicate, process, timeout=240):
  """Polls `predicate()` every millisecond until it holds (True) or the
  process ends or `timeout` passes (False)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline and process.poll() is None:
    if predicate():
      return True
    time.sleep(0.001)
  return False


def _logged_steps(workdir):
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  return [
    json.loads(line)["step"]
    for line in path.read_text().splitlines()
    if line.endswith("}")
  ]


def test_sigkill_at_drawn_steps_and_during_a_write_resumes_exactly(
  tmp_path, six_steps
):
  """`python -m moe_jax.train` SIGKILLed twice: once after a step drawn at
  random (seed 0), once while a checkpoint is being written (its orbax tmp
  directory on disk); the third launch runs to the end. Metric log (but
  the timings) and final state equal the uninterrupted run's, bit for
  bit."""
  config, reference, rows, _ = six_steps
  workdir = tmp_path / "killed"
  command = [
    sys.executable,
    "-m",
    "moe_jax.train",
    f"--config={REPO / 'configs' / 'switch_top1.py'}",
    *_cli_overrides(config),
    f"--workdir={workdir}",
  ]

  def launch():
    return subprocess.Popen(
      command,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=_env(),
      cwd=tmp_path,
    )

  def kill(process):
    os.kill(process.pid, signal.SIGKILL)
    out, err = process.communicate()
    assert process.returncode == -signal.SIGKILL, err[-3000:]
    return out, err

  kill_after = int(np.random.default_rng(0).integers(1, 5))  # a step 1..4
  first = launch()
  assert _wait_for(
    lambda: max(_logged_steps(workdir), default=0) >= kill_after, first
  )
  kill(first)

  checkpoints = workdir / "checkpoints"

  def writing():
    return [
      p for p in checkpoints.glob("*.orbax-checkpoint-tmp*") if p.is_dir()
    ]

  for _ in range(3):  # a write takes ~0.1 s: the kill may come too late
    second = launch()
    assert _wait_for(lambda: bool(writing()), second)
    kill(second)
    if writing():
      break
  unfinished = writing()
  assert unfinished, "no kill landed during a checkpoint write"

  third = launch()
  out, err = third.communicate(timeout=300)
  assert third.returncode == 0, err[-3000:]
  assert f"removed {unfinished[0]}: an unfinished checkpoint write" in err
  assert not writing()
  assert _rows_without_timings(workdir) == rows
  _assert_same_final_state(workdir, reference, config)


def test_final_summary_prints_train_tokens_per_second(six_steps):
  """The summary's "train tokens/s" is the median of batch tokens / seconds
  over the logging intervals, without the first and without those holding
  an evaluation (after steps 3 and 6: the interval from step 3 to 4)."""
  config, workdir, _, stdout = six_steps
  seconds = {
    r["step"]: r["train/seconds_since_last_log"]
    for r in writers.read_metrics(str(workdir))
    if "train/seconds_since_last_log" in r
  }
  tokens = 8 * 32  # tiny.shrink: batch 8 x 32 tokens, one step per row
  expected = np.median([tokens / seconds[s] for s in (2, 3, 5, 6)])
  line = next(x for x in stdout.splitlines() if x.startswith("train tokens/s"))
  assert line.startswith(f"train tokens/s: {expected:,.0f} (median")


def _no_data_wanted(*args, **kwargs):
  raise AssertionError("the workdir is checked before the data is opened")


@pytest.mark.parametrize("kind", ["regular_file", "unwritable"])
def test_an_unusable_workdir_is_one_config_error_before_anything_runs(
  tmp_path, data_dir, monkeypatch, kind
):
  """A --workdir that is a regular file, or one inside a read-only
  directory (not testable as root, who may write anywhere): ConfigError
  naming it, raised before the data is opened or anything compiles."""
  if kind == "regular_file":
    workdir = tmp_path / "run"
    workdir.write_text("not a directory")
    fragment = "is a file, not a directory"
  else:
    if os.geteuid() == 0:
      pytest.skip("root ignores directory permissions")
    parent = tmp_path / "read_only"
    parent.mkdir()
    parent.chmod(0o500)
    workdir = parent / "run"
    fragment = "cannot write in --workdir"
  monkeypatch.setattr(data, "create_train_iterator", _no_data_wanted)
  with pytest.raises(errors.ConfigError) as refused:
    train.train_and_evaluate(tiny_config(data_dir), str(workdir))
  assert fragment in str(refused.value)
  assert str(workdir) in str(refused.value)
  assert "\n" not in str(refused.value)


def test_a_missing_tfds_dataset_is_a_config_error(tmp_path):
  """data.source="tfds" with a dataset its data_dir lacks: ConfigError (one
  line on the command line) naming the dataset and the folder searched."""
  config = switch_top1.get_config()
  config.data.source = "tfds"
  config.data.tfds_name = "lm1b"
  config.data.data_dir = str(tmp_path / "tfds")
  with pytest.raises(errors.ConfigError) as refused:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  message = str(refused.value)
  assert "'lm1b' is not prepared" in message
  assert str(tmp_path / "tfds" / "lm1b") in message


# ---- Config validation: every drawn config is refused cleanly or trains.


def _values(good, bad):
  """One of `good` (each allowed alone, maybe not with the other keys
  drawn) or one of `bad`, about as often."""
  return st.one_of(st.sampled_from(good), st.sampled_from(bad))


def _names(*good):
  """Real names, or a misspelt one no table holds."""
  return _values(good, ["no_such_name", ""])


# config key -> values drawn: the real names and sizes, and values just out
# of range (0, negative, top_k > experts, None, a wrong type), misspellings.
_DRAWN = {
  "model.moe.router": _names(*sorted(routing.ROUTING_SCHEMES)),
  "model.moe.num_experts": _values([0, 1, 2, 4], [-1, "4"]),
  "model.moe.top_k": _values([1, 2, 4], [-1, 0, 5, 1.5, None]),
  "model.moe.capacity_factor": _values([0.5, 1.0, 2.0], [None, -1.0, 0.0]),
  "model.moe.eval_capacity_factor": _values([1.0, 2.0], [None, 0.0]),
  "model.moe.capacity_rule": _names(*sorted(routing.CAPACITY_RULES)),
  "model.moe.min_capacity": _values([0, 4], [-1]),
  "model.moe.dispatch": _names(*dispatch.DISPATCHERS),
  "model.moe.grouped_matmul": _names(*grouped_matmul.IMPLEMENTATIONS),
  "model.moe.priority": _names(*routing.PRIORITIES),
  "model.moe.eval_priority": _values(["", *routing.PRIORITIES], ["bad"]),
  "model.moe.second_policy": _names(*routing.SECOND_POLICIES),
  "model.moe.router_dtype": _values(["float32", "bfloat16"], ["float16"]),
  "model.moe.eval_router": _values(["", "top_k"], ["switchh", "random"]),
  "model.moe.allow_noncausal": _values([True, False], ["yes"]),
  "model.moe.group_size": _values([64, 256, 4096], [-8, 0, 24]),
  "model.moe.num_shared_experts": _values([0, 1], [-1]),
  "model.moe.num_expert_groups": _values([1, 2], [3]),
  "model.moe.expert_dropout_rate": _values([0.0, 0.3], [-0.1, 1.0]),
  "model.moe.router_jitter": _values([0.0, 0.01], [-0.01, 1.0]),
  "model.dtype": _values(["float32", "bfloat16"], ["float16"]),
  "model.dropout_rate": _values([0.0, 0.1], [-0.1, 1.0]),
  "model.num_heads": _values([1, 2], [0, 3]),
  "model.activation": _names("relu", "gelu", "silu"),
  "loss.load_balancing": _names(*sorted(losses.LOAD_BALANCING_LOSSES)),
  "loss.load_balancing_weight": _values([0.0, 1e-2], [-1e-2, "1e-2"]),
  "loss.router_z_loss_weight": _values([0.0, 1e-3], [float("nan")]),
  "loss.layer_reduction": _names("sum", "mean"),
  "data.seq_len": _values([16, 32, 48], [0, 10_000]),
  "data.batch_size": _values([2, 8], [0, 3.0]),
  "data.eval_batch_size": _values([2, 8], [-2]),
  "mesh.shape": _values(
    [(1, 1, 1), (-1, 1, 1), (1, 1, -1)],
    [(1, 2, 1), (2, 1, 1), (1, 1), (0, 1, 1)],
  ),
  "mesh.expert_parallel": _names(*expert_parallel.IMPLEMENTATIONS),
  "optimizer.schedule": _names("cosine", "linear", "constant"),
  "optimizer.warmup_steps": _values([0, 2], [-1]),
  "optimizer.learning_rate": _values([1e-3, 3e-3], [-1e-3, 0.0]),
  "train.max_checkpoints_to_keep": _values([1, 2], [0]),
}


def _tiny_config_with(changes: dict) -> ml_collections.ConfigDict:
  """The tiny switch_top1 config (one MoE layer) with `changes` ({dotted
  key: value}) set, whatever their types."""
  config = tiny.shrink(switch_top1.get_config(), "/nonexistent")
  config.model.num_layers, config.model.moe_every = 1, 1
  for key, value in changes.items():
    *path, leaf = key.split(".")
    block = config
    for name in path:
      block = block[name]
    with block.ignore_type():
      block[leaf] = value
  return config


# One to three keys of _DRAWN changed at once.
_CHANGES = st.lists(
  st.sampled_from(sorted(_DRAWN)), min_size=1, max_size=3, unique=True
).flatmap(lambda keys: st.fixed_dictionaries({k: _DRAWN[k] for k in keys}))


class _Compiles:
  """Counts XLA compilations (jax.monitoring's backend-compile event)."""

  count = 0

  @classmethod
  def listen(cls, event, duration_secs, **kwargs):
    del duration_secs, kwargs
    if event == jax._src.dispatch.BACKEND_COMPILE_EVENT:
      cls.count += 1


jax.monitoring.register_event_duration_secs_listener(_Compiles.listen)


def _synthetic_batch(batch_size, seq_len, seed):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, data.VOCAB_SIZE, (batch_size, seq_len + 1))
  return {
    "inputs": tokens[:, :-1].astype(np.int32),
    "targets": tokens[:, 1:].astype(np.int32),
    "mask": np.ones((batch_size, seq_len), np.float32),
  }


# XLA's fast settings: these programs run once, on a few hundred tokens.
_QUICK_COMPILE = {
  "xla_backend_optimization_level": 0,
  "xla_llvm_disable_expensive_passes": True,
}


def _init_step_and_eval(config, checked, execute):
  """Initialisation, one train step and one eval step of `config` on random
  tokens as one program: traced only (jax.eval_shape), or compiled and
  run when `execute`; (train metrics, eval metrics)."""
  model = TransformerLM(checked.model_config)
  d = config.data
  step = train.bind_train_step(config, model, checked.tx, checked.schedule)

  def init_step_eval(batch, eval_batch):
    state = train.init_state(config, model, checked.tx, batch, checked.layout)
    state, logged = step(state, batch)
    evaluated = train.eval_step(
      train.eval_variables(state),
      eval_batch,
      model=model,
      loss_config=config.loss,
    )
    return logged, evaluated

  batches = (
    _synthetic_batch(d.batch_size, d.seq_len, 0),
    _synthetic_batch(d.eval_batch_size, d.seq_len, 1),
  )
  if not execute:
    return jax.eval_shape(init_step_eval, *batches)
  compiled = (
    jax.jit(init_step_eval)
    .lower(*batches)
    .compile(compiler_options=_QUICK_COMPILE)
  )
  return jax.device_get(compiled(*batches))


@settings(derandomize=True)  # examples: the conftest profile's
@given(
  changes=_CHANGES,
  execute=st.sampled_from([False, False, False, True]),
)
def test_a_drawn_config_is_refused_before_compiling_or_trains(changes, execute):
  """Random configs over the real key space (routers, top_k against the
  experts, capacity factors, dispatch, dtypes, drop orders, loss names and
  weights, group size against the batches, mesh against one device, ...):
  `train.check_config` raises ConfigError naming a changed key without
  compiling anything, or the model builds and traces initialisation, a
  training step and an evaluation step; some of those (`execute`; XLA
  takes seconds a config) also compile and run them, with finite losses.
  Any other outcome is a validation gap."""
  config = _tiny_config_with(changes)
  compiles = _Compiles.count
  try:
    checked = train.check_config(config)
  except errors.ConfigError as e:
    assert _Compiles.count == compiles, "validation compiled something"
    message = str(e)
    named = [k for k in changes if k.rsplit(".", 1)[-1] in message]
    assert named, f"{message!r} names none of {sorted(changes)}"
    event("refused")
    return
  assert _Compiles.count == compiles, "validation compiled something"
  event("executed" if execute else "traced")
  logged, evaluated = _init_step_and_eval(config, checked, execute)
  assert {"loss", "lm_loss", "grad_norm"} <= set(logged)
  assert {"loss", "lm_loss"} <= set(evaluated)
  if execute:
    for name, value in {**logged, **evaluated}.items():
      if "loss" in name:
        assert np.all(np.isfinite(value)), (name, value)


@pytest.mark.parametrize(
  "key, value, fragment",
  [
    # Each raised a TypeError, ZeroDivisionError, KeyError or a ValueError
    # from inside the first compilation before it was checked up front.
    ("model.moe.capacity_factor", None, "capacity_factor=None"),
    ("model.moe.eval_capacity_factor", None, "eval_capacity_factor=None"),
    ("model.moe.num_experts", "4", "num_experts='4'"),
    ("model.moe.top_k", 1.5, "top_k=1.5"),
    ("model.moe.group_size", 24, "group_size=24 does not divide the 256"),
    ("data.eval_batch_size", 3, "data.eval_batch_size=3"),
    ("optimizer.learning_rate", 0.0, "optimizer.learning_rate=0.0"),
    ("optimizer.warmup_steps", -1, "optimizer.warmup_steps=-1"),
    ("loss.layer_reduction", "max", "loss.layer_reduction='max'"),
    ("loss.load_balancing_weight", "1e-2", "load_balancing_weight='1e-2'"),
    # Trained without complaint, to no purpose.
    ("loss.load_balancing_weight", -0.01, "load_balancing_weight=-0.01"),
    ("model.dropout_rate", 1.0, "dropout_rate=1.0 must be in [0, 1)"),
  ],
)
def test_each_validation_gap_is_a_config_error(key, value, fragment):
  """The gaps the drawn configs found, one example each: check_config
  raises ConfigError naming the key and the value."""
  changes = {key: value}
  if key == "data.eval_batch_size":  # 3 x 32 = 96 tokens: no whole groups
    changes["model.moe.group_size"] = 64
  with pytest.raises(errors.ConfigError) as refused:
    train.check_config(_tiny_config_with(changes))
  assert fragment in str(refused.value)


def test_a_dense_model_checks_the_moe_keys_of_its_twin():
  """num_experts=0 still reads top_k (the dense twin's width): a wrong type
  is a ConfigError, not a TypeError."""
  config = _tiny_config_with(
    {"model.moe.num_experts": 0, "model.moe.top_k": None}
  )
  with pytest.raises(errors.ConfigError, match="top_k=None"):
    train.check_config(config)


# ---- The workdir's disk: too small before the start, full mid-run.


class _Usage:
  def __init__(self, free):
    self.total, self.used, self.free = 10 * free, 9 * free, free


def test_too_little_free_disk_is_a_config_error_before_anything_runs(
  tmp_path, data_dir, monkeypatch
):
  """shutil.disk_usage reports 1 MB free: ConfigError naming the free and
  the needed bytes and the keys that set them, before the data is opened;
  nothing is left in the workdir. Needed = (max_checkpoints_to_keep 2 + 1
  in flight) x checkpoint + 64 MiB, a checkpoint being the float32
  parameters and Adam's two moments (3 x 4 bytes a parameter) plus a few
  scalars."""
  config = tiny_config(data_dir)
  model = TransformerLM(TransformerConfig.from_config(config, data.VOCAB_SIZE))
  shapes = jax.eval_shape(
    model.init, jax.random.key(0), jax.ShapeDtypeStruct((8, 32), np.int32)
  )["params"]
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  monkeypatch.setattr(shutil, "disk_usage", lambda path: _Usage(1_000_000))
  monkeypatch.setattr(data, "create_train_iterator", _no_data_wanted)
  workdir = tmp_path / "run"
  with pytest.raises(errors.ConfigError) as refused:
    train.train_and_evaluate(config, str(workdir))
  message = str(refused.value)
  assert "1,000,000 bytes free" in message

  def number_after(text):
    return int(re.search(text + r" ([\d,]+)", message)[1].replace(",", ""))

  per_checkpoint = number_after("x")
  assert 12 * n_params <= per_checkpoint <= 12 * n_params + 64
  assert number_after("needs about") == 3 * per_checkpoint + 64 * 2**20
  assert "train.max_checkpoints_to_keep=2" in message
  assert "train.keep_checkpoint_steps" in message
  assert not workdir.exists()


def _enospc(path):
  return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@pytest.mark.parametrize("write", ["checkpoint", "metrics"])
def test_a_disk_that_fills_mid_run_is_one_clear_error(
  tmp_path, data_dir, monkeypatch, capsys, write
):
  """ENOSPC while saving the step-4 checkpoint, or while logging step 4's
  metrics, after a good checkpoint at step 2: DiskFullError (an OSError,
  errno ENOSPC) saying the disk is full and naming the step-2 checkpoint;
  the re-run resumes from it."""
  from moe_jax.checkpoint import Checkpointer

  config = tiny_config(
    data_dir, num_steps=4, log_every=2, eval_every=4, checkpoint_every=2
  )
  workdir = tmp_path / "run"
  if write == "checkpoint":
    save = Checkpointer.save

    def failing_save(self, step, *args, **kwargs):
      if step == 4:
        raise _enospc(self.step_path(step))
      return save(self, step, *args, **kwargs)

    monkeypatch.setattr(Checkpointer, "save", failing_save)
  else:
    write_row = writers.MetricWriter.write

    def failing_write(self, step, metrics):
      if step == 4:
        raise _enospc(self.path)
      return write_row(self, step, metrics)

    monkeypatch.setattr(writers.MetricWriter, "write", failing_write)
  with pytest.raises(errors.DiskFullError) as full:
    train.train_and_evaluate(config, str(workdir))
  message = str(full.value)
  assert full.value.errno == errno.ENOSPC
  assert "is full (No space left on device)" in message
  step_2 = workdir / "checkpoints" / "2"
  assert f"the newest checkpoint on disk is step 2 ({step_2})" in message
  assert "resumes from the newest good checkpoint" in message
  assert "\n" not in message
  if write == "checkpoint":
    monkeypatch.undo()
    capsys.readouterr()
    train.train_and_evaluate(config, str(workdir))
    assert "resuming from step 2" in capsys.readouterr().out


def test_is_disk_full_reads_errno_and_tensorstore_messages():
  assert errors.is_disk_full(_enospc("/x"))
  try:  # an ENOSPC that another error was raised from
    try:
      raise _enospc("/x")
    except OSError as e:
      raise RuntimeError("async save failed") from e
  except RuntimeError as e:
    assert errors.is_disk_full(e)
  assert errors.is_disk_full(
    ValueError("Error writing local file: No space left on device [OS 28]")
  )
  assert not errors.is_disk_full(OSError(errno.EACCES, "Permission denied"))
  assert not errors.is_disk_full(ValueError("something else"))
