"""Tests of the scripts in experiments/: compare_runs on hand-made run
directories, and the benchmarks run once at their smallest sizes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
sys.path.insert(0, str(REPO / "configs"))
import bench_all_to_all  # noqa: E402
import bench_moe_layer  # noqa: E402
import bench_train_step  # noqa: E402
import compare_runs  # noqa: E402
import switch_top1  # noqa: E402


def _fake_run(path: Path, num_experts: int):
  path.mkdir()
  config = {
    "model": {
      "moe": {"num_experts": num_experts, "top_k": 1, "router": "switch"}
    },
    "data": {"batch_size": 2, "seq_len": 8},
  }
  (path / "config.json").write_text(json.dumps(config))
  rows = [
    {"step": 10, "train/seconds_since_last_log": 9.0},  # includes compile
    {"step": 20, "train/seconds_since_last_log": 2.0},
    {"step": 30, "train/seconds_since_last_log": 3.0},
    {
      "step": 30,
      "eval/lm_loss": 1.5,
      "eval/unigram_baseline": 3.0,
      "eval/moe/layer_01/drop_fraction": 0.1,
      "eval/moe/layer_03/drop_fraction": 0.3,
      "eval/moe/layer_01/max_violation_batch": 0.6,
      "eval/moe/layer_03/max_violation_batch": 0.4,
      "eval/moe/layer_01/max_violation_global": 0.2,
      "eval/moe/layer_03/max_violation_global": 0.1,
    },
  ]
  (path / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")


def test_summarize_reads_last_eval_and_throughput(tmp_path):
  _fake_run(tmp_path / "moe", 8)
  s = compare_runs.summarize(str(tmp_path / "moe"))
  assert s["/ unigram"] == pytest.approx(0.5)  # 1.5 / 3.0
  assert s["drop_fraction"] == pytest.approx((0.2, 0.3))  # mean, worst
  assert s["max_violation_batch"] == pytest.approx((0.5, 0.6))
  assert s["max_violation_global"] == pytest.approx((0.15, 0.2))
  assert s["load_cv"] is None
  # The first interval (compilation) is skipped; 10 steps of 2 x 8 tokens
  # in 2 s and in 3 s: 80 and 53.3 tokens/s, median 66.7.
  assert s["tokens/s"] == pytest.approx((80 + 160 / 3) / 2)


def test_summarize_reads_a_run_logged_before_the_maxvio_split(tmp_path):
  """Older runs logged only eval/.../max_violation, the mean of the eval
  batches' MaxVio: read as max_violation_batch, with no global value."""
  _fake_run(tmp_path / "old", 8)
  path = tmp_path / "old" / "metrics.jsonl"
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  for key in list(rows[-1]):
    if "max_violation" in key:
      del rows[-1][key]
  rows[-1]["eval/moe/layer_01/max_violation"] = 0.9
  path.write_text("\n".join(map(json.dumps, rows)) + "\n")
  s = compare_runs.summarize(str(tmp_path / "old"))
  assert s["max_violation_batch"] == pytest.approx((0.9, 0.9))
  assert s["max_violation_global"] is None


