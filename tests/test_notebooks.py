"""The notebooks of notebooks/: sources in sync, committed executed, and
re-executed end to end with nbclient.

Each notebook's source is notebooks/NN_name.py (jupytext percent format),
paired with notebooks/NN_name.ipynb, which is committed with its outputs
(`python experiments/execute_notebooks.py` writes them). The tests

  * compare the cells of each .py and its .ipynb, so that an edit of one
    without the other fails;
  * check that each committed .ipynb holds a complete, error-free execution
    and stays small;
  * execute each source from a fresh kernel and check its printed numbers
    against values computed here by hand or from the stored files.

The kernel is pinned to this interpreter (`execute_notebooks.kernel_manager`
writes a kernel spec whose argv starts with `sys.executable` into pytest's
tmp_path), so this works in a fresh virtualenv that only ran
`pip install -e .[test]`. Notebooks with parameters run with some of them
overridden: shorter runs, and files under tmp_path.
"""

import importlib.util
import json
import math
import re
import sys
from collections import Counter
from pathlib import Path

import jupytext
import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
SOURCES = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))
_NUMBER = r"([-+0-9.eE]+|nan|inf)"

_spec = importlib.util.spec_from_file_location(
  "execute_notebooks", REPO / "experiments" / "execute_notebooks.py"
)
execute_notebooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(execute_notebooks)


def _cells(notebook):
  return [
    (cell.cell_type, cell.source, cell.metadata.get("tags", []))
    for cell in notebook.cells
  ]


def test_every_notebook_has_a_source_and_an_ipynb():
  names = {p.stem for p in SOURCES}
  assert {p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")} == names
  assert {
    "01_routing_by_hand",
    "02_inspect_a_run",
    "03_capacity_and_drop_priority",
    "04_balancing_ablations",
    "05_are_experts_specialists",
    "06_cost_of_published_models",
    "07_finetuning_and_upcycling",
  } <= names


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_source_and_ipynb_have_the_same_cells(source):
  from_py = _cells(jupytext.read(source))
  from_ipynb = _cells(nbformat.read(source.with_suffix(".ipynb"), 4))
  assert len(from_py) == len(from_ipynb), (
    f"{source.name} has {len(from_py)} cells, its .ipynb "
    f"{len(from_ipynb)}: run `jupytext --sync {source}` or "
    "experiments/execute_notebooks.py."
  )
  for number, (a, b) in enumerate(zip(from_py, from_ipynb)):
    assert a == b, f"cell {number} of {source.name} differs from the .ipynb"


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_ipynb_is_committed_executed(source):
  path = source.with_suffix(".ipynb")
  assert path.stat().st_size < 1_000_000
  notebook = nbformat.read(path, 4)
  nbformat.validate(notebook)
  code = [cell for cell in notebook.cells if cell.cell_type == "code"]
  # One run, top to bottom, every cell.
  assert [cell.execution_count for cell in code] == list(
    range(1, len(code) + 1)
  )
  outputs = [out for cell in code for out in cell.outputs]
  assert not [out for out in outputs if out.output_type == "error"]
  # Every notebook prints, and every one of them plots.
  assert any(out.output_type == "stream" for out in outputs)
  assert any("image/png" in out.get("data", {}) for out in outputs)


def _execute(source: Path, tmp_path: Path, overrides: dict | None = None):
  """Runs the source `source` (a fresh notebook from the .py) in tmp_path;
  returns its printed text."""
  notebook = jupytext.read(source)
  if overrides:
    (cell,) = [
      c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])
    ]
    lines = [f"{key} = {value!r}" for key, value in overrides.items()]
    cell.source += "\n# Overridden by tests/test_notebooks.py.\n"
    cell.source += "\n".join(lines)
  kernels = tmp_path / "kernel_spec"
  assert execute_notebooks.kernel_manager(kernels).kernel_spec.argv[0] == (
    sys.executable
  )
  execute_notebooks.run(notebook, tmp_path, kernels, timeout=240)
  outputs = [out for cell in notebook.cells for out in cell.get("outputs", [])]
  assert not [out for out in outputs if out.output_type == "error"]
  return "".join(
    out.get("text", "") for out in outputs if out.output_type == "stream"
  )


