"""The reproduction suite's building blocks: arms, claims and the verdict rule.

A *suite* re-runs one comparison of a paper (Switch Table 1, ST-MoE Table 4,
...). It lives in one run book, `configs/reproduce/<suite>.py`, which holds

  get_config(arg)  the config of one arm, from a typed argument string such as
                   "top_k=2,alpha=1e-2,scale=cpu,seed=1" (big_vision style), so
                   that every arm also runs alone:
    python -m moe_jax.train --workdir=runs/one_arm \
      --config=configs/reproduce/switch_balance.py:top_k=2,alpha=1e-2
  SUITE            a `Suite`: its arms, seeds per scale, claims and plots.

`experiments/reproduce.py` runs the arms of a suite, summarises each finished
run with `summarize_run` and decides every claim with `verdict`.

The verdict rule, fixed before any number is seen (and printed above the
numbers in every report): a claim predicts that metric(left) is lower (or
higher) than metric(right). With d the difference of the seed means in the
predicted direction and s the pooled standard deviation over seeds
(sqrt((s_left^2 + s_right^2) / 2), ddof 1; 0 with one seed), and the claim's
own minimum effect m (in the metric's units, stated with the claim):

  d >  max(2 s, m)   -> "reproduced"
  d < -max(2 s, m)   -> "not reproduced" (the opposite, clearly)
  otherwise          -> "inconclusive"
"""

import ast
import dataclasses
import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from moe_jax import writers

SCALES = ("smoke", "cpu", "gpu")
VERDICTS = ("reproduced", "not reproduced", "inconclusive", "not run")


def parse_arg(arg: str | None) -> dict:
  """ "top_k=2,alpha=1e-2,router=switch" -> {"top_k": 2, "alpha": 0.01,
  "router": "switch"}: Python literals where they parse, else strings.

  Raises:
    ValueError: for an item without "=" or a repeated key.
  """
  out = {}
  for item in filter(None, (arg or "").split(",")):
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
      raise ValueError(
        f"config argument item {item!r} is not key=value; expected e.g. "
        "'top_k=2,alpha=1e-2'."
      )
    if key in out:
      raise ValueError(f"config argument key {key!r} is given twice: {arg!r}.")
    try:
      out[key] = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
      out[key] = text.strip()
  return out


def format_arg(values: dict) -> str:
  """The inverse of `parse_arg`: {"top_k": 2} -> "top_k=2"."""
  return ",".join(f"{k}={v}" for k, v in values.items())


def take_args(arg: str | None, defaults: dict) -> dict:
  """`parse_arg(arg)` over `defaults`; an unknown key is an error that names
  the allowed ones, and "scale" must be one of SCALES."""
  given = parse_arg(arg)
  unknown = sorted(set(given) - set(defaults))
  if unknown:
    raise ValueError(
      f"unknown config argument(s) {unknown} in {arg!r}; allowed: "
      f"{sorted(defaults)}."
    )
  values = {**defaults, **given}
  if values.get("scale", "cpu") not in SCALES:
    raise ValueError(f"scale={values['scale']!r} is not one of {SCALES}.")
  return values


@dataclasses.dataclass(frozen=True)
class Arm:
  """One configuration of a suite (all seeds share it).

  Attributes:
    name: short, unique in the suite; the run directory's name.
    args: the `get_config` argument (without scale and seed).
    label: how plots and tables name it.
    evals: extra evaluations of the trained checkpoint, without retraining:
      {"cf2.0": {"model.moe.eval_capacity_factor": 2.0}}. Their metrics are
      summarised as "<metric>@<name>".
    init_from: the name of an earlier arm of the suite whose run (same
      scale, same seed) this arm starts from: the runner trains that arm
      first and passes its workdir as the `get_config` argument
      "init_from=<workdir>" (fine-tuning, upcycling). "" = none.
  """

  name: str
  args: str
  label: str = ""
  evals: dict = dataclasses.field(default_factory=dict)
  init_from: str = ""


@dataclasses.dataclass(frozen=True)
class Claim:
  """A paper's prediction as a comparison of two arms.

  Attributes:
    id: short identifier, e.g. "B1".
    text: the claim in words, as the paper makes it.
    source: paper, table / figure / section.
    paper: the paper's own numbers for it, as published.
    metric: a key of `summarize_run`'s output (or "<metric>@<eval>").
    left, right: arm names; the claim predicts metric(left) `predicted`
      metric(right).
    predicted: "<" or ">".
    min_effect: m of the verdict rule, in the metric's units.
    caveat: what could hide the effect at this scale (written beforehand).
    right_metric: the metric read from `right` when it differs from
      `metric` (e.g. one arm evaluated two ways: "eval_loss" of an arm vs
      its "eval_loss@cf2.0").
  """

  id: str
  text: str
  source: str
  paper: str
  metric: str
  left: str
  right: str
  predicted: str
  min_effect: float
  caveat: str = ""
  right_metric: str = ""

  def __post_init__(self):
    if self.predicted not in ("<", ">"):
      raise ValueError(
        f"claim {self.id}: predicted={self.predicted!r} must be '<' or '>'."
      )
    if not self.min_effect >= 0:
      raise ValueError(
        f"claim {self.id}: min_effect={self.min_effect} must be >= 0."
      )


