"""Tests of moe_jax.reproduction: the verdict rule by hand, argument
parsing, run summaries on hand-made metric logs, and every suite's arms and
claims (configs/reproduce/)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moe_jax import reproduction
from moe_jax.models import TransformerConfig
from moe_jax.reproduction import Arm, Claim, Suite

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import reproduce  # noqa: E402
import tiny  # noqa: E402  (pytest puts tests/ on sys.path)

SUITES = reproduce.suite_names()


# ---- the verdict rule ------------------------------------------------------


def test_verdict_one_seed_uses_min_effect():
  # predicted left < right; d = 2.0 - 1.9 = 0.1 > m = 0.05
  got = reproduction.verdict([1.9], [2.0], "<", 0.05)
  assert got["verdict"] == "reproduced"
  assert got["difference"] == pytest.approx(0.1)
  assert got["threshold"] == 0.05
  # d = 0.1 < m = 0.2: inconclusive; the opposite direction beyond m: not
  assert reproduction.verdict([1.9], [2.0], "<", 0.2)["verdict"] == (
    "inconclusive"
  )
  assert reproduction.verdict([2.3], [2.0], "<", 0.2)["verdict"] == (
    "not reproduced"
  )


def test_verdict_seed_noise_by_hand():
  """left 1.0, 1.2 (mean 1.1, std 0.1414); right 1.5, 1.7 (mean 1.6, std
  0.1414): pooled s = 0.1414, 2s = 0.2828; d = 0.5 > 0.2828."""
  got = reproduction.verdict([1.0, 1.2], [1.5, 1.7], "<", 0.01)
  assert got["verdict"] == "reproduced"
  assert got["left_std"] == pytest.approx(math.sqrt(0.02))
  assert got["threshold"] == pytest.approx(2 * math.sqrt(0.02))
  # The same means with a wide spread: 1.0, 3.0 vs 0.5, 2.7 -> s ~ 1.5
  wide = reproduction.verdict([0.1, 2.1], [0.6, 2.6], "<", 0.01)
  assert wide["difference"] == pytest.approx(0.5)
  assert wide["verdict"] == "inconclusive"
  # ">" flips the sign of d
  assert reproduction.verdict([1.6], [1.1], ">", 0.1)["verdict"] == (
    "reproduced"
  )


def test_verdict_missing_and_nonfinite():
  assert reproduction.verdict([], [1.0], "<", 0.1)["verdict"] == "not run"
  assert reproduction.verdict([np.nan], [1.0], "<", 0.1)["verdict"] == (
    "inconclusive"
  )


def test_claim_rejects_bad_direction_and_effect():
  with pytest.raises(ValueError, match="predicted='<='"):
    Claim("x", "t", "s", "p", "eval_loss", "a", "b", "<=", 0.1)
  with pytest.raises(ValueError, match="min_effect=-1"):
    Claim("x", "t", "s", "p", "eval_loss", "a", "b", "<", -1)


def test_suite_checks_claim_arms():
  suite = Suite(
    "s",
    "t",
    "q",
    lambda scale: [Arm("a", "")],
    {"cpu": 1},
    [Claim("x", "t", "s", "p", "eval_loss", "a", "missing", "<", 0.1)],
  )
  with pytest.raises(ValueError, match="names arm 'missing'"):
    suite.arms_at("cpu")


# ---- arguments ---------------------------------------------------------------


def test_parse_arg_types():
  assert reproduction.parse_arg("top_k=2,alpha=1e-2,router=switch,x=True") == {
    "top_k": 2,
    "alpha": 0.01,
    "router": "switch",
    "x": True,
  }
  assert reproduction.parse_arg("") == {}
  with pytest.raises(ValueError, match="not key=value"):
    reproduction.parse_arg("top_k")
  with pytest.raises(ValueError, match="given twice"):
    reproduction.parse_arg("a=1,a=2")


def test_take_args_names_allowed_keys():
  with pytest.raises(
    ValueError, match=r"unknown config argument\(s\) \['tpo_k'\]"
  ):
    reproduction.take_args("tpo_k=2", {"top_k": 1, "scale": "cpu"})
  with pytest.raises(ValueError, match="scale='huge'"):
    reproduction.take_args("scale=huge", {"scale": "cpu"})


# ---- summaries of hand-made logs ---------------------------------------------


def test_count_spikes_by_hand():
  # medians of the 5 before: index 5 -> 2.0 (2.5 > 2.4: spike); index 6 ->
  # median(2,2,2,2,2.5) = 2.0, 2.1 < 2.4: none
  losses = np.array([2.0, 2.0, 2.0, 2.0, 2.0, 2.5, 2.1])
  assert reproduction.count_spikes(losses) == 1
  assert reproduction.count_spikes(losses, ratio=1.3) == 0


def test_train_tokens_per_second_skips_compile_and_eval_intervals():
  config = {
    "data": {"batch_size": 2, "seq_len": 5},
    "train": {"eval_every": 20},
  }
  rows = [
    {"step": 10, "train/seconds_since_last_log": 50.0},  # compiles
    {"step": 20, "train/seconds_since_last_log": 1.0},  # 100 tokens/s
    {"step": 30, "train/seconds_since_last_log": 9.0},  # starts at eval 20
    {"step": 40, "train/seconds_since_last_log": 0.5},  # 200 tokens/s
    {"step": 50, "train/seconds_since_last_log": 9.0},  # starts at eval 40
    {"step": 60, "train/seconds_since_last_log": 0.25},  # 400 tokens/s
  ]
  assert reproduction.train_tokens_per_second(rows, config) == 200.0


def _write_run(path, rows, eval_every=10):
  path.mkdir(parents=True)
  config = {
    "data": {"batch_size": 1, "seq_len": 10},
    "train": {"eval_every": eval_every},
  }
  (path / "config.json").write_text(json.dumps(config))
  (path / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")


def test_summarize_run_averages_layers(tmp_path):
  rows = [
    {
      "step": 5,
      "train/lm_loss": 3.0,
      "train/seconds_since_last_log": 2.0,
      "train/moe/layer_01/router_logit_max_abs": 4.0,
      "train/moe/layer_03/router_logit_max_abs": 6.0,
    },
    {
      "step": 10,
      "train/lm_loss": 2.0,
      "train/seconds_since_last_log": 1.0,
      "train/moe/layer_01/router_logit_max_abs": 9.0,
      "train/moe/layer_03/router_logit_max_abs": 1.0,
    },
    {
      "step": 10,
      "eval/lm_loss": 1.5,
      "eval/moe/layer_01/load_cv": 0.2,
      "eval/moe/layer_03/load_cv": 0.4,
      "eval/moe/layer_01/drop_fraction": 0.0,
      "eval/moe/layer_03/drop_fraction": 0.1,
    },
  ]
  _write_run(tmp_path / "r", rows)
  s = reproduction.summarize_run(str(tmp_path / "r"))
  assert s["eval_loss"] == 1.5 and s["eval_step"] == 10
  assert s["load_cv"] == pytest.approx(0.3) and s["load_cv_worst"] == 0.4
  assert s["drop_fraction"] == pytest.approx(0.05)
  assert s["train_loss"] == pytest.approx(2.5)  # mean of the logged 3.0, 2.0
  # per step: layer mean 5.0 then 5.0; the largest mean
  assert s["max_router_logit"] == 5.0
  # 5 steps x 10 tokens in 1 s (the first interval compiles)
  assert s["tokens_per_second"] == 50.0


def test_series_averages_layers_per_step():
  rows = [
    {"step": 1, "train/moe/layer_01/x": 1.0, "train/moe/layer_03/x": 3.0},
    {"step": 2, "eval/lm_loss": 2.0},
    {"step": 3, "train/moe/layer_01/x": 5.0, "train/moe/layer_03/x": 7.0},
  ]
  steps, values = reproduction.series(rows, "train/moe/*/x")
  assert steps.tolist() == [1, 3] and values.tolist() == [2.0, 6.0]


def test_series_keeps_the_restarted_runs_rows():
  # A run killed before its first checkpoint and restarted logged 10, 20, 10,
  # 20, 30: the second 10 and 20 supersede the first.
  rows = [
    {"step": step, "train/loss": loss}
    for step, loss in [(10, 5.0), (20, 4.0), (10, 5.5), (20, 4.5), (30, 4.2)]
  ]
  steps, values = reproduction.series(rows, "train/loss")
  assert steps.tolist() == [10, 20, 30]
  assert values.tolist() == [5.5, 4.5, 4.2]


# ---- every suite -------------------------------------------------------------


def test_there_are_suites():
  assert {
    "switch_balance",
    "switch_capacity",
    "switch_experts",
    "switch_init_precision",
    "glam",
    "st_moe_zloss",
    "loss_free",
    "expert_choice_causality",
  } <= set(SUITES)


@pytest.mark.parametrize("name", SUITES)
@pytest.mark.parametrize("scale", reproduction.SCALES)
def test_every_arm_builds_at_every_scale(name, scale):
  """Each arm's config validates (MoeConfig checks every field) and has
  the scale's step count; claims name existing arms and known metrics."""
  module = reproduce.load_suite(name)
  suite = module.SUITE
  arms = suite.arms_at(scale)
  assert arms
  for arm in arms:
    config = module.get_config(f"{arm.args},scale={scale},seed=1")
    assert config.seed == 1
    steps = getattr(module, "steps_of", lambda args, scale: None)(
      arm.args, scale
    )
    assert config.train.num_steps == (steps or module.STEPS[scale])
    TransformerConfig.from_config(config, 256)  # validates the MoE config
  evals = {a.name: a.evals for a in suite.arms_at(scale)}
  for claim in suite.claims:
    sides = (
      (claim.left, claim.metric),
      (claim.right, claim.right_metric or claim.metric),
    )
    for arm_name, metric in sides:
      if "@" in metric and arm_name in evals:  # smoke runs fewer arms
        assert metric.split("@")[1] in evals[arm_name], (claim.id, arm_name)
    for metric in (claim.metric, claim.right_metric or claim.metric):
      base = metric.split("@")[0]
      assert base in suite.derived or base in (
        "eval_loss",
        "train_loss",
        "loss_spikes",
        "stable",
        "max_router_logit",
        "tokens_per_second",
        *reproduction.LAYER_METRICS,
      ), (claim.id, metric)


