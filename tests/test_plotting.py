"""Tests for moe_jax.plotting: valid PNGs for MoE, dense and empty runs."""

import numpy as np
import pytest

from moe_jax.plotting import last_expert_load, plot_run, series
from moe_jax.writers import MetricWriter

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_moe_run(workdir):
  with MetricWriter(workdir, tensorboard=False) as writer:
    for step in (0, 10, 20):
      writer.write(
        step,
        {
          "train/lm_loss": 5.0 - 0.1 * step,
          "train/moe/layer_01/drop_fraction": 0.2 - 0.005 * step,
          "train/moe/layer_03/drop_fraction": 0.1,
          "train/moe/layer_01/expert_fraction": [0.25] * 4,
        },
      )
    writer.write(
      20,
      {
        "eval/lm_loss": 3.5,
        "eval/unigram_baseline": 4.2,
        "eval/moe/layer_03/expert_fraction": [0.4, 0.3, 0.2, 0.1],
        "eval/moe/layer_01/expert_fraction": [0.25, 0.25, 0.5, 0.0],
      },
    )
    writer.write(30, {"train/lm_loss": 2.0})


def _assert_png(path):
  data = open(path, "rb").read()
  assert data[:8] == PNG_MAGIC
  assert len(data) > 1000


def test_moe_run_gives_a_png_at_the_default_path(tmp_path):
  _write_moe_run(tmp_path)
  path = plot_run(tmp_path)
  assert path == str(tmp_path / "summary.png")
  _assert_png(path)


def test_dense_run_gives_a_png(tmp_path):
  with MetricWriter(tmp_path, tensorboard=False) as writer:
    writer.write(0, {"train/lm_loss": 5.0, "train/loss": 5.0})
    writer.write(10, {"train/lm_loss": 4.0, "eval/lm_loss": 4.5})
  _assert_png(plot_run(tmp_path))


def test_empty_run_gives_a_png_at_a_chosen_path(tmp_path):
  MetricWriter(tmp_path, tensorboard=False).close()
  path = plot_run(tmp_path, path=str(tmp_path / "other.png"))
  assert path == str(tmp_path / "other.png")
  _assert_png(path)


def test_missing_metrics_file_is_an_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
    plot_run(tmp_path)


def test_last_expert_load_takes_the_newest_eval_row(tmp_path):
  rows = [
    {"step": 10, "eval/moe/layer_01/expert_fraction": [1.0, 0.0]},
    {
      "step": 20,
      "eval/moe/layer_05/expert_fraction": [0.5, None],
      "eval/moe/layer_01/expert_fraction": [0.75, 0.25],
      "train/moe/layer_01/expert_fraction": [0.0, 1.0],  # not eval: ignored
    },
    {"step": 30, "train/lm_loss": 1.0},
  ]
  step, layers, load_LE = last_expert_load(rows)
  assert step == 20
  assert layers == [1, 5]  # sorted by layer, not by key order
  np.testing.assert_array_equal(load_LE, [[0.75, 0.25], [0.5, np.nan]])
  assert last_expert_load([{"step": 1, "train/lm_loss": 2.0}]) is None


def test_series_skips_rows_without_the_key_and_nulls():
  rows = [
    {"step": 1, "eval/lm_loss": 3.0},
    {"step": 2},
    {"step": 3, "eval/lm_loss": None},
    {"step": 4, "eval/lm_loss": 2.5},
  ]
  steps, values = series(rows, "eval/lm_loss")
  np.testing.assert_array_equal(steps, [1, 4])
  np.testing.assert_array_equal(values, [3.0, 2.5])
