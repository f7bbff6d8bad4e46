"""The DeepSeek-V3 routing of configs/deepseek_v3.py balanced by an
auxiliary loss alone: the "auxiliary-loss-controlled" baseline of Wang et
al. 2024 (§4.1, Table 2).

Identical model, data and seed; the bias never moves (u = 0, so experts are
chosen by TopK(s) within the expert groups), and the balance loss
alpha sum_i f_i P_i of DeepSeek-V3 Eqs. 17-20 (per sequence; Wang 2024
Eqs. 2-3 are the same loss) gets alpha = 1e-3, Wang 2024's value for
sigmoid gates. Compare its moe/layer_XX/max_violation_after_bias with that of
deepseek_v3 (Wang 2024 Table 2: MaxVio_global 0.72 with the aux loss vs
0.04 loss-free, at 1B parameters).

  python -m moe_jax.train --config=configs/deepseek_aux_loss.py --workdir=runs/deepseek_aux_loss
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deepseek_v3  # noqa: E402


def get_config():
  config = deepseek_v3.get_config()
  config.model.moe.bias_update_rate = 0.0  # no loss-free balancing
  config.loss.sequence_balance_weight = 1e-3  # Wang 2024 §4.1, sigmoid
  return config