# ---- the runner ---------------------------------------------------------


def _reproduce(args: list[str]) -> str:
  """stdout of `python experiments/reproduce.py ARGS` in a subprocess that
  compiles at LLVM -O0 (`--xla_backend_optimization_level=0`). The smoke
  sweep builds about 100 programs and runs each for a few steps, so most of
  its time is compiling: -O0 builds the same programs about a third faster,
  with float results that differ in rounding only."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
    env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
  )
  env["PYTHONPATH"] = os.pathsep.join(
    [str(REPO), *filter(None, [env.get("PYTHONPATH")])]
  )
  done = subprocess.run(
    [sys.executable, str(REPO / "experiments" / "reproduce.py"), *args],
    env=env,
    capture_output=True,
    text=True,
  )
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  return done.stdout


def test_smoke_all_suites(tmp_path):
  """`experiments/reproduce.py --suite=all --scale=smoke`: every suite
  trains its smoke arms, evaluates, writes results.json, report.md and
  plots; a second call finds everything done, trains nothing and leaves
  the reports as they are."""
  args = [
    "--suite=all",
    "--scale=smoke",
    f"--results={tmp_path / 'results'}",
    f"--runs={tmp_path / 'runs'}",
    "--no_probe",
  ]
  first = _reproduce(args)
  for name in SUITES:
    assert f"[{name}] " in first and "is current" not in first, name
  for name in SUITES:
    out = tmp_path / "results" / name
    results = json.loads((out / "results.json").read_text())
    suite = reproduce.load_suite(name).SUITE
    ran = {(r["arm"], r["seed"]) for r in results["runs"]}
    assert ran == {(a.name, 0) for a in suite.arms_at("smoke")}, name
    assert all(r["status"] == "finished" for r in results["runs"]), name
    assert all(np.isfinite(r["summary"]["eval_loss"]) for r in results["runs"])
    report = (out / "report.md").read_text()
    assert "## Verdict rule (fixed before the runs)" in report
    for claim in suite.claims:
      assert f"| {claim.id} |" in report
    assert (out / "00_eval_lm_loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "![Validation loss over training](00_eval_lm_loss.png)" in report
  for arm in reproduce.load_suite("switch_capacity").SUITE.arms_at("smoke"):
    assert any(
      "eval_loss@cf2" in r["summary"]
      for r in json.loads(
        (tmp_path / "results" / "switch_capacity" / "results.json").read_text()
      )["runs"]
      if r["arm"] == arm.name
    )
  for name in ("upcycle", "finetune"):
    _check_sources_trained_first(name, tmp_path)
  # Smoke arms skip the trainer's summary.png (train.summary_plot=False).
  workdirs = [p.parent for p in (tmp_path / "runs").rglob("metrics.jsonl")]
  results = [tmp_path / "results" / n / "results.json" for n in SUITES]
  runs = sum(len(json.loads(p.read_text())["runs"]) for p in results)
  assert len(workdirs) >= runs
  assert not [w for w in workdirs if (w / "summary.png").exists()]
  written = {
    p: p.stat().st_mtime_ns for p in (tmp_path / "results").rglob("*.*")
  }
  second = _reproduce(args)
  assert " seed 0: " not in second, "a finished arm was trained again"
  for name in SUITES:
    assert f"[{name}] report is current" in second, name
  assert written == {
    p: p.stat().st_mtime_ns for p in (tmp_path / "results").rglob("*.*")
  }, "a report was rewritten with nothing new"


def _check_sources_trained_first(name, tmp_path):
  """In the smoke sweep of a suite whose arms start from other arms, the
  sources trained first and each dependent started from its source's last
  checkpoint (its run_info.json)."""
  runs = tmp_path / "runs"
  module = reproduce.load_suite(name)
  results = json.loads(
    (tmp_path / "results" / name / "results.json").read_text()
  )
  arms = module.SUITE.arms_at("smoke")
  assert [r["arm"] for r in results["runs"]] == [a.name for a in arms]
  for arm in arms:
    run = next(r for r in results["runs"] if r["arm"] == arm.name)
    info = json.loads(
      (
        runs / "smoke" / name / arm.name / "seed_0" / "run_info.json"
      ).read_text()
    )
    if arm.init_from:
      source = runs / "smoke" / name / arm.init_from / "seed_0"
      got = info["init_from"]
      assert got["source"].startswith(str(source / "checkpoints"))
      assert got["source_step"] == module.steps_of(
        f"arm={arm.init_from}", "smoke"
      )
      assert got["upcycled"] == (arm.name == "upcycled")
    for key in arm.evals:
      assert np.isfinite(run["summary"][f"eval_loss@{key}"])


def test_plan_prints_predicted_costs(tmp_path, capsys):
  reproduce.main(
    [
      "--suite=switch_balance",
      "--scale=smoke",
      "--plan",
      f"--results={tmp_path}",
      f"--runs={tmp_path}",
    ]
  )
  out = capsys.readouterr().out
  assert "predicted cost of switch_balance (smoke):" in out
  assert "top1_alpha0 " in out and " steps x " in out
  assert "min predicted for 2 runs" in out
  assert "predicted total: " in out


def test_a_diverged_run_is_a_result(tmp_path, monkeypatch):
  """A FloatingPointError from the trainer is recorded as "diverged at step
  N", with the metrics logged before it, and stable = 0."""
  from moe_jax import train

  workdir = tmp_path / "run"
  _write_run(
    workdir,
    [
      {"step": 10, "train/lm_loss": 3.0, "train/seconds_since_last_log": 1.0},
    ],
  )

  def diverge(config, workdir):
    raise FloatingPointError("loss is nan at step 20.")

  monkeypatch.setattr(train, "train_and_evaluate", diverge)
  module = reproduce.load_suite("st_moe_zloss")
  arm = module.SUITE.arms_at("smoke")[0]
  job = reproduce.Job(arm, 0, f"{arm.args},scale=smoke,seed=0", "c", workdir)
  record = reproduce.run_job(module, job)
  assert record["status"] == "diverged" and record["diverged_step"] == 20
  assert record["summary"]["stable"] == 0.0
  assert "eval_loss" not in record["summary"]


