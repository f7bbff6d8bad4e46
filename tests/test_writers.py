"""Tests for moe_jax.writers: JSONL rows, TensorBoard scalars, run info."""

import glob
import json
import math
import os
import shutil
import struct
import subprocess

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from moe_jax import errors, writers
from moe_jax.writers import MetricWriter, read_metrics, write_run_info


def _read_events(workdir):
  """Lists the events of each file in <workdir>/tensorboard, in file order.

  Reads the TFRecord framing by hand (u64 length, u32 crc, payload, u32 crc)
  and parses the payload with tensorboardX's own Event proto, so neither
  TensorFlow nor TensorBoard is needed.
  """
  files = sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.*")))
  events_per_file = []
  for path in files:
    data = open(path, "rb").read()
    events, offset = [], 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset : offset + 8])
      payload = data[offset + 12 : offset + 12 + length]
      events.append(event_pb2.Event.FromString(payload))
      offset += 12 + length + 4
    events_per_file.append(events)
  return events_per_file


def test_rows_are_exact_and_values_converted(tmp_path):
  with MetricWriter(tmp_path, tensorboard=False) as writer:
    writer.write(
      10,
      {
        "train/loss": 1.5,
        "train/lm_loss": np.float32(0.25),
        "train/learning_rate": jnp.asarray(2.0, jnp.float32),
        "train/tokens": np.int64(4096),
        "train/moe/layer_01/expert_fraction": [0.75, np.float32(0.25)],
        "eval/moe/layer_01/expert_fraction": jnp.asarray([0.5, 0.5]),
      },
    )
    writer.write(20, {"train/loss": 1.25})
  assert read_metrics(tmp_path) == [
    {
      "step": 10,
      "train/loss": 1.5,
      "train/lm_loss": 0.25,
      "train/learning_rate": 2.0,
      "train/tokens": 4096,
      "train/moe/layer_01/expert_fraction": [0.75, 0.25],
      "eval/moe/layer_01/expert_fraction": [0.5, 0.5],
    },
    {"step": 20, "train/loss": 1.25},
  ]
  assert isinstance(read_metrics(tmp_path)[0]["train/tokens"], int)


def test_each_row_is_on_disk_before_close(tmp_path):
  writer = MetricWriter(tmp_path, tensorboard=False)
  writer.write(1, {"a": 1.0})
  assert read_metrics(tmp_path) == [{"step": 1, "a": 1.0}]
  writer.close()


def test_non_finite_values_become_null(tmp_path):
  with MetricWriter(tmp_path, tensorboard=False) as writer:
    writer.write(
      1,
      {
        "nan": float("nan"),
        "inf": np.float32(np.inf),
        "neg": jnp.asarray(-jnp.inf),
        "list": [1.0, math.nan],
      },
    )
  line = (tmp_path / "metrics.jsonl").read_text()
  assert line == (
    '{"step": 1, "nan": null, "inf": null, "neg": null, "list": [1.0, null]}\n'
  )


@pytest.mark.parametrize(
  "metrics, error",
  [
    ({"step": 1.0}, ValueError),
    ({"name": "text"}, TypeError),
    ({"matrix": np.zeros((2, 2))}, ValueError),
  ],
)
def test_bad_metrics_are_rejected(tmp_path, metrics, error):
  with MetricWriter(tmp_path, tensorboard=False) as writer:
    with pytest.raises(error):
      writer.write(1, metrics)


def test_truncate_after_continues_like_an_uninterrupted_run(tmp_path):
  with MetricWriter(tmp_path, tensorboard=False) as writer:
    for step in range(1, 6):
      writer.write(step, {"loss": float(step)})
  # The run resumes from its checkpoint at step 3 in a new process.
  with MetricWriter(tmp_path, tensorboard=False) as writer:
    writer.truncate_after(3)
    writer.write(4, {"loss": 40.0})
  assert read_metrics(tmp_path) == [
    {"step": 1, "loss": 1.0},
    {"step": 2, "loss": 2.0},
    {"step": 3, "loss": 3.0},
    {"step": 4, "loss": 40.0},
  ]


def test_a_torn_last_line_is_skipped_and_then_dropped(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
  assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}]
  with MetricWriter(tmp_path, tensorboard=False) as writer:
    writer.write(2, {"loss": 2.0})
  assert path.read_text() == (
    '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 2.0}\n'
  )


def test_a_corrupt_middle_line_is_an_error(tmp_path):
  (tmp_path / "metrics.jsonl").write_text(
    '{"step": 1}\nnot json\n{"step": 2}\n'
  )
  with pytest.raises(ValueError, match="line 2"):
    read_metrics(tmp_path)


