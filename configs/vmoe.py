"""V-MoE routing and losses on the tiny CPU LM (Riquelme et al. 2021; as
coded in google-research/vmoe `vmoe/nn/routing.py`).

8 experts in every other feed-forward block, top-2 of the noisy softmax
over E: the logits get Gaussian noise of fixed std noise_std / E = 1/8 in
training, and the combine weight is the noisy softmax probability. Balanced
by the V-MoE importance loss, CV^2 of the clean softmax summed over the
group, and load loss, CV^2 of the mean probability of clearing the K-th
noisy logit, each with weight 0.005 (vmoe defaults). Capacity as in vmoe,
ceil(CF K S / E) up to a multiple of 4, CF 1.05 train / 4.0 eval (V-MoE
ILSVRC configs), router init lecun-normal (init scale 1.0). V-MoE uses
batch-priority routing for images; it is not causal (a decoder "learns to
cheat"), so this LM keeps k-major priority, which at K = 2 still lets later
first choices decide whether an earlier second choice is kept (README,
Causality).

  python -m moe_jax.train --config=configs/vmoe.py --workdir=runs/vmoe

Expected on a 2-core CPU: see the README's results table.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from base import get_base_config  # noqa: E402


def get_config():
  config = get_base_config()
  config.model.moe.router = "vmoe"
  config.model.moe.top_k = 2
  config.model.moe.router_noise_std = 1.0  # std 1/E
  config.model.moe.router_init_scale = 1.0  # lecun normal
  config.model.moe.capacity_rule = "vmoe"
  config.model.moe.capacity_factor = 1.05
  config.model.moe.eval_capacity_factor = 4.0
  # k-major at K = 2 is not causal (README, Causality); kept as in V-MoE's
  # non-batch-priority order.
  config.model.moe.allow_noncausal = True
  config.loss.load_balancing_weight = 0.0
  config.loss.importance_loss_weight = 0.005
  config.loss.load_loss_weight = 0.005
  return config
