"""Re-runs the balancing comparisons of the MoE papers and reports each claim.

  python experiments/reproduce.py --suite=switch_balance --scale=cpu
  python experiments/reproduce.py --suite=all --scale=smoke --results=/tmp/r
  python experiments/reproduce.py --suite=loss_free --plan     # costs only
  python experiments/reproduce.py --suite=loss_free --report_only

A suite is a run book in configs/reproduce/<suite>.py (see
`moe_jax.reproduction`). For every arm and seed this script

  1. predicts the cost (steps x the step time measured on a short probe of
     each distinct model shape) and prints it, with the total;
  2. trains it with `moe_jax.train.train_and_evaluate` in
     <runs>/<scale>/<suite>/<arm>/seed_<n>: an arm already finished is
     skipped, an interrupted one resumes from its checkpoint, a diverged one
     is a result ("unstable at step N"), not a crash of the sweep; an arm
     that starts from another (`Arm.init_from`: fine-tuning, upcycling) runs
     after it, with "init_from=<its workdir>" in the config argument, and
     waits (is left for a later sweep) while that run has not finished;
  3. evaluates the checkpoint again under the arm's extra evaluation settings
     (`moe_jax.evaluate`), without retraining;
  4. rewrites <results>/<suite>/results.json, report.md (the verdict rule
     first, then the claims, the arms and the plots) and the PNG plots after
     every arm, so a stopped sweep leaves a readable report (at the smoke
     scale, where an arm takes seconds, the plots are drawn once, at the
     end). A sweep that finds every run done leaves the report as it is;
     `--report_only` redraws it.

Run it in the background for the cpu scale; stop and restart it at will.
"""

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import time
from pathlib import Path

import numpy as np

from moe_jax import errors, reproduction, writers
from moe_jax.reproduction import Suite

REPO = Path(__file__).resolve().parents[1]
SUITE_DIR = REPO / "configs" / "reproduce"


def suite_names() -> list[str]:
  """Every suite: the run books in configs/reproduce/ that define SUITE."""
  names = []
  for path in sorted(SUITE_DIR.glob("*.py")):
    if "SUITE = Suite(" in path.read_text():
      names.append(path.stem)
  return names