def test_a_workdir_of_another_config_is_skipped_not_recorded(
  tmp_path, monkeypatch, capsys
):
  """The trainer refusing a workdir (its config.json differs from the arm's)
  leaves the job unrecorded, so the sweep goes on and a later one retries."""
  from moe_jax import errors, train

  def refuse(config, workdir):
    raise errors.ConfigError("train.num_steps: 400 in the workdir, 600 now")

  monkeypatch.setattr(train, "train_and_evaluate", refuse)
  module = reproduce.load_suite("st_moe_zloss")
  arm = module.SUITE.arms_at("smoke")[0]
  job = reproduce.Job(arm, 0, f"{arm.args},scale=smoke,seed=0", "c", tmp_path)
  assert reproduce.run_job(module, job) is None
  out = capsys.readouterr().out
  assert "skipped: train.num_steps: 400 in the workdir" in out


@pytest.mark.parametrize("name", SUITES)
def test_gpu_scale_arm_trains_one_step_at_reduced_size(name, tmp_path):
  """The gpu-scale config of each suite's first arm (bf16 activations,
  float32 router, the suite's routing), shrunk to CPU size, takes one
  training step with a finite loss."""
  module = reproduce.load_suite(name)
  arm = module.SUITE.arms_at("gpu")[0]
  config = module.get_config(f"{arm.args},scale=gpu,seed=0")
  assert config.model.dtype == "bfloat16"
  assert config.model.moe.router_dtype == "float32"
  assert config.data.seq_len == 1024 and config.model.d_model == 768
  tiny.shrink(config, tmp_path)
  if config.model.moe.num_experts:
    config.model.moe.num_experts = module.get_config(
      arm.args
    ).model.moe.num_experts
    config.model.moe.expert_dim = min(config.model.moe.expert_dim, 64)
    config.model.moe.shared_expert_dim = min(
      config.model.moe.shared_expert_dim, 64
    )
  config.model.moe.group_size = 64
  rows = tiny.train_briefly(config, 1)
  assert np.isfinite(rows[0]["loss"])