def test_routing_by_hand(tmp_path):
  text = _execute(NOTEBOOKS / "01_routing_by_hand.py", tmp_path)
  difference = re.search(r"max \|difference\| = " + _NUMBER, text)
  assert difference and float(difference.group(1)) < 1e-6
  assert "matches the hand formula: True" in text
  assert "mixtral weights == gshard weights: True" in text


def test_inspect_a_run(tmp_path):
  text = _execute(
    NOTEBOOKS / "02_inspect_a_run.py",
    tmp_path,
    {
      "WORKDIR": str(tmp_path / "run"),
      "NUM_STEPS": 30,
      "DATA_DIR": str(tmp_path / "tfds"),
      "NUM_PERMUTATIONS": 20,
    },
  )
  assert (tmp_path / "run" / "metrics.jsonl").stat().st_size > 0
  # switch_top1 has MoE layers in blocks 1 and 3.
  mutual_information = re.findall(
    r"(layer_\d\d): I\(domain; expert\) = " + _NUMBER + " nats", text
  )
  assert [layer for layer, _ in mutual_information] == ["layer_01", "layer_03"]
  for _, value in mutual_information:
    assert math.isfinite(float(value)) and float(value) >= 0
  purity = re.findall(r"token-id purity = " + _NUMBER, text)
  assert len(purity) == 2
  assert all(0 < float(value) <= 1 for value in purity)
  assert "agreement = " in text


# ---------------------------------------------------------------------------
# 03_capacity_and_drop_priority: S = 64, E = 8, K = 2 by default.


def _drops(text: str) -> dict:
  """{priority: {field: value}} from the lines
  "drop[priority]: all pairs 0.2738, first choices 0.1902, ..."."""
  out = {}
  for priority, fields in re.findall(r"^drop\[(\w+)\]: (.*)$", text, re.M):
    pairs = (field.rsplit(" ", 1) for field in fields.split(", "))
    out[priority] = {name: float(value) for name, value in pairs}
  return out