def test_command_line_prints_a_table(tmp_path):
  _fake_run(tmp_path / "moe", 8)
  _fake_run(tmp_path / "dense", 0)
  out = subprocess.run(
    [
      sys.executable,
      str(REPO / "experiments" / "compare_runs.py"),
      str(tmp_path / "moe"),
      str(tmp_path / "dense"),
      f"--plot={tmp_path / 'cmp.png'}",
    ],
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  # The runs differ in num_experts only: it becomes a column.
  assert "| moe | 1 | 8 | switch | 8/1 | 30 | 1.500 | 0.500 |" in out
  assert "| dense | 1 | 0 | dense | - |" in out
  assert (tmp_path / "cmp.png").read_bytes()[:4] == b"\x89PNG"


def test_all_to_all_formula_by_hand():
  """8 x 128 tokens in groups of 512: G = 2, S = 512; C = ceil(1.25 * 512 / 8)
  = 80 (Switch rule); E = 8, D = 128, float32; MoE in blocks 1 and 3. On a
  (1, 2, 1) mesh each device holds G/2 = 1 group: 8 * 1 * 80 * 128 = 81,920
  elements per buffer, 4 buffers x 2 layers = 655,360 elements = 2,621,440
  bytes of operands, of which 1/2 leaves the device."""
  config = switch_top1.get_config()
  config.data.batch_size = 8
  f = bench_all_to_all.formula(config, (1, 2, 1))
  assert (f["G"], f["C"], f["layers"]) == (2, 80, 2)
  assert f["operand_elements_per_device"] == 655_360
  assert f["operand_bytes_per_device"] == 2_621_440
  assert f["sent_bytes_per_device"] == 1_310_720
  assert f["sent_bytes_total"] == 2 * 1_310_720


def test_hlo_all_to_all_sums_tuple_parts():
  hlo = """
  %a = f32[2,8]{1,0} add(f32[2,8] %x, f32[2,8] %y)
  %all-to-all = (f32[2,2,3,16]{3,2,1,0}, f32[2,2,3,16]{3,2,1,0}) all-to-all(%p, %q), channel_id=1
  %all-to-all.1 = bf16[4,16]{1,0} all-to-all(%r), dimensions={0}
  %all-gather = f32[16]{0} all-gather(%s), dimensions={0}
  """  # noqa: E501
  got = bench_all_to_all.hlo_all_to_all(hlo)
  assert got["elements"] == 2 * 2 * 2 * 3 * 16 + 4 * 16  # 384 + 64
  assert got["bytes"] == 384 * 4 + 64 * 2
  assert got["dtypes"] == ["bf16", "f32"]
  counts = bench_all_to_all.hlo_collectives(hlo)
  assert counts["all-to-all"] == 2 and counts["all-gather"] == 1


def test_bench_all_to_all_command_line_matches_the_hlo(tmp_path):
  """The cost line of a tiny config on 4 simulated devices; the compiled
  step's all-to-all operands must match the formula element for element."""
  out = subprocess.run(
    [
      sys.executable,
      str(REPO / "experiments" / "bench_all_to_all.py"),
      f"--config={REPO / 'configs' / 'switch_top1.py'}",
      "--config.mesh.shape=(1,4,1)",
      "--config.data.seq_len=32",
      "--config.data.batch_size=8",
      "--config.model.d_model=32",
      "--config.model.num_layers=2",
      "--config.model.moe.expert_dim=32",
      "--config.model.moe.group_size=64",
    ],
    capture_output=True,
    text=True,
    cwd=tmp_path,
    timeout=300,
    env=dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      XLA_FLAGS="--xla_force_host_platform_device_count=4",
      PYTHONPATH=os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
      ),
    ),
  )
  assert out.returncode == 0, out.stderr[-3000:]
  # 8 x 32 tokens in groups of 64: G = 4, C = ceil(1.25 * 64 / 8) = 10; one
  # group per device, one MoE layer (block 1 of 2): 4 buffers x 8 x 1 x 10 x
  # 32 x 4 bytes = 40,960 bytes; 3/4 of them leave the device.
  assert "1 MoE layers x 4 buffers [E=8, G=4, C=10, D=32]" in out.stdout
  assert "0.04 MB operands per device, 0.03 MB leave each" in out.stdout
  assert "(elements match)" in out.stdout


def test_bench_moe_layer_smoke(tmp_path, capsys):
  """One tiny cell of the grid: every variant is timed, has a memory figure
  and a ratio to the dense FFN; dropless drops nothing."""
  out = tmp_path / "layer.json"
  bench_moe_layer.main(
    [
      "--quick",
      "--experts=4",
      "--top_k=2",
      "--backends=indices,dropless",
      f"--json={out}",
    ]
  )
  records = json.loads(out.read_text())["records"]
  assert [r["variant"] for r in records] == ["dense", "indices", "dropless"]
  for r in records:
    assert r["seconds"] > 0 and r["temp_bytes"] > 0
  assert records[0]["vs_dense"] == 1.0
  assert records[2]["dropped"] == 0.0
  assert "| 512 | 4 | 2 | dropless |" in capsys.readouterr().out


def test_bench_train_step_smoke(tmp_path):
  """A tiny MoE LM and its dense twin each take training steps."""
  out = tmp_path / "train.json"
  bench_train_step.main(["--quick", "--backends=dropless", f"--json={out}"])
  records = json.loads(out.read_text())["records"]
  dense, dropless = records
  assert (dense["variant"], dropless["variant"]) == ("dense", "dropless")
  assert dropless["tokens_per_second"] > 0
  assert dropless["parameters"] > dense["parameters"]


def test_compare_runs_shows_differing_keys_and_groups_seeds(tmp_path):
  """Two seeds of one config become one row (mean ± std); the config key
  that differs between rows is a column; seed is not."""
  for name, experts, seed, loss in (
    ("a0", 8, 0, 1.0),
    ("a1", 8, 1, 2.0),
    ("b0", 4, 0, 3.0),
  ):
    _fake_run(tmp_path / name, experts)
    config = json.loads((tmp_path / name / "config.json").read_text())
    config["seed"] = seed
    (tmp_path / name / "config.json").write_text(json.dumps(config))
    rows = compare_runs.writers.read_metrics(str(tmp_path / name))
    rows[-1]["eval/lm_loss"] = loss
    (tmp_path / name / "metrics.jsonl").write_text(
      "\n".join(map(json.dumps, rows)) + "\n"
    )
  groups = compare_runs.group_seeds(
    [str(tmp_path / n) for n in ("a0", "a1", "b0")]
  )
  assert [g["seeds"] for g in groups] == [2, 1]
  assert [g["model.moe.num_experts"] for g in groups] == [8, 4]
  assert "seed" not in groups[0]
  # mean and sample std of 1.0 and 2.0
  assert groups[0]["eval loss"] == ("±", 1.5, pytest.approx(0.7071, 1e-3))
  table = compare_runs.markdown_table(groups)
  assert "| model.moe.num_experts |" in table.splitlines()[0]
  assert "1.500 ± 0.707" in table