# ---- arms that start from other arms (Arm.init_from) -------------------------


def _chain_suite(claims=None):
  return Suite(
    "chain",
    "t",
    "q",
    lambda scale: [
      Arm("a", "x=1"),
      Arm("b", "x=2", init_from="a"),
      Arm("c", "x=3", init_from="b"),
      Arm("d", "x=4"),
    ],
    {"smoke": 1, "cpu": 2},
    claims or [Claim("k", "t", "s", "p", "eval_loss", "c", "d", "<", 0.1)],
  )


def test_depend_smoke_keeps_the_sources_in_order():
  # the first claim compares c and d; c starts from b, b from a
  assert [a.name for a in _chain_suite().arms_at("smoke")] == [
    "a",
    "b",
    "c",
    "d",
  ]
  other = [Claim("k", "t", "s", "p", "eval_loss", "a", "d", "<", 0.1)]
  assert [a.name for a in _chain_suite(other).arms_at("smoke")] == ["a", "d"]


def test_depend_source_must_be_listed_before():
  suite = Suite(
    "s",
    "t",
    "q",
    lambda scale: [Arm("b", "", init_from="a"), Arm("a", "")],
    {"cpu": 1},
    [],
  )
  with pytest.raises(ValueError, match="init_from='a', which is not an arm"):
    suite.arms_at("cpu")
  typo = Suite("s", "t", "q", lambda s: [Arm("b", "", init_from="z")], {}, [])
  with pytest.raises(ValueError, match="init_from='z'"):
    typo.arms_at("cpu")