def test_capacity_and_drop_priority(tmp_path):
  text = _execute(
    NOTEBOOKS / "03_capacity_and_drop_priority.py",
    tmp_path,
    {"RESULTS_DIR": str(tmp_path / "results")},
  )
  # C for S = 64, E = 8, K = 2, CF = 1.25, min_capacity 0, by hand:
  #   switch     ceil(1.25 * 64 / 8)           = ceil(10)  = 10
  #   gshard     ceil(1.25 * 2 * 64 / 8)       = ceil(20)  = 20
  #   flaxformer round(1.25 * 64 / 8)          = round(10) = 10
  #   vmoe       ceil(20) -> multiple of 4     = 20
  #   megatron   as gshard                     = 20
  #   maxtext    int(max(ceil(128 / 8) * 1.25, 1.25)) = int(20.0) = 20
  #   praxis     int(64 * 1.25 / 8) = 10 > 0 -> multiple of 4 = 12
  capacities = re.search(r"C\(S=64, E=8, K=2, CF=1.25\): (.*)", text).group(1)
  assert dict(re.findall(r"(\w+)=(\d+)", capacities)) == {
    "switch": "10",
    "gshard": "20",
    "flaxformer": "10",
    "vmoe": "20",
    "megatron": "20",
    "maxtext": "20",
    "praxis": "12",
  }
  C = 20  # the gshard rule at CF 1.25, used for the drops by position
  drops = _drops(text)
  assert set(drops) == {"k_major", "token_major", "batch_priority"}
  k_major, token_major, bpr = (
    drops[p] for p in ("k_major", "token_major", "batch_priority")
  )
  # Every order keeps min(n_e, C) of the n_e pairs of expert e (the counter
  # advances on overflow): the same number of drops.
  assert k_major["all pairs"] > 0.05
  assert k_major["all pairs"] == token_major["all pairs"] == bpr["all pairs"]
  # k-major and batch priority both visit every first choice first, so the
  # first choices see the same counts; token-major puts earlier second
  # choices before them.
  assert k_major["first choices"] == bpr["first choices"]
  assert k_major["first choices"] < token_major["first choices"]
  # Token-major: a pair at position t has at most t earlier pairs of its
  # expert (a token's K choices are distinct), so no drop before t = C;
  # within an expert the kept pairs are a prefix; and it is causal.
  assert token_major["first quarter"] == 0.0
  assert token_major["kept after a drop"] == 0
  assert token_major["first-half decisions changed by the second half"] == 0
  assert k_major["kept after a drop"] > 0
  assert bpr["kept after a drop"] > 0
  assert k_major["first-half decisions changed by the second half"] > 0
  assert bpr["first-half decisions changed by the second half"] > 0
  earliest = dict(
    ((p, rank), int(t))
    for p, rank, t in re.findall(
      r"earliest dropped position\[(\w+), (\w+) choice\]: (\d+)", text
    )
  )
  assert earliest["token_major", "first"] >= C
  assert earliest["token_major", "second"] >= C
  assert earliest["k_major", "first"] >= C  # first choices come first
  assert earliest["k_major", "second"] < C  # ... at the seconds' expense
  # Drops vs CF for the balanced and the collapsed routers, by hand. With
  # 64 tokens and top-2, balanced: every expert gets 16 pairs, drop =
  # max(16 - C, 0) / 16; collapsed: experts 0 and 1 get 64 pairs each,
  # drop = max(64 - C, 0) / 64; gshard C = ceil(16 CF), switch C = ceil(8 CF).
  for rule, per_cf in (("gshard", 16), ("switch", 8)):
    for cf in (0.5, 1.0, 1.25, 2.0, 4.0, 8.0):
      line = re.search(
        rf"drop fraction rule={rule} cf={cf:g}: balanced {_NUMBER}, "
        rf"drawn {_NUMBER}, collapsed {_NUMBER}",
        text,
      )
      balanced, drawn, collapsed = map(float, line.groups())
      c = math.ceil(per_cf * cf)
      assert balanced == pytest.approx(max(16 - c, 0) / 16, abs=1e-4)
      assert collapsed == pytest.approx(max(64 - c, 0) / 64, abs=1e-4)
      assert balanced <= drawn <= collapsed
      if c >= 64:  # CF >= E / K (gshard) or E (switch): C = S
        assert drawn == 0.0
  assert "switch_capacity suite has not been run yet" in text
  assert "--suite=switch_capacity --scale=cpu" in text


def test_capacity_quality_reads_the_switch_capacity_results(tmp_path):
  """The last section of notebook 3 on a small results.json of made-up
  numbers: the table shows their seed means and stds."""

  def run(arm, seed, loss, loss_cf2, drop):
    return {
      "arm": arm,
      "seed": seed,
      "status": "finished",
      "summary": {
        "eval_loss": loss,
        "eval_loss@cf2": loss_cf2,
        "eval_loss@cf0.75": loss + 0.05,
        "drop_fraction": drop,
      },
    }

  results = {
    "suite": "switch_capacity",
    "scale": "cpu",
    "runs": [
      run("top1_cf0.75", 0, 2.30, 2.28, 0.10),
      run("top1_cf0.75", 1, 2.32, 2.30, 0.12),
      run("top1_cf1.25", 0, 2.20, 2.19, 0.04),
      run("top2_cf1.25", 0, 2.10, 2.09, 0.02),
      run("top2_noK_cf1.25", 0, 2.15, 2.12, 0.20),
    ],
    "claims": [
      {
        "claim": {"id": "C1", "text": "A larger CF is better."},
        "verdict": "reproduced",
      }
    ],
  }
  (tmp_path / "results" / "switch_capacity").mkdir(parents=True)
  (tmp_path / "results" / "switch_capacity" / "results.json").write_text(
    json.dumps(results)
  )
  text = _execute(
    NOTEBOOKS / "03_capacity_and_drop_priority.py",
    tmp_path,
    {"RESULTS_DIR": str(tmp_path / "results"), "NUM_GROUPS": 32},
  )
  assert "has not been run yet" not in text
  assert "switch_capacity at scale 'cpu': 5 runs" in text
  # mean(2.30, 2.32) = 2.31, std (ddof 1) = 0.02 / sqrt(2) = 0.0141.
  rows = [
    ["top-1", "0.75", "2", "2.3100", "0.0141", "2.2900", "0.1100"],
    ["top-1", "1.25", "1", "2.2000", "0.0000", "2.1900", "0.0400"],
    ["top-2, C with K", "1.25", "1", "2.1000", "0.0000", "2.0900", "0.0200"],
    ["top-2, C without K", "1.25", "1", "2.1500", "0.0000", "2.1200", "0.2000"],
  ]
  for fields in rows:
    pattern = r"^ *" + r" +".join(map(re.escape, fields)) + r"$"
    assert re.search(pattern, text, re.M), fields
  assert "C1: reproduced -- A larger CF is better." in text


