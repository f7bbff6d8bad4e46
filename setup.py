"""moe_jax: a reference JAX/Flax implementation of sparse Mixture-of-Experts."""

import re
from pathlib import Path

from setuptools import find_packages, setup

_HERE = Path(__file__).parent
_VERSION = re.search(
  r'__version__ = "([^"]+)"', (_HERE / "moe_jax" / "__init__.py").read_text()
).group(1)

setup(
  name="moe_jax",
  version=_VERSION,
  description="Reference JAX/Flax implementation of sparse Mixture-of-Experts",
  long_description=(_HERE / "README.md").read_text(),
  long_description_content_type="text/markdown",
  license="Apache-2.0",
  python_requires=">=3.11",
  packages=find_packages(include=["moe_jax", "moe_jax.*"]),
  install_requires=[
    "jax>=0.10.2,<0.13",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "chex>=0.1.92,<0.2",
    "ml-collections>=1.0,<2",
    "tensorflow-datasets>=4.9.7,<5",
    "array-record>=0.6",
    "grain>=0.2.10,<0.3",
    # tfds imports it when preparing a builder defined in a package.
    "importlib_resources>=6",
    "absl-py>=2.1",
    "numpy>=1.26",
    "matplotlib>=3.8",
    "tensorboardX>=2.6",
    "tqdm>=4.66",
  ],
  extras_require={
    "test": [
      "pytest>=8",
      "pytest-xdist>=3.5",
      "hypothesis>=6.100",
      "nbclient>=0.10",
      "nbformat>=5.10",
      "ipykernel>=6.29",
      "jupytext>=1.16",
    ],
    # Adds conversational text in ~28 languages to the default corpus.
    "multilingual": ["chatterbot-corpus>=1.2", "PyYAML>=6"],
    # Needed only for tfds.load / as_dataset; data_source does not use it.
    "tensorflow": ["tensorflow-cpu>=2.16"],
  },
)