def test_depend_jobs_name_the_source_workdir(tmp_path):
  module = reproduce.load_suite("upcycle")
  jobs = reproduce.jobs_of(module, "cpu", 2, tmp_path)
  by = {(j.arm.name, j.seed): j for j in jobs}
  source = tmp_path / "cpu" / "upcycle" / "dense_pretrain" / "seed_1"
  assert by[("dense_pretrain", 1)].workdir == source
  assert by[("upcycled", 1)].arg.endswith(f",init_from={source}")
  config = module.get_config(by[("upcycled", 1)].arg)
  assert config.init_from == str(source) and config.init_upcycle
  assert config.seed == 1 and config.model.moe.num_experts == 8
  dense = module.get_config(by[("dense_continue", 1)].arg)
  assert dense.init_from == str(source) and not dense.init_upcycle
  assert "init_from" not in by[("moe_scratch", 1)].arg
  with pytest.raises(SystemExit, match="cannot be passed as init_from"):
    reproduce.jobs_of(module, "cpu", 1, tmp_path / "a,b")


def test_depend_waits_for_an_unfinished_source(tmp_path, monkeypatch, capsys):
  """A source that diverged is recorded; its dependents are not run (a
  later sweep tries them again)."""
  ran = []

  def fake_run(module, job):
    ran.append(job.arm.name)
    return {
      "arm": job.arm.name,
      "seed": job.seed,
      "config": job.config_path,
      "workdir": str(job.workdir),
      "status": "diverged" if job.arm.name == "dense_pretrain" else "finished",
      "seconds": 0.0,
      "summary": {},
    }

  monkeypatch.setattr(reproduce, "run_job", fake_run)
  reproduce.main(
    [
      "--suite=upcycle",
      "--scale=smoke",
      "--no_probe",
      f"--results={tmp_path / 'results'}",
      f"--runs={tmp_path / 'runs'}",
    ]
  )
  assert ran == ["dense_pretrain"]
  out = capsys.readouterr().out
  assert "upcycled seed 0 waits: the run it starts from, dense_pretrain" in out