# ---------------------------------------------------------------------------
# 04_balancing_ablations: reads results/ as committed.


def test_balancing_ablations(tmp_path):
  text = _execute(NOTEBOOKS / "04_balancing_ablations.py", tmp_path)
  # The counts, from the JSON files themselves.
  counts = Counter()
  stored = sorted(p.parent.name for p in REPO.glob("results/*/results.json"))
  for name in stored:
    results = json.loads((REPO / "results" / name / "results.json").read_text())
    counts.update(row["verdict"] for row in results.get("claims", []))
  line = re.search(
    r"^verdict counts: (.*) \((\d+) claims in (\d+) suites\)$", text, re.M
  )
  assert line, text
  pairs = (item.split("=") for item in line.group(1).split(", "))
  printed = {verdict: int(n) for verdict, n in pairs}
  assert printed == {
    v: counts[v]
    for v in ("reproduced", "not reproduced", "inconclusive", "not run")
  }
  assert int(line.group(2)) == sum(counts.values())
  assert int(line.group(3)) == len(stored)
  # Suites: every run book that defines SUITE; those without results are
  # listed as not run yet.
  defined = sorted(
    p.stem
    for p in (REPO / "configs" / "reproduce").glob("*.py")
    if "SUITE = Suite(" in p.read_text()
  )
  missing = [name for name in defined if name not in stored]
  assert f"suites with results: {', '.join(stored) or 'none'}" in text
  assert f"not run yet: {', '.join(missing) or 'none'}" in text
  # One summary line per suite with results, with its claims' verdicts.
  for name in stored:
    results = json.loads((REPO / "results" / name / "results.json").read_text())
    verdicts = ", ".join(
      f"{row['claim']['id']} {row['verdict']}" for row in results["claims"]
    )
    assert f"{name}: {len(results['runs'])} runs; {verdicts}" in text


# ---------------------------------------------------------------------------
# 05_are_experts_specialists and 06_cost_of_published_models.


def _chance_lines(text: str, name: str) -> list[tuple[str, float, float]]:
  """(layer, observed, chance) of the lines "<layer>: <name> = x, chance y
  +- s (p = p)"."""
  pattern = (
    rf"^(layer_\d\d): {re.escape(name)} = {_NUMBER}, chance {_NUMBER} "
    rf"\+- {_NUMBER} \(p = {_NUMBER}\)$"
  )
  return [
    (layer, float(observed), float(chance))
    for layer, observed, chance, _, _ in re.findall(pattern, text, re.M)
  ]


