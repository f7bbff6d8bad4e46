"""Executes the notebooks and stores them with their outputs.

  python experiments/execute_notebooks.py            # every notebook
  python experiments/execute_notebooks.py notebooks/01_routing_by_hand.py

The sources are notebooks/NN_name.py in jupytext's percent format, paired
with notebooks/NN_name.ipynb by notebooks/jupytext.toml. For each source this
script

  1. copies its cells into the .ipynb (`jupytext --update --to ipynb`):
     the inputs come from the .py whatever the file times say, and the cell
     ids and notebook metadata of the .ipynb are kept;
  2. runs the notebook top to bottom in a fresh kernel of this interpreter
     (nbclient), in the notebooks folder, with its parameters as written;
  3. writes the .ipynb back with its outputs (plots as PNG), without cell
     timings or the kernel's version details, so that rerunning unchanged
     sources changes only what the computation itself changes.

A failing cell stops the script with the cell's traceback and leaves that
.ipynb with the new inputs but its old outputs.
"""

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import jupytext.cli
import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"


def sources() -> list[Path]:
  """The notebook sources: notebooks/NN_*.py."""
  return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))


def kernel_manager(root: Path) -> AsyncKernelManager:
  """A kernel manager whose only "python3" kernel runs this interpreter.

  The spec lives in `root`; the default lookup would take the first
  "python3" spec on the Jupyter path, which may be a user-level kernel of
  another Python without moe_jax. Nothing is installed into the
  environment.
  """
  spec_dir = root / "kernels" / "python3"
  spec_dir.mkdir(parents=True, exist_ok=True)
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


def run(notebook, cwd: Path, kernel_root: Path, timeout: int = 600):
  """Executes `notebook` in place in a fresh kernel, in directory `cwd`.

  Raises nbclient's CellExecutionError when a cell fails. The notebook's
  metadata is restored afterwards (the kernel would add its version
  details), and no cell timings are recorded.
  """
  metadata = copy.deepcopy(notebook.metadata)
  client = NotebookClient(
    notebook,
    km=kernel_manager(kernel_root),
    timeout=timeout,
    record_timing=False,
    resources={"metadata": {"path": str(cwd)}},
  )
  client.execute()
  notebook.metadata = metadata
  return notebook


def execute(source: Path):
  """Steps 1-3 of the module docstring for one notebook source."""
  target = source.with_suffix(".ipynb")
  jupytext.cli.jupytext([str(source), "--to", "ipynb", "--update", "--quiet"])
  notebook = nbformat.read(target, as_version=4)
  with tempfile.TemporaryDirectory() as kernel_root:
    run(notebook, source.parent, Path(kernel_root))
  nbformat.write(notebook, target)
  return target


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "notebooks",
    nargs="*",
    type=Path,
    help="sources notebooks/NN_name.py (or their .ipynb); default: all",
  )
  args = parser.parse_args(argv)
  for path in args.notebooks or sources():
    source = path.resolve().with_suffix(".py")
    if source.parent != NOTEBOOKS or source not in sources():
      raise SystemExit(
        f"{path} is not a notebook source; allowed: "
        f"{', '.join(str(s.relative_to(REPO)) for s in sources())}."
      )
    target = execute(source)
    size = target.stat().st_size / 1e6
    print(f"executed {target.relative_to(REPO)} ({size:.2f} MB)")


if __name__ == "__main__":
  main()