def test_read_metrics_without_a_file_names_the_workdir(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    read_metrics(tmp_path)


def test_tensorboard_holds_the_scalars(tmp_path):
  with MetricWriter(tmp_path) as writer:
    writer.write(5, {"train/loss": 2.5, "train/moe/layer_01/x": [0.25, 0.75]})
    writer.write(6, {"train/loss": float("nan")})
  scalars = [
    (value.tag, event.step, value.simple_value)
    for events in _read_events(tmp_path)
    for event in events
    for value in event.summary.value
  ]
  assert ("train/loss", 5, 2.5) in scalars
  assert ("train/moe/layer_01/x/00", 5, 0.25) in scalars
  assert ("train/moe/layer_01/x/01", 5, 0.75) in scalars
  assert any(
    t == "train/loss" and s == 6 and math.isnan(v) for t, s, v in scalars
  )


def test_truncate_after_purges_later_tensorboard_steps(tmp_path):
  with MetricWriter(tmp_path) as writer:
    writer.write(5, {"loss": 1.0})
    writer.truncate_after(3)
    writer.write(4, {"loss": 2.0})
  # The second event file starts with a SessionLog START at step 4, which
  # tells TensorBoard to hide the events of step >= 4 from earlier files.
  first, second = _read_events(tmp_path)
  starts = [
    (event.session_log.status, event.step)
    for event in second
    if event.HasField("session_log")
  ]
  assert starts == [(event_pb2.SessionLog.START, 4)]
  assert [e.step for e in first if e.summary.value] == [5]


def _config():
  config = ml_collections.ConfigDict()
  config.seed = 3
  config.data = ml_collections.ConfigDict()
  config.data.domains = ("code", "prose")
  config.data.batch_size = 16
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 3e-3
  config.optimizer.schedule = "cosine"
  config.optimizer.clip = None
  config.optimizer.gated = False
  return config


def test_config_json_round_trips(tmp_path):
  config = _config()
  write_run_info(tmp_path, config)
  loaded = json.loads((tmp_path / "config.json").read_text())
  assert loaded == {
    "seed": 3,
    "data": {"domains": ["code", "prose"], "batch_size": 16},
    "optimizer": {
      "learning_rate": 3e-3,
      "schedule": "cosine",
      "clip": None,
      "gated": False,
    },
  }
  rebuilt = ml_collections.ConfigDict(loaded)
  assert rebuilt.optimizer.learning_rate == config.optimizer.learning_rate


def test_config_with_an_unwritable_value_names_it(tmp_path):
  config = _config()
  config.model = ml_collections.ConfigDict({"init": object()})
  with pytest.raises(TypeError, match=r"config\.model\.init="):
    write_run_info(tmp_path, config)


def test_run_info_records_versions_and_environment(tmp_path):
  import jax

  import moe_jax

  info = write_run_info(tmp_path, _config())
  assert json.loads((tmp_path / "run_info.json").read_text()) == info
  assert info["moe_jax_version"] == moe_jax.__version__
  assert info["versions"]["jax"] == jax.__version__
  assert set(info["versions"]) == {
    "python",
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax.checkpoint",
    "numpy",
  }
  assert info["backend"] == jax.default_backend()
  assert info["device_count"] == jax.device_count()
  assert info["device_kinds"] and all(info["device_kinds"])
  assert info["command"] and isinstance(info["command"], list)
  assert info["start_time_utc"].endswith("+00:00")
  assert info["git"] is None or set(info["git"]) == {"revision", "dirty"}


def test_git_revision_outside_a_checkout_is_none(tmp_path):
  assert writers.git_revision(str(tmp_path)) is None


def test_git_revision_without_git_is_none(tmp_path, monkeypatch):
  monkeypatch.setenv("PATH", str(tmp_path))
  assert writers.git_revision(str(tmp_path)) is None


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_revision_of_a_checkout(tmp_path):
  def git(*args):
    config = "-c user.name=t -c user.email=t@t -c commit.gpgsign=false"
    command = ["git", *config.split(), *args]
    done = subprocess.run(
      command, cwd=tmp_path, check=True, capture_output=True
    )
    return done.stdout.decode().strip()

  package = tmp_path / "pkg"
  package.mkdir()
  (package / "a.py").write_text("x = 1\n")
  git("init", "-q")
  assert writers.git_revision(str(package)) is None  # not tracked
  git("add", "pkg/a.py")
  assert writers.git_revision(str(package)) is None  # no commit yet
  git("commit", "-q", "-m", "first")
  sha = git("rev-parse", "HEAD")
  assert writers.git_revision(str(package)) == {"revision": sha, "dirty": False}
  (tmp_path / "untracked.txt").write_text("ignored by 'dirty'\n")
  assert writers.git_revision(str(package))["dirty"] is False
  (package / "a.py").write_text("x = 2\n")
  assert writers.git_revision(str(package))["dirty"] is True


def test_truncate_after_zero_starts_a_log_over(tmp_path):
  """A launch stopped before its first checkpoint: the next one truncates to
  step 0, so the log holds only what it writes itself; TensorBoard's next
  file hides the old events from step 1 on."""
  with MetricWriter(tmp_path) as writer:
    assert writer.truncate_after(0) == 0  # a fresh workdir: nothing to hide
    writer.write(50, {"loss": 1.0})
    writer.write(100, {"loss": 2.0})
  with MetricWriter(tmp_path) as writer:
    assert writer.truncate_after(0) == 2
    writer.write(50, {"loss": 3.0})
  assert read_metrics(tmp_path) == [{"step": 50, "loss": 3.0}]
  first, second = _read_events(tmp_path)
  assert not [e for e in first if e.HasField("session_log")]
  assert [
    (e.session_log.status, e.step) for e in second if e.HasField("session_log")
  ] == [(event_pb2.SessionLog.START, 1)]


def test_write_event_is_a_jsonl_row_only(tmp_path):
  with MetricWriter(tmp_path) as writer:
    writer.write_event(20, "diverged", terms=["lm_loss", "grad_norm"])
  assert read_metrics(tmp_path) == [
    {"step": 20, "event": "diverged", "terms": ["lm_loss", "grad_norm"]}
  ]
  assert not (tmp_path / "tensorboard").exists()


def test_flatten_config_gives_json_leaves_under_dotted_keys():
  assert writers.flatten_config(_config()) == {
    "seed": 3,
    "data.domains": ["code", "prose"],
    "data.batch_size": 16,
    "optimizer.learning_rate": 3e-3,
    "optimizer.schedule": "cosine",
    "optimizer.clip": None,
    "optimizer.gated": False,
  }


def test_check_config_change(tmp_path):
  """Same config: nothing to record. A changed safe key needs
  allow_config_change; keys only one side has (moe_jax gained or dropped
  them) are accepted and returned; an unsafe key in `allow` is refused."""
  assert writers.check_config_change(tmp_path, _config()) == []  # no run
  write_run_info(tmp_path, _config())
  assert writers.check_config_change(tmp_path, _config()) == []
  longer = _config()
  longer.train = ml_collections.ConfigDict({"num_steps": 9})  # a new key
  del longer.optimizer["gated"]
  longer.data.batch_size = 32
  with pytest.raises(
    errors.ConfigError,
    match=r"data\.batch_size: 16 in the workdir, 32 now\. data\.batch_size "
    r"cannot change within a run",
  ):
    writers.check_config_change(tmp_path, longer)
  longer.data.batch_size = 16
  assert writers.check_config_change(tmp_path, longer) == [
    writers.ConfigChange("optimizer.gated", False, None, removed=True),
    writers.ConfigChange("train.num_steps", None, 9, added=True),
  ]
  # Which checkpoints stay changes no number of the run: a safe change.
  assert "train.keep_checkpoint_steps" in writers.SAFE_CHANGES
  with pytest.raises(errors.ConfigError, match="names data.seed, which"):
    writers.check_config_change(
      tmp_path, _config(), "train.num_steps,data.seed"
    )
  shorter = _config()
  shorter.optimizer.learning_rate = 1e-3
  with pytest.raises(
    errors.ConfigError, match="optimizer.learning_rate: 0.003"
  ):
    writers.check_config_change(tmp_path, shorter, ["train.num_steps"])


def test_later_launches_append_to_history_and_keep_run_info(tmp_path):
  first = write_run_info(tmp_path, _config())
  run_info = (tmp_path / "run_info.json").read_bytes()
  config_json = (tmp_path / "config.json").read_bytes()
  again = write_run_info(tmp_path, _config(), step=40)
  assert (tmp_path / "config.json").read_bytes() == config_json
  changed = _config()
  changed.seed = 4
  change = writers.ConfigChange("seed", 3, 4)
  write_run_info(tmp_path, changed, step=60, changes=[change])
  assert (tmp_path / "run_info.json").read_bytes() == run_info
  assert json.loads((tmp_path / "run_info.json").read_text()) == first
  assert json.loads((tmp_path / "config.json").read_text())["seed"] == 4
  history = writers.read_history(tmp_path)
  assert [(r["event"], r["step"]) for r in history] == [
    ("launch", 40),
    ("launch", 60),
    ("config_change", 60),
  ]
  assert history[0]["run_info"] == again
  assert {k: history[2][k] for k in ("key", "old", "new")} == {
    "key": "seed",
    "old": 3,
    "new": 4,
  }
  assert history[2]["time"].endswith("+00:00")


def test_check_workdir_leaves_no_directory_behind(tmp_path):
  # A run refused after the check (e.g. a bad init_from) must leave no trace.
  writers.check_workdir(tmp_path / "a" / "b" / "run")
  assert list(tmp_path.iterdir()) == []
  (tmp_path / "file").write_text("x")
  with pytest.raises(errors.ConfigError, match="is a file"):
    writers.check_workdir(tmp_path / "file")