def test_are_experts_specialists(tmp_path):
  text = _execute(
    NOTEBOOKS / "05_are_experts_specialists.py",
    tmp_path,
    {
      "WORKDIR": str(tmp_path / "run"),
      "NUM_STEPS": 20,
      "DATA_DIR": str(tmp_path / "tfds"),
      "NUM_PERMUTATIONS": 10,
    },
  )
  assert (tmp_path / "run" / "analysis" / "report.md").stat().st_size > 0
  # 20 steps keep checkpoints 1, 2, 5, 10 (5, 10, 25, 50 %) and 20.
  assert "kept checkpoints [1, 2, 5, 10, 20]" in text
  # switch_top1 has MoE layers in blocks 1 and 3; every measure is printed
  # with its chance level, per layer.
  for name, upper in (
    ("I(domain; expert)", math.log(2)),
    ("I(category; expert)", math.log(8)),
    ("token-id purity", 1.0),
    ("I(token; expert)", math.log(8)),
  ):
    lines = _chance_lines(text, name)
    assert [layer for layer, _, _ in lines] == ["layer_01", "layer_03"], name
    for _, observed, chance in lines:
      assert 0 <= observed <= upper + 1e-9 and 0 <= chance <= upper + 1e-9
  agreement = re.findall(
    r"^layer_01: step (\d+) agrees with step 20 on "
    + _NUMBER
    + " of the tokens, chance "
    + _NUMBER,
    text,
    re.M,
  )
  assert [int(step) for step, _, _ in agreement] == [1, 2, 5, 10]
  for _, agree, chance in agreement:
    assert 0 <= float(agree) <= 1 and 0 < float(chance) <= 1
  assert re.search(r"^layer_03: routing .*vs chance", text, re.M)


def test_cost_of_published_models(tmp_path):
  text = _execute(NOTEBOOKS / "06_cost_of_published_models.py", tmp_path)

  def sizes(name):
    found = re.search(
      rf"^{name}: total ([0-9,.]+)B \(published ([0-9,.]+)B, ratio "
      rf"{_NUMBER}\), active ([0-9,.]+)B",
      text,
      re.M,
    )
    assert found, name
    return [float(found.group(i).replace(",", "")) for i in (1, 2, 4)]

  # Mixtral 8x7B: 46.7B total, 12.9B active (Mistral AI's release).
  total, published, active = sizes("mixtral_8x7b")
  assert published == 46.7
  assert total == pytest.approx(46.7, rel=0.01)
  assert active == pytest.approx(12.9, rel=0.01)
  # DeepSeek-V3: 671B total (abstract); Switch-C: 1571B (Switch Table 9).
  assert sizes("deepseek_v3")[0] == pytest.approx(671, rel=0.01)
  assert sizes("switch_c")[0] == pytest.approx(1571, rel=0.01)
  # Adam in mixed precision: 16 bytes per parameter, 46.7B x 16 = 747 GB.
  memory = re.search(
    r"^mixtral_8x7b: .* = ([0-9,]+) GB \((\d+) bytes", text, re.M
  )
  assert int(memory.group(2)) == 16
  assert float(memory.group(1).replace(",", "")) == pytest.approx(
    46.7 * 16, rel=0.01
  )
  # Training FLOPs >= 6 x active parameters per token (attention on top).
  flops = re.search(
    r"^mixtral_8x7b: ([0-9,]+) GFLOP per training token", text, re.M
  )
  assert float(flops.group(1).replace(",", "")) >= 6 * 12.9 * 0.99
  # All-to-all: T K D b x 2 x 2 x n_moe x (ep - 1) / ep =
  # 2**20 x 2 x 4096 x 2 x 4 x 32 x 7/8 bytes = 1924 GB for Mixtral.
  moved = re.search(
    r"^mixtral_8x7b: ([0-9,]+) GB leave their device", text, re.M
  )
  want = 2**20 * 2 * 4096 * 2 * 4 * 32 * 7 / 8 / 1e9
  assert float(moved.group(1).replace(",", "")) == pytest.approx(want, abs=1)


# ---------------------------------------------------------------------------
# 07_finetuning_and_upcycling: reads results/ as committed, and a small
# results/ of made-up numbers with training logs.


