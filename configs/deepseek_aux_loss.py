"""The DeepSeek-V3 routing of configs/deepseek_v3.py balanced by an
auxiliary loss alone: the "auxiliary-loss-controlled" baseline of Wang et
al. 2024 (§4.1, Table 2).

Identical model, data and seed; the bias never moves (u = 0, so experts are
chosen by TopK(s) within the expert groups), and the balance loss is Wang
2024's own (Eqs. 2-3, per sequence):

  L = alpha sum_i f_i P_i,  f_i = E / (K T) sum_t 1{t chose i},
  P_i = (1/T) sum_t s_{i,t}   (the RAW sigmoid scores s)

with alpha = 1e-3, Wang 2024's value for sigmoid gates (§4.1). This is NOT
DeepSeek-V3's complementary loss (Eqs. 17-20), whose P averages the
normalised s' = s / sum_j s_j: at E = 16 and scores near 0.5 that loss is 1
at balance where Wang's is E * 0.5 = 8, and the part of its gradient that
tells experts apart is sum_j s_j = 8 times smaller (the whole gradient 9 or
more times), so at alpha = 1e-3 it is a far weaker baseline. The form is
`model.moe.sequence_balance_form`, "wang2024" here; this config used the V3
form until the fix of issue 10, and the README marks the results measured
with it.

Compare eval/moe/layer_XX/max_violation_after_bias_global with that of
deepseek_v3 (Wang 2024 Table 2 reports MaxVio_global, the load pooled over
the validation set: 0.72 with the aux loss vs 0.04 loss-free, at 1B
parameters); `_batch` is the mean over the eval batches of each batch's.

  python -m moe_jax.train --config=configs/deepseek_aux_loss.py --workdir=runs/deepseek_aux_loss
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deepseek_v3  # noqa: E402


def get_config():
  config = deepseek_v3.get_config()
  config.model.moe.bias_update_rate = 0.0  # no loss-free balancing
  config.model.moe.sequence_balance_form = "wang2024"  # Wang 2024 Eqs. 2-3
  config.loss.sequence_balance_weight = 1e-3  # Wang 2024 §4.1, sigmoid
  return config
