"""The paper-scale run books in configs/paper/: each builds at full size
without allocating, has the paper's parameter count (within what the
decoder-only, byte-vocabulary mapping changes) and trains one step when
shrunk."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import data
from moe_jax.models import TransformerConfig, TransformerLM
from tests.tiny import shrink, train_briefly

PAPER_DIR = Path(__file__).resolve().parents[1] / "configs" / "paper"

# (config file, get_config argument) -> what the papers state:
#   total: total parameters reported (encoder-decoder with sentencepiece
#     vocabularies for Switch / ST-MoE); tolerance: relative, documented in
#     each config's docstring (cross-attention, sparse-dense FFNs, attention
#     width and vocabulary are what the mapping drops).
#   moe_layers: MoE layers (encoder + decoder for the T5 models).
#   expert: parameters of ONE expert from the paper's widths:
#     matrices x d_model x d_ff (2 ungated, 3 for GEGLU).
PAPER = {
  # Table 8 "7410M" (Table 9: 7B); switch_base.gin: 6 + 6 sparse layers,
  # ReLU experts 768 x 3072.
  ("switch_base", None): dict(
    total=7.41e9,
    tolerance=0.05,
    moe_layers=12,
    experts=128,
    expert=2 * 768 * 3072,
  ),
  # Table 11: 4.1B; §7: six sparse layers per stack, 32 experts; GEGLU
  # d_model 1024, d_ff 2816.
  ("st_moe_l", None): dict(
    total=4.1e9,
    tolerance=0.10,
    moe_layers=12,
    experts=32,
    expert=3 * 1024 * 2816,
  ),
  # Abstract / Table 11: 269B; st_moe_32b.gin: 6 + 6 sparse layers, 64
  # experts; GEGLU 5120 x 20480.
  ("st_moe_32b", None): dict(
    total=269e9,
    tolerance=0.10,
    moe_layers=12,
    experts=64,
    expert=3 * 5120 * 20480,
  ),
  # GLaM Table 4; MoE in every other of L layers; ungated GELU experts.
  ("glam_64e", "size=0.1b"): dict(
    total=1.9e9,
    tolerance=0.10,
    moe_layers=6,
    experts=64,
    expert=2 * 768 * 3072,
  ),
  ("glam_64e", "size=1.7b"): dict(
    total=27e9,
    tolerance=0.10,
    moe_layers=12,
    experts=64,
    expert=2 * 2048 * 8192,
  ),
  ("glam_64e", "size=8b"): dict(
    total=143e9,
    tolerance=0.10,
    moe_layers=16,
    experts=64,
    expert=2 * 4096 * 16384,
  ),
  ("glam_64e", None): dict(  # 64B/64E: 1.2T
    total=1.2e12,
    tolerance=0.10,
    moe_layers=32,
    experts=64,
    expert=2 * 8192 * 32768,
  ),
}


def load(name: str):
  path = PAPER_DIR / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"paper_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def abstract_params(config):
  """Parameter shapes of the full-size model, via eval_shape (no memory)."""
  model = TransformerLM(TransformerConfig.from_config(config, data.VOCAB_SIZE))
  tokens = jax.ShapeDtypeStruct((1, config.data.seq_len), jnp.int32)
  variables = jax.eval_shape(model.init, jax.random.key(0), tokens)
  return variables["params"]


def _size(leaf) -> int:
  return int(np.prod(leaf.shape))


def test_every_paper_config_is_covered():
  files = {p.stem for p in PAPER_DIR.glob("*.py")}
  assert files == {name for name, _ in PAPER}


@pytest.mark.parametrize("name", sorted({n for n, _ in PAPER}))
def test_paper_config_is_a_run_book(name):
  module = load(name)
  command = (
    f"python -m moe_jax.train --config=configs/paper/{name}.py "
    f"--workdir=runs/{name}"
  )
  assert command in module.__doc__
  for word in ("decoder", "Hardware", "unverified", "tfds"):
    assert word in module.__doc__, word
  config = module.get_config()
  config.lock()
  with pytest.raises(AttributeError):
    config.model.no_such_field = 1


def test_glam_rejects_an_unknown_size():
  with pytest.raises(ValueError, match="size='3b'"):
    load("glam_64e").get_config("size=3b")


@pytest.mark.parametrize("key", list(PAPER), ids=lambda k: f"{k[0]}:{k[1]}")
def test_full_size_matches_the_paper(key):
  name, arg = key
  paper = PAPER[key]
  config = load(name).get_config(arg)
  params = abstract_params(config)
  moe_layers = {
    layer: block["moe"]
    for layer, block in params.items()
    if isinstance(block, dict) and "moe" in block
  }
  assert len(moe_layers) == paper["moe_layers"]
  for moe in moe_layers.values():
    experts = sum(
      _size(leaf)
      for path, leaf in jax.tree_util.tree_leaves_with_path(moe)
      if "router" not in jax.tree_util.keystr(path).lower()
    )
    assert experts == paper["experts"] * paper["expert"]
  total = sum(_size(leaf) for leaf in jax.tree.leaves(params))
  assert abs(total / paper["total"] - 1) < paper["tolerance"], total


_TRAINED = {}  # shrunk model + loss settings -> the step's metrics


@pytest.mark.parametrize("name", sorted({n for n, _ in PAPER}))
def test_shrunk_trains_one_step(name, tmp_path_factory):
  """Widths, layers, experts, batch and sequence shrunk (tests/tiny.py), the
  routing kept; float32 and two blocks with MoE in the second, to compile
  fast. Configs that shrink to the same model (ST-MoE-L and -32B) share one
  compiled step."""
  config = load(name).get_config()
  moe, loss = config.model.moe, config.loss
  routing = (
    moe.router,
    moe.top_k,
    moe.capacity_rule,
    moe.capacity_factor,
    moe.priority,
    loss.load_balancing_weight,
    loss.router_z_loss_weight,
  )
  config = shrink(config, tmp_path_factory.getbasetemp() / "tfds")
  config.model.num_layers = 2
  config.model.moe_every = 2
  config.model.dtype = "float32"
  moe, loss = config.model.moe, config.loss
  assert routing == (
    moe.router,
    moe.top_k,
    moe.capacity_rule,
    moe.capacity_factor,
    moe.priority,
    loss.load_balancing_weight,
    loss.router_z_loss_weight,
  )
  key = repr((config.model.to_dict(), config.loss.to_dict()))
  if key not in _TRAINED:
    (_TRAINED[key],) = train_briefly(config, 1)
  row = _TRAINED[key]
  assert np.isfinite(row["lm_loss"]) and row["lm_loss"] > 0
  assert np.isfinite(row["loss"])