@dataclasses.dataclass(frozen=True)
class Plot:
  """A line plot of one metric over training, one line per arm.

  Attributes:
    key: a metrics.jsonl key; "*" stands for the MoE layer (averaged over
      layers), e.g. "train/moe/*/max_violation".
    title, ylabel: what the plot shows and its unit.
    log_y: logarithmic y axis.
  """

  key: str
  title: str
  ylabel: str
  log_y: bool = False


@dataclasses.dataclass(frozen=True)
class Suite:
  """A comparison of a paper, re-run at small scale.

  Attributes:
    name: the suite's name (its run book is configs/reproduce/<name>.py).
    title: one line.
    question: what the comparison asks, in plain words.
    arms: scale -> the arms run at that scale.
    seeds: scale -> number of seeds per arm.
    claims: the predictions decided by the verdict rule.
    plots: plots over training, besides the eval-loss curves every suite
      gets.
    notes: Markdown paragraphs for the report (conventions, what differs
      from the paper).
    derived: metrics computed from a run's summary, name -> function of the
      summary dict (e.g. a leak = causal eval loss - noncausal eval loss).
    extra_plots: functions (results, out_dir) -> (png path, title) for
      plots that are not curves over training.
  """

  name: str
  title: str
  question: str
  arms: Callable[[str], Sequence[Arm]]
  seeds: dict
  claims: Sequence[Claim]
  plots: Sequence[Plot] = ()
  notes: str = ""
  derived: dict = dataclasses.field(default_factory=dict)
  extra_plots: Sequence[Callable] = ()

  def arms_at(self, scale: str) -> list[Arm]:
    """The arms run at `scale`. At "smoke" only the two arms of the first
    claim run, with the arms they start from (CI checks that every suite
    builds, trains, evaluates and reports; the other claims then read "not
    run")."""
    arms = list(self.arms(scale))
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
      raise ValueError(f"suite {self.name}: arm names repeat: {names}.")
    self._check_claims(names)
    self._check_sources(arms)
    if scale == "smoke" and self.claims:
      keep = {self.claims[0].left, self.claims[0].right}
      source = {a.name: a.init_from for a in arms}
      for arm in reversed(arms):  # sources come first: one pass back
        if arm.name in keep and arm.init_from:
          keep.add(source[arm.name])
      arms = [a for a in arms if a.name in keep]
    return arms

  def _check_sources(self, arms):
    seen = set()
    for arm in arms:
      if arm.init_from and arm.init_from not in seen:
        raise ValueError(
          f"suite {self.name}: arm {arm.name!r} starts from "
          f"init_from={arm.init_from!r}, which is not an arm listed before "
          f"it (sources run first): {sorted(seen)}."
        )
      seen.add(arm.name)

  def _check_claims(self, names):
    for claim in self.claims:
      for side in (claim.left, claim.right):
        if side not in names:
          raise ValueError(
            f"suite {self.name}: claim {claim.id} names arm {side!r}, "
            f"which is not among {names}."
          )


# ---------------------------------------------------------------------------
# The verdict rule (module docstring).


def verdict(
  left: Sequence[float],
  right: Sequence[float],
  predicted: str,
  min_effect: float,
) -> dict:
  """Decides a claim from per-seed values of its two arms.

  Returns:
    {"verdict", "left_mean", "left_std", "right_mean", "right_std",
     "difference" (d, positive in the predicted direction), "threshold"
     (max(2 s, m)), "seeds" (the smaller seed count)}. Non-finite values
    (a diverged run has no loss) give "inconclusive" unless both sides are
    complete; an arm without values gives "not run".
  """
  left = np.asarray(left, np.float64)
  right = np.asarray(right, np.float64)
  out = {"seeds": int(min(left.size, right.size))}
  if left.size == 0 or right.size == 0:
    return {**out, "verdict": "not run"}

  def stats(x):
    return float(np.mean(x)), float(np.std(x, ddof=1)) if x.size > 1 else 0.0

  (lm, ls), (rm, rs) = stats(left), stats(right)
  out.update(left_mean=lm, left_std=ls, right_mean=rm, right_std=rs)
  if not (np.all(np.isfinite(left)) and np.all(np.isfinite(right))):
    return {
      **out,
      "verdict": "inconclusive",
      "difference": math.nan,
      "threshold": math.nan,
    }
  difference = (rm - lm) if predicted == "<" else (lm - rm)
  pooled = math.sqrt((ls**2 + rs**2) / 2)
  threshold = max(2 * pooled, min_effect)
  if difference > threshold:
    decided = "reproduced"
  elif difference < -threshold:
    decided = "not reproduced"
  else:
    decided = "inconclusive"
  return {
    **out,
    "verdict": decided,
    "difference": difference,
    "threshold": threshold,
  }


# ---------------------------------------------------------------------------
# What a finished run measured.