def load_suite(name: str):
  """The run book module of `name` (with `get_config` and `SUITE`)."""
  path = SUITE_DIR / f"{name}.py"
  if not path.exists():
    raise SystemExit(
      f"unknown suite {name!r}; allowed: all, {', '.join(suite_names())}."
    )
  spec = importlib.util.spec_from_file_location(f"reproduce_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@dataclasses.dataclass
class Job:
  arm: reproduction.Arm
  seed: int
  arg: str  # the full get_config argument
  config_path: str  # what --config takes to run this job alone
  workdir: Path


def jobs_of(module, scale: str, seeds: int | None, runs: Path) -> list[Job]:
  suite: Suite = module.SUITE
  n = seeds or suite.seeds[scale]
  out = []
  for arm in suite.arms_at(scale):
    for seed in range(n):
      source = ""
      if arm.init_from:
        source = (
          f"init_from={workdir_of(runs, scale, suite, arm.init_from, seed)}"
        )
      arg = ",".join(
        filter(None, [arm.args, f"scale={scale}", f"seed={seed}", source])
      )
      out.append(
        Job(
          arm,
          seed,
          arg,
          f"configs/reproduce/{suite.name}.py:{arg}",
          workdir_of(runs, scale, suite, arm.name, seed),
        )
      )
  return out


def workdir_of(runs: Path, scale: str, suite: Suite, arm: str, seed: int):
  """<runs>/<scale>/<suite>/<arm>/seed_<seed>; a path that the config
  argument cannot carry (a "," or "=" in it) is an error."""
  path = Path(runs) / scale / suite.name / arm / f"seed_{seed}"
  if "," in str(path) or "=" in str(path):
    raise SystemExit(
      f"--runs={runs}: a run directory with ',' or '=' in its path cannot "
      "be passed as init_from in a config argument; choose another --runs."
    )
  return path


# ---------------------------------------------------------------------------
# Cost prediction.

# Keys that change neither the model's shapes nor the step's work.
_COST_IRRELEVANT = {
  "seed",
  "loss",
  "optimizer",
  "train",
  "router_init_scale",
  "bias_update_rate",
  "eval_capacity_factor",
  "eval_router",
  "routing_seed",
  "init_from",
  "init_upcycle",
  "init_restore",
  # which text is read, not the shapes: the same step
  "source",
  "domains",
  "instruction_tasks",
  "validation_fraction",
}


def _shape_signature(config) -> str:
  def strip(d):
    return {
      k: strip(v) if isinstance(v, dict) else v
      for k, v in d.items()
      if k not in _COST_IRRELEVANT
    }

  return json.dumps(strip(config.to_dict()), sort_keys=True, default=str)


def probe_step_seconds(config, steps: int = 4) -> float:
  """Seconds per training step of `config`, timed over `steps` steps after
  two warm-up steps (compilation excluded)."""
  import jax

  from moe_jax import data, train
  from moe_jax.models import TransformerConfig, TransformerLM

  model = TransformerLM(TransformerConfig.from_config(config, data.VOCAB_SIZE))
  tx, schedule = train.make_optimizer(config.optimizer, config.train.num_steps)
  batches = data.create_train_iterator(config.data, seed=config.seed)
  batch = next(batches)
  state = train.init_state(config, model, tx, batch)
  step_fn = jax.jit(train.bind_train_step(config, model, tx, schedule))
  for _ in range(2):
    state, _ = step_fn(state, batch)
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(steps):
    state, _ = step_fn(state, batch)
  jax.block_until_ready(state)
  return (time.perf_counter() - start) / steps


def predict_costs(module, jobs: list[Job], done: set) -> list[tuple]:
  """[(job, steps left, seconds per step)] for the unfinished jobs; one probe
  per distinct model shape."""
  measured, out = {}, []
  for job in jobs:
    if (job.arm.name, job.seed) in done:
      continue
    config = module.get_config(job.arg)
    signature = _shape_signature(config)
    if signature not in measured:
      measured[signature] = probe_step_seconds(config)
    steps = config.train.num_steps - _latest_checkpoint(job.workdir)
    out.append((job, steps, measured[signature]))
  return out


def _latest_checkpoint(workdir: Path) -> int:
  steps = [
    int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()
  ]
  return max(steps, default=0)


def print_costs(suite: str, costs: list[tuple]) -> float:
  total = 0.0
  for job, steps, seconds in costs:
    # +20% for evaluation, checkpoints and compilation.
    cost = 1.2 * steps * seconds
    total += cost
    print(
      f"  {suite:24s} {job.arm.name:26s} seed {job.seed}: {steps:6d} steps x "
      f"{seconds * 1e3:7.1f} ms = {cost / 60:6.1f} min"
    )
  print(f"  {suite}: {total / 60:.1f} min predicted for {len(costs)} runs")
  return total


# ---------------------------------------------------------------------------
# Running.


def run_job(module, job: Job) -> dict | None:
  """Trains (or resumes) one job; returns its record for results.json, or
  None when the trainer refuses the workdir (it holds another config)."""
  from moe_jax import evaluate, train

  config = module.get_config(job.arg)
  start = time.time()
  record = {
    "arm": job.arm.name,
    "seed": job.seed,
    "config": job.config_path,
    "command": (
      f"python -m moe_jax.train --config={job.config_path} "
      f"--workdir={job.workdir}"
    ),
    "workdir": _portable(job.workdir),
  }
  try:
    train.train_and_evaluate(config, str(job.workdir))
    record["status"] = "finished"
  except FloatingPointError as e:  # the trainer stops on a non-finite loss
    step = re.search(r"at step (\d+)", str(e))
    record["status"] = "diverged"
    record["diverged_step"] = int(step.group(1)) if step else None
    record["error"] = str(e)
  except errors.ConfigError as e:  # the workdir holds another config
    print(f"[{job.arm.name} seed {job.seed}] skipped: {e}")
    return None
  record["seconds"] = time.time() - start
  summary = reproduction.summarize_run(str(job.workdir))
  summary["stable"] = float(record["status"] == "finished")
  if record["status"] == "finished":
    for name, overrides in job.arm.evals.items():
      row = evaluate.evaluate_checkpoint(str(job.workdir), overrides)
      for key, value in reproduction.summarize_eval_row(row).items():
        summary[f"{key}@{name}"] = value
  record["summary"] = summary
  return record


def _portable(path: Path) -> str:
  """`path` relative to the repository when inside it (results.json then
  reads the same in any checkout), else absolute."""
  path = Path(path).resolve()
  return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def git_commit() -> str:
  try:
    out = subprocess.run(
      ["git", "rev-parse", "--short", "HEAD"],
      cwd=REPO,
      capture_output=True,
      text=True,
      check=True,
    ).stdout.strip()
    dirty = subprocess.run(
      ["git", "status", "--porcelain", "--untracked-files=no"],
      cwd=REPO,
      capture_output=True,
      text=True,
    ).stdout.strip()
    return out + ("+uncommitted" if dirty else "")
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def load_results(path: Path, suite: str, scale: str) -> dict:
  if path.exists():
    results = json.loads(path.read_text())
    if results["scale"] != scale:
      raise SystemExit(
        f"{path} holds {results['scale']}-scale results; write {scale}-scale "
        "ones elsewhere with --results=DIR."
      )
    return results
  return {"suite": suite, "scale": scale, "runs": []}


def save_json(path: Path, value: dict):
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
  os.replace(tmp, path)


def run_suite(name: str, args) -> dict:
  module = load_suite(name)
  suite: Suite = module.SUITE
  out_dir = Path(args.results) / name
  results_path = out_dir / "results.json"
  results = load_results(results_path, name, args.scale)
  jobs = jobs_of(module, args.scale, args.seeds, Path(args.runs))
  done = {(r["arm"], r["seed"]) for r in results["runs"]}
  # Whether report.md and the plots on disk show results.json as it is.
  current = (out_dir / "report.md").exists() and not args.report_only
  if not args.report_only:
    if args.probe:
      print(f"predicted cost of {name} ({args.scale}):")
      args.predicted_seconds += print_costs(
        name, predict_costs(module, jobs, done)
      )
    if args.plan:
      return results
    for job in jobs:
      if (job.arm.name, job.seed) in done:
        continue
      source = job.arm.init_from
      if source and not _finished(results, source, job.seed):
        print(
          f"[{name}] {job.arm.name} seed {job.seed} waits: the run it "
          f"starts from, {source} seed {job.seed}, has not finished."
        )
        continue
      print(f"[{name}] {job.arm.name} seed {job.seed}: {job.config_path}")
      record = run_job(module, job)
      if record is None:  # left unrecorded: a later sweep tries it again
        continue
      record["commit"] = git_commit()
      results["runs"].append(record)
      results["command"] = " ".join(
        [
          "python experiments/reproduce.py",
          f"--suite={name}",
          f"--scale={args.scale}",
        ]
      )
      save_json(results_path, results)
      # Readable after every arm; smoke arms take seconds, and drawing the
      # plots after each would take longer than the arm: they wait.
      current = args.scale != "smoke"
      write_report(suite, results, out_dir, plots=current)
  if current:
    print(f"[{name}] report is current (--report_only redraws it)")
  else:
    write_report(suite, results, out_dir)
  return results


def _finished(results: dict, arm: str, seed: int) -> bool:
  """Whether results.json holds a finished run of (arm, seed)."""
  return any(
    r["arm"] == arm and r["seed"] == seed and r["status"] == "finished"
    for r in results["runs"]
  )


# ---------------------------------------------------------------------------
# The report.


def values_of(
  results: dict, arm: str, metric: str, derived: dict, required=False
) -> list:
  """The per-seed values of `metric` for `arm`: NaN where a run lacks it.

  Raises:
    ValueError: with `required` (a claim's metric), a finished run's summary
      lacks `metric`: the claim names a metric that evaluation does not
      produce, and would read "inconclusive" whatever the runs measured. A
      run that did not finish (a diverged run has no loss) and a value of
      None (tokens/s without a timed interval) read NaN.
  """
  out = []
  for run in results["runs"]:
    if run["arm"] != arm:
      continue
    summary = run["summary"]
    missing = False
    if metric in derived:
      try:
        value = derived[metric](summary)
      except KeyError:
        value, missing = None, True
      except TypeError:  # a value of None (e.g. no timed interval)
        value = None
    else:
      value = summary.get(metric)
      missing = metric not in summary
    if missing and required and run.get("status") == "finished":
      raise ValueError(
        f"metric {metric!r} is not in the summary of the finished run "
        f"{arm} seed {run.get('seed')}; its metrics: {sorted(summary)}."
      )
    out.append(np.nan if value is None else float(value))
  return out


def decide(suite: Suite, results: dict) -> list[dict]:
  rows = []
  for claim in suite.claims:
    right_metric = claim.right_metric or claim.metric
    left = values_of(results, claim.left, claim.metric, suite.derived, True)
    right = values_of(results, claim.right, right_metric, suite.derived, True)
    rows.append(
      {
        "claim": dataclasses.asdict(claim),
        **reproduction.verdict(left, right, claim.predicted, claim.min_effect),
      }
    )
  return rows


def _fmt(mean, std, seeds):
  if mean is None or not np.isfinite(mean):
    return "-"
  digits = 4 if abs(mean) < 10 else 0
  text = f"{mean:.{digits}f}"
  return text + (f" ± {std:.{digits}f}" if seeds > 1 else "")


def write_report(
  suite: Suite, results: dict, out_dir: Path, plots: bool = True
):
  """Decides the claims into results.json and writes report.md with its
  plots (`plots=False`: without them, for a report rewritten mid-sweep)."""
  out_dir.mkdir(parents=True, exist_ok=True)
  decisions = decide(suite, results)
  results["claims"] = decisions
  save_json(out_dir / "results.json", results)
  plots = write_plots(suite, results, out_dir) if plots else []
  commits = sorted({r.get("commit", "?") for r in results["runs"]})
  lines = [
    f"# {suite.title}",
    "",
    f"{suite.question}",
    "",
    f"Scale `{results['scale']}`; {len(results['runs'])} runs; commit(s) "
    f"{', '.join(commits) or '-'}; command: "
    f"`{results.get('command', '-')}`. Regenerate this page with "
    f"`python experiments/reproduce.py --suite={suite.name} "
    f"--scale={results['scale']} --report_only`.",
    "",
    "## Verdict rule (fixed before the runs)",
    "",
    "Each claim predicts that a metric of one arm is lower (<) or higher (>) "
    "than of another. d = difference of the seed means in the predicted "
    "direction; s = pooled seed standard deviation (0 with one seed); m = the "
    "claim's minimum effect, stated with it. d > max(2s, m): **reproduced**; "
    "d < -max(2s, m): **not reproduced**; otherwise **inconclusive**. An arm "
    "without finished runs: **not run**.",
    "",
  ]
  if suite.notes:
    lines += ["## Conventions", "", suite.notes, ""]
  lines += [
    "## Claims",
    "",
    "| id | claim | source | paper | metric | left | right | ours: left | "
    "ours: right | d / threshold | verdict |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for row in decisions:
    c = row["claim"]
    metric = c["metric"] + (
      f" vs {c['right_metric']}" if c.get("right_metric") else ""
    )
    seeds = row.get("seeds", 0)
    d = row.get("difference")
    d_text = (
      "-"
      if d is None or not np.isfinite(d)
      else (f"{d:+.4f} / {row['threshold']:.4f}")
    )
    lines.append(
      f"| {c['id']} | {c['text']} | {c['source']} | {c['paper']} | "
      f"{metric} ({c['predicted']}) | {c['left']} | {c['right']} | "
      f"{_fmt(row.get('left_mean'), row.get('left_std'), seeds)} | "
      f"{_fmt(row.get('right_mean'), row.get('right_std'), seeds)} | "
      f"{d_text} | **{row['verdict']}** |"
    )
  caveats = [
    f"- {r['claim']['id']}: {r['claim']['caveat']}"
    for r in decisions
    if r["claim"]["caveat"] and r["verdict"] != "reproduced"
  ]
  if caveats:
    lines += [
      "",
      "Where a claim did not show, what could hide it at this "
      "scale (written with the claim, before the runs):",
      "",
      *caveats,
    ]
  lines += [
    "",
    "## Arms",
    "",
    "Mean ± std over seeds; eval metrics at the last evaluation, averaged "
    "over MoE layers; `name@x`: the checkpoint re-evaluated under setting x. "
    "tokens_per_second is the median train-step throughput of each run; it "
    "is only comparable between runs made on an otherwise idle machine.",
    "",
    *arm_table(suite, results),
    "",
  ]
  if plots:
    lines += ["## Plots", ""]
    lines += [f"![{title}]({Path(p).name})" for p, title in plots]
    lines.append("")
  lines += [
    "## Runs",
    "",
    "Every run, alone: `python -m moe_jax.train --config=<config> "
    "--workdir=<dir>` with these configs:",
    "",
  ]
  for run in results["runs"]:
    status = run["status"] + (
      f" at step {run['diverged_step']}" if run.get("diverged_step") else ""
    )
    lines.append(
      f"- `{run['config']}` ({status}, {run['seconds'] / 60:.1f} "
      f"min, commit {run.get('commit', '?')})"
    )
  (out_dir / "report.md").write_text("\n".join(lines) + "\n")


_ARM_COLUMNS = (
  "eval_loss",
  "train_loss",
  "load_cv",
  "max_violation_batch",
  "max_violation_global",
  "drop_fraction",
  "dead_experts",
  "router_logsumexp",
  "max_router_logit",
  "loss_spikes",
  "stable",
  "tokens_per_second",
)


def arm_table(suite: Suite, results: dict) -> list[str]:
  """Mean ± std over seeds of the main metrics of every arm that ran."""
  arms = [a for a in suite.arms_at(results["scale"])]
  extra = sorted(
    {
      k
      for r in results["runs"]
      for k in r["summary"]
      if "@" in k and k.split("@")[0] in ("eval_loss", "drop_fraction")
    }
  )
  present = [
    c
    for c in (*_ARM_COLUMNS, *extra, *suite.derived)
    if any(
      values_of(results, a.name, c, suite.derived)
      and np.isfinite(values_of(results, a.name, c, suite.derived)).any()
      for a in arms
    )
  ]
  lines = [
    "| arm | seeds | " + " | ".join(present) + " |",
    "|---|---|" + "---|" * len(present),
  ]
  for arm in arms:
    runs = [r for r in results["runs"] if r["arm"] == arm.name]
    if not runs:
      continue
    cells = []
    for column in present:
      v = np.asarray(values_of(results, arm.name, column, suite.derived))
      ok = v[np.isfinite(v)]
      cells.append(
        _fmt(ok.mean(), ok.std(ddof=1) if ok.size > 1 else 0.0, ok.size)
        if ok.size
        else "-"
      )
    lines.append(
      f"| {arm.label or arm.name} | {len(runs)} | " + " | ".join(cells) + " |"
    )
  return lines


def write_plots(suite: Suite, results: dict, out_dir: Path) -> list:
  """Eval loss and each of the suite's plots over training, one line per arm
  (mean over seeds at the steps all seeds logged). Returns [(path, title)]."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  specs = [
    reproduction.Plot(
      "eval/lm_loss",
      "Validation loss over training",
      "validation loss (nats / byte)",
    ),
    *suite.plots,
  ]
  arms = suite.arms_at(results["scale"])
  cmap = plt.get_cmap("tab20" if len(arms) > 10 else "tab10")
  out = []
  for index, spec in enumerate(specs):
    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn = False
    for i, arm in enumerate(arms):
      curves = []
      for run in results["runs"]:
        if run["arm"] != arm.name:
          continue
        try:
          rows = writers.read_metrics(REPO / run["workdir"])
        except FileNotFoundError:
          continue
        curves.append(reproduction.series(rows, spec.key))
      curves = [c for c in curves if c[0].size]
      if not curves:
        continue
      steps = curves[0][0]
      for s, _ in curves[1:]:
        steps = np.intersect1d(steps, s)
      if not steps.size:
        continue
      mean = np.mean([v[np.isin(s, steps)] for s, v in curves], axis=0)
      ax.plot(
        steps,
        mean,
        color=cmap(i % cmap.N),
        label=arm.label or arm.name,
        marker="o" if steps.size < 8 else None,
      )
      drawn = True
    plt.close(fig) if not drawn else None
    if not drawn:
      continue
    ax.set_title(f"{suite.name}: {spec.title}")
    ax.set_xlabel("training step")
    ax.set_ylabel(spec.ylabel)
    if spec.log_y:
      ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(arms) > 6 else 1)
    fig.tight_layout()
    slug = re.sub(r"[^a-z0-9]+", "_", spec.key.lower()).strip("_")
    path = out_dir / f"{index:02d}_{slug}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    out.append((str(path), spec.title))
  for extra in suite.extra_plots:
    path, title = extra(results, out_dir)
    if path:
      out.append((path, title))
  return out


def summary_table(names: list[str], results_dir: Path) -> str:
  """Claim | paper | ours | verdict, over suites, linking each report."""
  lines = [
    "| suite | claim | paper | ours: metric, left arm vs right arm | verdict |",
    "|---|---|---|---|---|",
  ]
  not_run = []
  for name in names:
    path = results_dir / name / "results.json"
    if not path.exists():
      not_run.append(f"`{name}`")
      continue
    results = json.loads(path.read_text())
    link = f"[{name}](results/{name}/report.md)"
    for row in results.get("claims", []):
      c, seeds = row["claim"], row.get("seeds", 0)
      left = _fmt(row.get("left_mean"), row.get("left_std"), seeds)
      right = _fmt(row.get("right_mean"), row.get("right_std"), seeds)
      ours = (
        f"{c['metric']}: {c['left']} {left} vs "
        f"{c['right']} {right}"
        + (f" ({c['right_metric']})" if c.get("right_metric") else "")
        if row["verdict"] != "not run"
        else "-"
      )
      lines.append(
        f"| {link} | {c['id']}: {c['text']} | {c['paper']} | {ours} | "
        f"{row['verdict']} |"
      )
  if not_run:
    lines += ["", f"Not run at this scale yet: {', '.join(not_run)}."]
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--suite", required=True, help="a suite name or 'all'")
  parser.add_argument("--scale", default="cpu", choices=reproduction.SCALES)
  parser.add_argument(
    "--seeds",
    type=int,
    default=None,
    help="seeds per arm (default: the suite's for the scale)",
  )
  parser.add_argument("--results", default=str(REPO / "results"))
  parser.add_argument("--runs", default=str(REPO / "runs" / "reproduce"))
  parser.add_argument(
    "--plan", action="store_true", help="print the predicted costs and stop"
  )
  parser.add_argument(
    "--no_probe",
    dest="probe",
    action="store_false",
    help="skip the cost prediction",
  )
  parser.add_argument(
    "--report_only",
    action="store_true",
    help="rewrite report.md and plots from results.json",
  )
  parser.add_argument(
    "--summary",
    action="store_true",
    help="print one Markdown table of every claim of the "
    "suites' results (the README's) and stop",
  )
  args = parser.parse_args(argv)
  names = suite_names() if args.suite == "all" else args.suite.split(",")
  for name in names:
    load_suite(name)  # unknown names fail before anything runs
  if args.summary:
    print(summary_table(names, Path(args.results)))
    return
  if args.probe and not args.report_only:
    # Predict every suite before training any.
    plan = argparse.Namespace(**{**vars(args), "plan": True})
    plan.predicted_seconds = 0.0
    for name in names:
      run_suite(name, plan)
    print(f"predicted total: {plan.predicted_seconds / 3600:.2f} h")
    if args.plan:
      return
  args.probe = False
  for name in names:
    run_suite(name, args)
    print(f"report: {Path(args.results) / name / 'report.md'}")


if __name__ == "__main__":
  main()