def _claim_lines(text: str) -> dict:
  """{claim id: verdict} of the lines "U1: reproduced -- <text>"."""
  verdicts = "reproduced|not reproduced|inconclusive|not run"
  return dict(re.findall(rf"^(\w+): ({verdicts}) -- ", text, re.M))


def test_finetuning_and_upcycling(tmp_path):
  text = _execute(NOTEBOOKS / "07_finetuning_and_upcycling.py", tmp_path)
  for name in ("upcycle", "finetune"):
    path = REPO / "results" / name / "results.json"
    if not path.exists():
      assert f"the {name} suite has not been run yet" in text
      assert f"--suite={name} --scale=cpu" in text
      continue
    results = json.loads(path.read_text())
    claims = _claim_lines(text)
    for row in results["claims"]:
      assert claims[row["claim"]["id"]] == row["verdict"]
  # The design at the results' scale (cpu without results): the two
  # continuations start where dense_pretrain ends and end where
  # moe_scratch ends; tokens = steps x tokens per step.
  line = re.search(
    r"^upcycle at scale '(\w+)': D = (\d+) dense steps, E = (\d+) extra "
    r"steps, ([0-9,]+) tokens per step$",
    text,
    re.M,
  )
  assert line, text
  scale, D, E = line.group(1), int(line.group(2)), int(line.group(3))
  per_step = int(line.group(4).replace(",", ""))
  if scale == "cpu":  # configs/reproduce/upcycle.py and scales.py
    assert (D, E, per_step) == (1200, 800, 16 * 128)
  spans = {
    arm: (int(a), int(b), int(tokens.replace(",", "")))
    for arm, a, b, tokens in re.findall(
      r"^  (\w+): lineage steps (\d+)-(\d+), ([0-9,]+) tokens", text, re.M
    )
  }
  assert spans == {
    "dense_pretrain": (0, D, D * per_step),
    "dense_continue": (D, D + E, (D + E) * per_step),
    "upcycled": (D, D + E, (D + E) * per_step),
    "moe_scratch": (0, D + E, (D + E) * per_step),
  }


def _claim_row(id_, metric, left, right, verdict, **numbers):
  """A results.json claim row as `experiments/reproduce.py` writes it."""
  claim = {
    "id": id_,
    "text": f"claim {id_}.",
    "source": "a paper",
    "paper": "a number",
    "metric": metric,
    "left": left,
    "right": right,
    "predicted": "<",
    "min_effect": 0.01,
    "caveat": f"caveat of {id_}",
    "right_metric": "",
  }
  return {"claim": claim, "verdict": verdict, "seeds": 1, **numbers}


def _write_log(workdir: Path, rows: list[dict]):
  workdir.mkdir(parents=True)
  (workdir / "metrics.jsonl").write_text(
    "".join(json.dumps(row) + "\n" for row in rows)
  )


