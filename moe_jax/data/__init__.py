"""Data for moe_jax: byte-level tokens from an embedded corpus or TFDS.

The default corpus is built from text every Python installation ships (the
standard library's sources and its English reference topics, plus optional
multilingual dialog), prepared once as ArrayRecord files with TFDS and read by
random access with grain; nothing is downloaded. See `pipeline` for the window
layout and `corpus` for what the corpus holds.

  it = create_train_iterator(config.data, seed=config.seed)
  batch = next(it)  # inputs/targets int32 [B, L], mask float32 [B, L],
                    # domain int32 [B]
  state = it.get_state()  # JSON-serialisable; it.set_state(state) resumes
  eval_batches = create_eval_batches(config.data)
  baseline_nats = unigram_baseline(config.data)
"""

from moe_jax.data.corpus import DOMAINS
from moe_jax.data.pipeline import (
  TrainIterator,
  check_config,
  create_eval_batches,
  create_train_iterator,
  unigram_baseline,
)
from moe_jax.data.tokenizer import VOCAB_SIZE

__all__ = [
  "DOMAINS",
  "VOCAB_SIZE",
  "TrainIterator",
  "check_config",
  "create_eval_batches",
  "create_train_iterator",
  "unigram_baseline",
]