# Per-layer eval metrics averaged over the MoE layers (and their worst layer
# as "<name>_worst").
LAYER_METRICS = (
  "load_cv",
  "max_violation",
  "max_violation_batch",
  "max_violation_global",
  "max_violation_after_bias_batch",
  "max_violation_after_bias_global",
  "drop_fraction",
  "dead_experts",
  "router_entropy",
  "router_logit_max_abs",
  "router_logsumexp",
)


def layer_mean(row: dict, name: str) -> tuple[float, float] | None:
  """(mean, max) over MoE layers of `<prefix>/moe/layer_XX/<name>` in a
  metric row; None when the row has no such key."""
  pattern = re.compile(rf"(train|eval)/moe/layer_\d+/{re.escape(name)}")
  values = [
    v
    for k, v in row.items()
    if pattern.fullmatch(k) and isinstance(v, (int, float))
  ]
  if not values:
    return None
  return float(np.mean(values)), float(np.max(values))


def series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of a metric over a run, in increasing step order; "*" in
  `key` stands for the MoE layer and is averaged over layers. A step logged
  twice (a run restarted without cutting its log) keeps its last value: the
  rows of the restarted run supersede the lost run's."""
  steps, values = [], []
  if "*" in key:
    prefix, name = key.split("/moe/*/")
    for row in rows:
      if not any(k.startswith(f"{prefix}/moe/") for k in row):
        continue
      got = layer_mean(
        {k: v for k, v in row.items() if k.startswith(prefix)}, name
      )
      if got is not None:
        steps.append(row["step"])
        values.append(got[0])
  else:
    for row in rows:
      if isinstance(row.get(key), (int, float)):
        steps.append(row["step"])
        values.append(row[key])
  latest = dict(zip(steps, values))
  steps = sorted(latest)
  return np.asarray(steps), np.asarray([latest[s] for s in steps], np.float64)


def count_spikes(losses: np.ndarray, ratio: float = 1.2, window: int = 5):
  """Loss spikes: logged training losses above `ratio` x the median of the
  `window` logged values before them (ST-MoE §3 counts spikes without a
  formula; this is ours, stated in every report that uses it)."""
  spikes = 0
  for i in range(window, len(losses)):
    previous = losses[i - window : i]
    if np.isfinite(losses[i]) and losses[i] > ratio * np.median(previous):
      spikes += 1
  return spikes


def summarize_run(workdir: str) -> dict:
  """The numbers a claim can use from one finished run's metrics.jsonl.

  Keys: eval_loss (last evaluation, nats/token), train_loss (mean of the last
  3 logged training LM losses), each of LAYER_METRICS present in the last
  evaluation (mean over MoE layers; "<name>_worst": worst layer),
  loss_spikes (`count_spikes` of the training LM loss), max_router_logit
  (the largest, over the logged training steps, of router_logit_max_abs
  averaged over MoE layers), tokens_per_second (`train_tokens_per_second`).
  """
  rows = writers.read_metrics(workdir)
  evals = [r for r in rows if isinstance(r.get("eval/lm_loss"), (int, float))]
  out = summarize_eval_row(evals[-1]) if evals else {}
  _, train_loss = series(rows, "train/lm_loss")
  if train_loss.size:
    out["train_loss"] = float(np.mean(train_loss[-3:]))
    out["loss_spikes"] = count_spikes(train_loss)
  _, logit_max = series(rows, "train/moe/*/router_logit_max_abs")
  if logit_max.size:
    out["max_router_logit"] = float(np.max(logit_max))
  config = json.loads((Path(workdir) / "config.json").read_text())
  out["tokens_per_second"] = train_tokens_per_second(rows, config)
  return out


def summarize_eval_row(row: dict) -> dict:
  """eval_loss, eval_step and the LAYER_METRICS (mean over MoE layers and
  "<name>_worst") of one evaluation row."""
  out = {"eval_loss": row["eval/lm_loss"], "eval_step": row["step"]}
  evaluated = {k: v for k, v in row.items() if k.startswith("eval/")}
  for name in LAYER_METRICS:
    got = layer_mean(evaluated, name)
    if got is not None:
      out[name], out[f"{name}_worst"] = got
  return out


def train_tokens_per_second(rows: list[dict], config: dict) -> float | None:
  """Training throughput of a run (rows of its metrics.jsonl, its
  config.json as a dict): the median over logging intervals of tokens /
  seconds, leaving out the first interval (it compiles) and every interval
  that holds an evaluation (the evaluation after step e is timed in the
  interval that starts at e). The median also ignores the one interval after
  a resume that compiles again, and a machine's passing load."""
  tokens = config["data"]["batch_size"] * config["data"]["seq_len"]
  eval_every = config.get("train", {}).get("eval_every") or 0
  logs = [r for r in rows if r.get("train/seconds_since_last_log")]
  rates = []
  for before, row in zip(logs, logs[1:]):
    if eval_every and (
      -(-before["step"] // eval_every) * eval_every < row["step"]
    ):
      continue  # [before, row) holds a multiple of eval_every
    seconds = row["train/seconds_since_last_log"]
    rates.append(tokens * (row["step"] - before["step"]) / seconds)
  return float(np.median(rates)) if rates else None