def test_finetuning_and_upcycling_reads_results(tmp_path):
  """Both sections on results of made-up numbers, some runs with a
  metrics.jsonl: the tables, the lineage offset, the collapse flags and the
  MoE-vs-dense gains, each checked against values computed here by hand."""
  runs_dir = tmp_path / "runs"

  def run(arm, summary, seed=0, workdir=None):
    return {
      "arm": arm,
      "seed": seed,
      "status": "finished",
      "summary": summary,
      "workdir": str(workdir or runs_dir / "absent" / arm),
    }

  # ---- upcycle at cpu scale: D = 1200, E = 800. The upcycled run logs
  # steps 10, 20, 30 of its own; its MaxVio per layer is made up.
  upcycled = runs_dir / "upcycled"
  _write_log(
    upcycled,
    [
      {
        "step": step,
        "train/lm_loss": 2.5 - step / 100,
        "train/moe/layer_01/max_violation": v1,
        "train/moe/layer_03/max_violation": v3,
      }
      for step, v1, v3 in ((10, 0.25, 1.5), (20, 0.5, 1.25), (30, 2.0, 0.75))
    ]
    + [{"step": 30, "eval/lm_loss": 2.2}],
  )
  up = {
    "suite": "upcycle",
    "scale": "cpu",
    "runs": [
      run("dense_pretrain", {"eval_loss": 2.4, "eval_step": 1200}),
      run("dense_continue", {"eval_loss": 2.3, "eval_step": 800}),
      run(
        "upcycled",
        {
          "eval_loss": 2.2,
          "eval_step": 800,
          "max_violation_global": 0.5,
          "max_violation_global_worst": 0.75,
        },
        workdir=upcycled,
      ),
    ],
    "claims": [
      _claim_row(
        "U1",
        "eval_loss",
        "upcycled",
        "dense_continue",
        "reproduced",
        left_mean=2.2,
        left_std=0.0,
        right_mean=2.3,
        right_std=0.0,
        difference=0.1,
        threshold=0.01,
      ),
      _claim_row("U2", "eval_loss", "upcycled", "moe_scratch", "not run"),
    ],
  }

  # ---- finetune at cpu scale, E = 8: moe_ft has two seeds; moe_ft_noaux's
  # log crosses the collapse line (largest share 0.5 at E = 8, K = 1) at
  # steps 20, 30, 40 (3 rows in a row: collapsed from step 20), moe_ft's
  # once only (not collapsed).
  def shares(top):
    return [top] + [(1 - top) / 7] * 7

  for arm, tops in (
    ("moe_ft", (0.25, 0.625, 0.25, 0.25)),
    ("moe_ft_noaux", (0.25, 0.625, 0.75, 0.875)),
  ):
    _write_log(
      runs_dir / arm,
      [
        {
          "step": step,
          "train/lm_loss": 2.0,
          "train/moe/layer_01/expert_fraction": shares(top),
          "train/moe/layer_03/expert_fraction": shares(0.125),
        }
        for step, top in zip((10, 20, 30, 40), tops)
      ],
    )
  _write_log(runs_dir / "dense_ft", [{"step": 10, "train/lm_loss": 2.0}])
  moe = {"max_violation_global": 1.0, "max_violation_global_worst": 3.0}
  ft = {
    "suite": "finetune",
    "scale": "cpu",
    "runs": [
      run("moe_pretrain", {"eval_loss": 2.0, **moe}),
      run("dense_pretrain", {"eval_loss": 2.25}),
      run("moe_ft", {"eval_loss": 1.5, **moe}, workdir=runs_dir / "moe_ft"),
      run("moe_ft", {"eval_loss": 1.7, **moe}, seed=1),
      run(
        "moe_ft_noaux",
        {
          "eval_loss": 1.6,
          "max_violation_global": 2.0,
          "max_violation_global_worst": 5.0,
        },
        workdir=runs_dir / "moe_ft_noaux",
      ),
      run("dense_ft", {"eval_loss": 1.8}, workdir=runs_dir / "dense_ft"),
      run("moe_it_multi", {"eval_loss": 1.25, "eval_loss@code_body": 1.0}),
      run("dense_it_multi", {"eval_loss": 1.5, "eval_loss@code_body": 1.5}),
      run("moe_it_single", {"eval_loss": 1.25}),
      run("dense_it_single", {"eval_loss": 1.0}),
    ],
    "claims": [
      _claim_row(
        "F4",
        "max_violation",
        "moe_ft_noaux",
        "moe_ft",
        "inconclusive",
        left_mean=float("nan"),
        right_mean=float("nan"),
        difference=float("nan"),
        threshold=float("nan"),
      ),
      _claim_row("F5", "eval_loss", "moe_ft", "dense_ft", "not reproduced"),
    ],
  }
  for name, results in (("upcycle", up), ("finetune", ft)):
    (tmp_path / "results" / name).mkdir(parents=True)
    (tmp_path / "results" / name / "results.json").write_text(
      json.dumps(results)
    )
  text = _execute(
    NOTEBOOKS / "07_finetuning_and_upcycling.py",
    tmp_path,
    {"RESULTS_DIR": str(tmp_path / "results")},
  )
  assert "has not been run yet" not in text
  assert "upcycle: scale 'cpu', 3 runs (3 finished)" in text
  assert "finetune: scale 'cpu', 10 runs (10 finished)" in text
  assert _claim_lines(text) == {
    "U1": "reproduced",
    "U2": "not run",
    "F4": "inconclusive",
    "F5": "not reproduced",
  }
  # The caveat shows where a claim did not show, not where it did.
  assert "caveat of F4" in text and "caveat of F5" in text
  assert "caveat of U1" not in text and "caveat of U2" not in text
  # No summary holds F4's metric: said so.
  assert "F4: no run's summary has 'max_violation'" in text
  # Upcycle table: the continuations end at lineage step D + E = 2000.
  assert re.search(
    r"^ *upcycled +1 +2000 +2\.2000 .* 0\.5000 +0\.7500", text, re.M
  )
  assert re.search(r"^ *moe_scratch +0 +- +not run", text, re.M)
  # The last evaluations on the lineage axis: 1200 + 800.
  assert "upcycled: last eval at lineage step 2000: 2.2000" in text
  assert "dense_pretrain: last eval at lineage step 1200: 2.4000" in text
  # MaxVio per layer, shifted by D = 1200.
  assert (
    "upcycled layer_01: MaxVio 0.250 at lineage step 1210, 2.000 at 1230"
    in text
  )
  assert (
    "upcycled layer_03: MaxVio 1.500 at lineage step 1210, 0.750 at 1230"
    in text
  )
  assert "upcycle: metrics.jsonl found for 1 of 3 runs" in text
  assert "finetune: metrics.jsonl found for 3 of 10 runs" in text
  # Finetune table. moe_ft: mean(1.5, 1.7) = 1.6, std (ddof 1) = 0.1414;
  # largest share at the worst layer (1 + 3) / 8 = 0.5 (noaux: 6 / 8);
  # seed 0 has a log (not collapsed), seed 1 none ("?").
  assert re.search(
    r"^ *moe_ft +moe_pretrain +2 +1\.6000 ± 0\.1414 +- +- +1\.0000 ± 0\.0000 "
    r"+3\.0000 ± 0\.0000 +0\.5000 ± 0\.0000 +- +no,\?$",
    text,
    re.M,
  )
  assert re.search(
    r"^ *moe_ft_noaux +moe_pretrain +1 +1\.6000 +- +- +2\.0000 +5\.0000 "
    r"+0\.7500 +- +layer_01@20$",
    text,
    re.M,
  )
  # A dense arm has no MoE layer: "-", with or without a log.
  assert re.search(r"^ *dense_ft +dense_pretrain +1 +1\.8000 .* -$", text, re.M)
  assert re.search(r"^ *dense_pretrain +- +1 +2\.2500 .* -$", text, re.M)
  assert re.search(r"^ *moe_pretrain +- +1 +2\.0000 .* \?$", text, re.M)
  assert re.search(r"^ *moe_ft_edrop +moe_pretrain +0 +not run", text, re.M)
  # Largest shares over fine-tuning, first and last logged step.
  assert (
    "moe_ft layer_01: largest share 0.250 at step 10, 0.250 at step 40" in text
  )
  assert (
    "moe_ft_noaux layer_01: largest share 0.250 at step 10, 0.875 at step 40"
    in text
  )
  assert "moe_ft layer_03: largest share 0.125 at step 10" in text
  # Gains, dense - MoE: pretrained 2.25 - 2.0; single 1.0 - 1.25; multi on
  # code_body 1.5 - 1.0; multi on all 1.5 - 1.25; extra 0.5 - (-0.25).
  for title, gain in (
    ("pretrained (code + prose)", "0.2500"),
    ("single-task on code_body (I2)", "-0.2500"),
    ("multi-task, on code_body (I3)", "0.5000"),
    ("multi-task, all 5 tasks (I1)", "0.2500"),
  ):
    assert re.search(
      rf"^{re.escape(title)}: dense .* = MoE gain {re.escape(gain)} ",
      text,
      re.M,
    ), title
  assert "(multi - single): 0.7500" in text
