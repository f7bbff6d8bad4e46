"""Tests of the scripts in experiments/: compare_runs on hand-made run
directories, and the benchmarks run once at their smallest sizes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import bench_moe_layer  # noqa: E402
import bench_train_step  # noqa: E402
import compare_runs  # noqa: E402


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
    },
  ]
  (path / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")


def test_summarize_reads_last_eval_and_throughput(tmp_path):
  _fake_run(tmp_path / "moe", 8)
  s = compare_runs.summarize(str(tmp_path / "moe"))
  assert s["/ unigram"] == pytest.approx(0.5)  # 1.5 / 3.0
  assert s["drop_fraction"] == pytest.approx((0.2, 0.3))  # mean, worst
  assert s["max_violation"] is None
  # 20 steps of 2 x 8 tokens in 2 + 3 seconds (the first interval skipped).
  assert s["tokens/s"] == pytest.approx(20 * 16 / 5.0)


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
  assert "| moe | switch | 8/1 | 30 | 1.500 | 0.500 |" in out
  assert "| dense | dense | - |" in out
  assert (tmp_path / "cmp.png").read_bytes()[:4] == b"\x89PNG"


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
