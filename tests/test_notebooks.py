"""Executes the notebooks of notebooks/ end to end with nbclient.

The kernel is pinned to this interpreter: the test writes a kernel spec named
"python3" whose argv starts with `sys.executable` into its own temporary
folder and gives nbclient a kernel manager that looks only there. The default
lookup would take the first "python3" spec on the Jupyter path, which may be
a user-level kernel of another Python without moe_jax. Nothing is installed
into the environment, so this works in a fresh virtualenv that only ran
`pip install -e .[test]`.

02_inspect_a_run.ipynb runs with its parameters cell overridden: a shorter
run, fewer shuffles, and the corpus and run directory under pytest's tmp_path.
"""

import json
import math
import re
import sys
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
_NUMBER = r"([-+0-9.eE]+|nan|inf)"


def _kernel_manager(root: Path) -> AsyncKernelManager:
  spec_dir = root / "kernels" / "python3"
  spec_dir.mkdir(parents=True)
  spec = {
    "argv": [
      sys.executable,
      "-m",
      "ipykernel_launcher",
      "-f",
      "{connection_file}",
    ],
    "display_name": "Python 3 (this interpreter)",
    "language": "python",
  }
  (spec_dir / "kernel.json").write_text(json.dumps(spec))
  specs = KernelSpecManager(
    kernel_dirs=[str(root / "kernels")], ensure_native_kernel=False
  )
  return AsyncKernelManager(kernel_name="python3", kernel_spec_manager=specs)


def _execute(name: str, tmp_path: Path, overrides: dict | None = None) -> str:
  """Runs notebooks/<name> in tmp_path; returns its printed text."""
  notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
  if overrides:
    (cell,) = [
      c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])
    ]
    lines = [f"{key} = {value!r}" for key, value in overrides.items()]
    cell.source += "\n# Overridden by tests/test_notebooks.py.\n"
    cell.source += "\n".join(lines)
  km = _kernel_manager(tmp_path)
  assert km.kernel_spec.argv[0] == sys.executable
  client = NotebookClient(
    notebook,
    km=km,
    timeout=240,
    resources={"metadata": {"path": str(tmp_path)}},
  )
  client.execute()  # raises CellExecutionError if a cell fails
  outputs = [out for cell in notebook.cells for out in cell.get("outputs", [])]
  assert not [out for out in outputs if out.output_type == "error"]
  return "".join(
    out.get("text", "") for out in outputs if out.output_type == "stream"
  )


def test_routing_by_hand(tmp_path):
  text = _execute("01_routing_by_hand.ipynb", tmp_path)
  difference = re.search(r"max \|difference\| = " + _NUMBER, text)
  assert difference and float(difference.group(1)) < 1e-6
  assert "matches the hand formula: True" in text
  assert "mixtral weights == gshard weights: True" in text


def test_inspect_a_run(tmp_path):
  text = _execute(
    "02_inspect_a_run.ipynb",
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