def _two_arm_suite(metric, predicted="<"):
  """Arms a and b and one claim on `metric`."""
  return Suite(
    "s",
    "t",
    "q",
    lambda scale: [Arm("a", ""), Arm("b", "")],
    {"smoke": 1},
    [Claim("k", "t", "s", "p", metric, "a", "b", predicted, 0.1)],
  )


def _run(arm, status="finished", **summary):
  return {"arm": arm, "seed": 0, "status": status, "summary": summary}


def test_a_claim_metric_no_finished_run_has_is_an_error():
  """A claim reading a metric that evaluation does not write would read
  "inconclusive" whatever the runs measured (F4 once read `max_violation`,
  which only training logs): decide() names it. A diverged run has no
  values and stays a result."""
  suite = _two_arm_suite("max_violation")
  summary = {"eval_loss": 2.0, "max_violation_global": 0.5}
  results = {"runs": [_run("a", **summary), _run("b", **summary)]}
  with pytest.raises(ValueError, match="'max_violation'.*finished run a"):
    reproduce.decide(suite, results)
  results["runs"][0] = _run("a", "diverged")
  with pytest.raises(ValueError, match="finished run b"):
    reproduce.decide(suite, results)
  results["runs"][1] = _run("b", "diverged")
  (row,) = reproduce.decide(suite, results)
  assert row["verdict"] == "inconclusive"


def test_a_claim_metric_of_none_reads_nan_not_an_error():
  """tokens/s is None when a run has no timed interval: the claim is
  inconclusive, the sweep goes on."""
  suite = _two_arm_suite("tokens_per_second", ">")
  runs = [_run(arm, tokens_per_second=None) for arm in ("a", "b")]
  (row,) = reproduce.decide(suite, {"runs": runs})
  assert row["verdict"] == "inconclusive"
