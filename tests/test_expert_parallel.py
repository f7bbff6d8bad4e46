"""Expert parallelism on simulated CPU devices and on two local processes.

Each multi-device run happens in a subprocess (`XLA_FLAGS=--xla_force_host_
platform_device_count=N`), so this process keeps its single device; the
subprocesses are tests/multidevice_worker.py and `python -m moe_jax.train`.
Compilation dominates: each test compiles a tiny model a few times.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from moe_jax import data, train, writers
from moe_jax.checkpoint import Checkpointer
from moe_jax.models import TransformerConfig, TransformerLM

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "multidevice_worker.py"
sys.path.insert(0, str(REPO / "configs"))
import switch_top1  # noqa: E402

TIMEOUT_S = 300


def _env(devices: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["PYTHONPATH"] = os.pathsep.join(
    [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
  )
  return env


def _run(args, devices: int, cwd) -> subprocess.CompletedProcess:
  done = subprocess.run(
    [sys.executable, *map(str, args)],
    env=_env(devices),
    cwd=cwd,
    capture_output=True,
    text=True,
    timeout=TIMEOUT_S,
  )
  assert done.returncode == 0, (
    f"{args} failed ({done.returncode}):\n{done.stderr[-4000:]}"
  )
  return done


def _result(done: subprocess.CompletedProcess) -> dict:
  lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
  assert lines, f"no RESULT line in:\n{done.stdout[-2000:]}"
  return json.loads(lines[-1][len("RESULT ") :])


def test_expert_parallel_matches_one_device(tmp_path):
  """One train step of a top-2 MoE LM (jitter, random second choice, drops,
  padding, active clipping) on a 2x2x2 (data, expert, model) mesh, with
  shard_map and with GSPMD, against the same step on one device."""
  r = _result(_run([WORKER, "equivalence"], 8, tmp_path))
  for name in ("shard_map", "gspmd"):
    got = r[name]
    # Forward: the same loss; backward: the same clipped gradients. Each
    # expert counts once in the global norm, else the norms would differ.
    np.testing.assert_allclose(*got["loss"], rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(*got["grad_norm"], rtol=1e-5, err_msg=name)
    assert got["grad_norm"][0] > 2 * got["clip_norm"]  # clipping is active
    assert got["gradient_difference"] < 1e-5, (name, got)
    # Per-group capacity: the same tokens are dropped on 8 devices as on 1.
    assert got["drop_fraction"] > 0 and got["drops_identical"], (name, got)
    # The compiled step moves tokens: 2 all-to-alls forward, 2 backward, of
    # the size the formula gives, and never gathers the expert weights.
    assert got["hlo_all_to_all"] == 4, (name, got)
    assert got["hlo_all_gather"] == 0, (name, got)
    assert got["hlo_all_to_all_bytes"] == got["formula_bytes_per_device"]
  shard_map = r["shard_map"]
  assert shard_map["init_identical"]  # sharded init = single-device init
  assert shard_map["routing_identical"]  # experts and kept pairs, exactly
  assert shard_map["gates_difference"] < 1e-6
  assert r["shard_map_vs_gspmd"] < 1e-6


def test_deepseek_bias_balancing_on_a_mesh_matches_one_device(tmp_path):
  """One train step of a DeepSeek-V3 LM on a 2x2x2 mesh: the same loss and
  sequence loss as on one device, and the same updated balancing bias
  (+-u from the global batch's load), replicated on every device."""
  r = _result(_run([WORKER, "deepseek"], 8, tmp_path))
  np.testing.assert_allclose(*r["loss"], rtol=1e-5)
  np.testing.assert_allclose(*r["sequence_loss"], rtol=1e-5)
  assert r["bias"][0] == r["bias"][1]
  np.testing.assert_allclose(np.abs(r["bias"][0]), 0.01)
  assert r["replicated"]
  assert r["gradient_difference"] < 1e-5


# configs/switch_top1.py shrunk to seconds; G = 8 x 32 / 32 = 8 groups.
TINY = {
  "data.max_code_bytes": 300_000,
  "data.seq_len": 32,
  "data.batch_size": 8,
  "data.eval_batch_size": 8,
  "data.num_eval_batches": 1,
  "model.d_model": 32,
  "model.num_layers": 2,
  "model.num_heads": 2,
  "model.mlp_dim": 64,
  "model.moe.expert_dim": 32,
  "model.moe.group_size": 32,
  "optimizer.warmup_steps": 2,
  "train.num_steps": 4,
  "train.log_every": 1,
  "train.eval_every": 4,
  "train.progress_bar": False,
}


def tiny_config(data_dir):
  config = switch_top1.get_config()
  config.update_from_flattened_dict({**TINY, "data.data_dir": str(data_dir)})
  return config


def _overrides(data_dir) -> list[str]:
  """The --config.* flags that make configs/switch_top1.py `tiny_config`."""
  flat = {**TINY, "data.data_dir": data_dir}
  return [f"--config.{k}={v}" for k, v in flat.items()]


@pytest.fixture(scope="session")
def reference(tmp_path_factory, worker_id):
  """The 1-process, 1-device run that the distributed runs must reproduce.

  Trained once per session, also under pytest-xdist (the workers share the
  parent of their temporary directories and take turns by a file lock); it
  also prepares the corpus before any subprocess reads it.
  """
  import fcntl

  root = tmp_path_factory.getbasetemp()
  if worker_id != "master":
    root = root.parent
  config = tiny_config(root / "reference_tfds")
  workdir = root / "reference_run"
  with open(root / "reference.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (workdir / "summary.png").exists():
      train.train_and_evaluate(config, str(workdir))
  return config, workdir


def _rows(workdir, split):
  rows = writers.read_metrics(str(workdir))
  return [r for r in rows if f"{split}/loss" in r]


def _assert_same_run(workdir, reference_workdir):
  """Every logged step has the reference's losses (to rounding) and exactly
  its drop fractions."""
  for split in ("train", "eval"):
    got, expected = _rows(workdir, split), _rows(reference_workdir, split)
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for a, b in zip(got, expected):
      for key in ("loss", "lm_loss", "aux/router_z_loss"):
        key = f"{split}/{key}"
        np.testing.assert_allclose(a[key], b[key], rtol=1e-4, err_msg=key)
      drops = f"{split}/moe/layer_01/drop_fraction"
      assert a[drops] == b[drops], (drops, a["step"])


def _state(config, workdir, layout=None):
  model = TransformerLM(TransformerConfig.from_config(config, data.VOCAB_SIZE))
  tx, _ = train.make_optimizer(config.optimizer, config.train.num_steps)
  batch = {"inputs": np.zeros((config.data.batch_size, config.data.seq_len))}
  template = train.abstract_state(config, model, tx, batch, layout)
  with Checkpointer(
    Path(workdir) / "checkpoints", max_to_keep=5, save_interval_steps=1
  ) as ckpt:
    return ckpt.restore(template)


def test_train_on_eight_devices_and_restore_on_other_meshes(
  tmp_path, reference
):
  """`python -m moe_jax.train --config.mesh.shape=(2,4,1)` on 8 simulated
  devices (einsum dispatch) reproduces the 1-device run; its checkpoint
  restores on 1 device and onto a (1,2,4) mesh, with the same values."""
  config, reference_workdir = reference
  workdir = tmp_path / "mesh_2x4x1"
  _run(
    [
      "-m",
      "moe_jax.train",
      f"--config={REPO / 'configs' / 'switch_top1.py'}",
      f"--workdir={workdir}",
      *_overrides(config.data.data_dir),
      "--config.mesh.shape=(2,4,1)",
      "--config.model.moe.dispatch=einsum",
    ],
    8,
    tmp_path,
  )
  _assert_same_run(workdir, reference_workdir)
  info = json.loads((workdir / "run_info.json").read_text())
  assert info["device_count"] == 8

  # On one device (this process): the 8-device run's state, in full.
  state, data_state = _state(config, workdir)
  expected, expected_data = _state(config, reference_workdir)
  assert data_state == expected_data and int(state.step) == 4
  # atol: the attention key bias has no gradient in exact arithmetic (the
  # softmax ignores a shift), so Adam turns rounding noise there into
  # steps of up to the learning rate (3e-3 x 4 steps of warmup).
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)

  # On another mesh: experts split 2 ways, their hidden units 4 ways.
  out = tmp_path / "restored.npz"
  r = _result(_run([WORKER, "restore", workdir, "1,2,4", out], 8, tmp_path))
  assert r["step"] == 4 and r["shardings_kept"]
  assert r["wi_spec"] == "P('expert', None, 'model')"
  assert r["wi_shard_shape"] == [4, 32, 8]  # [E/2, D, F/4]
  restored = np.load(out)
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  for path, leaf in leaves:
    np.testing.assert_array_equal(
      restored[jax.tree_util.keystr(path)], np.asarray(leaf)
    )


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_agree_with_one_process(tmp_path, reference):
  """Two processes on localhost with 2 CPU devices each (jax.distributed,
  gloo collectives) train a (2,2,1) mesh like the 1-process run."""
  config, reference_workdir = reference
  workdir = tmp_path / "two_processes"
  args = [
    sys.executable,
    "-m",
    "moe_jax.train",
    f"--config={REPO / 'configs' / 'switch_top1.py'}",
    f"--workdir={workdir}",
    # A fresh corpus directory: process 0 prepares it while process 1 waits.
    *_overrides(tmp_path / "tfds"),
    "--config.mesh.shape=(2,2,1)",
    "--distributed",
    f"--coordinator_address=127.0.0.1:{_free_port()}",
    "--num_processes=2",
  ]
  processes = [
    subprocess.Popen(
      [*args, f"--process_id={i}"],
      env=_env(2),
      cwd=tmp_path,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outputs = []
  try:
    for p in processes:
      outputs.append(p.communicate(timeout=TIMEOUT_S)[0])
  except subprocess.TimeoutExpired:
    for p in processes:
      p.kill()
    outputs = [p.communicate()[0] for p in processes]
    pytest.fail(
      f"2-process run timed out after {TIMEOUT_S} s:\n"
      + "\n".join(
        f"--- process {i}:\n{o[-2000:]}" for i, o in enumerate(outputs)
      )
    )
  for i, (p, output) in enumerate(zip(processes, outputs)):
    assert p.returncode == 0, f"process {i} failed:\n{output[-4000:]}"
  assert "2 processes" in outputs[0]
  info = json.loads((workdir / "run_info.json").read_text())
  assert info["process_count"] == 2 and info["device_count"] == 4
  _assert_same_run(workdir, reference_workdir)
  state, _ = _state(config, workdir)
  assert int(state.step) == 4  # both processes wrote their shards
