"""Shared base of every moe_jax config: a tiny decoder LM, embedded corpus.

Every config file in this folder starts from `get_base_config()` and changes
only what its experiment is about. Run any of them with

  python -m moe_jax.train --config=configs/switch_top1.py --workdir=runs/switch

and override single values with `--config.model.moe.num_experts=16`.
"""

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
  """Returns the defaults shared by all configs (a Switch top-1 MoE LM)."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  # ---- fine-tuning (moe_jax.finetune; README "Fine-tuning and upcycling"):
  # start a fresh run from another run's checkpoint: "" (none) | a workdir
  # (its newest checkpoint) | a step directory <workdir>/checkpoints/<step>.
  # Read only when this workdir has no checkpoint; the step restarts at 0.
  config.init_from = ""
  # What init_from restores: "params" (always) and any of "router_state"
  # (the DeepSeek bias) and "opt_state" (the Adam moments; else fresh).
  config.init_restore = ("params", "router_state")
  # Sparse upcycling (Komatsuzaki et al. 2022): init_from is a dense run;
  # each expert starts as a copy of its block's dense FFN, routers fresh.
  config.init_upcycle = False

  # ---- data: the embedded corpus (moe_jax.data) or a prepared TFDS corpus.
  config.data = ml_collections.ConfigDict()
  config.data.source = "embedded"  # "embedded" | "tfds" | "instructions"
  # Embedded corpus: which parts of the Python installation to include.
  config.data.domains = ("code", "prose")  # add "dialog" with [multilingual]
  config.data.max_code_bytes = 4_000_000  # caps the (large) stdlib source
  config.data.validation_fraction = 0.05
  # source="instructions": instruction -> response examples cut from the
  # embedded corpus (moe_jax.data.instructions; loss on the response only).
  config.data.instruction_tasks = (
    "code_body",
    "code_name",
    "code_docstring",
    "prose_continue",
    "prose_topic",
  )
  # TFDS corpora (lm1b, c4, ...), read from an already prepared data_dir.
  config.data.tfds_name = ""
  config.data.tfds_text_key = "text"
  config.data.tfds_train_split = "train"
  config.data.tfds_eval_split = "test"
  config.data.data_dir = ""  # "" = ~/.cache/moe_jax/tensorflow_datasets
  config.data.seq_len = 128
  config.data.batch_size = 16
  config.data.eval_batch_size = 32
  config.data.num_eval_batches = 8

  # ---- model: decoder-only transformer; MoE replaces every moe_every-th FFN.
  config.model = ml_collections.ConfigDict()
  config.model.d_model = 128
  config.model.num_layers = 4
  config.model.num_heads = 4
  config.model.mlp_dim = 512  # width of the dense FFN blocks
  config.model.activation = "gelu"  # "relu" | "gelu" | "silu"
  config.model.gated = False  # gated linear unit FFN (GEGLU / SwiGLU)
  config.model.dropout_rate = 0.0
  config.model.dtype = "float32"  # activations; the router stays float32
  config.model.moe_every = 2  # 1: all layers; 2: every other (Switch, GLaM)
  config.model.moe = ml_collections.ConfigDict()
  config.model.moe.num_experts = 8  # 0 = dense model
  config.model.moe.router = "switch"  # see moe_jax.routing.ROUTERS
  config.model.moe.top_k = 1
  config.model.moe.expert_dim = 512  # F, hidden width of each expert
  config.model.moe.group_size = 512  # S, tokens routed together
  config.model.moe.capacity_factor = 1.25
  config.model.moe.eval_capacity_factor = 2.0
  # C per expert per group (moe_jax.routing.CAPACITY_RULES): "switch" |
  # "gshard" | "flaxformer" | "vmoe" | "megatron" | "maxtext" (int(ceil(S K /
  # E) CF)) | "praxis" (int(S CF / E) up to a multiple of 4, no K).
  config.model.moe.capacity_rule = "switch"
  config.model.moe.min_capacity = 4
  config.model.moe.priority = (
    "k_major"  # "k_major" | "token_major" | "batch_priority"
  )
  # Drop order at evaluation, for the eval_router too ("": priority);
  # "token_major" keeps a top-K (K >= 2) evaluation causal.
  config.model.moe.eval_priority = ""
  config.model.moe.second_policy = (
    "all"  # GShard: "all" | "random" | "threshold"
  )
  config.model.moe.second_threshold = 0.2
  # Does a later choice the policy rejected use up a slot number of its
  # expert? "kept_only" (no: Lingvo, Mesh TF) | "gshard_alg1" (yes: GShard
  # Alg. 1 advances the counter for every second choice).
  config.model.moe.second_choice_counting = "kept_only"
  config.model.moe.renormalize_after_drop = False
  # How tokens reach the experts (moe_jax.dispatch): "einsum" (one-hot
  # [G,S,E,C] tensors, GShard), "indices" (gathers into [E,G,C,D] buffers)
  # or "dropless" (no capacity: pairs sorted by expert, grouped matmul).
  config.model.moe.dispatch = "indices"
  # Grouped matmul of "dropless": "auto" (ragged_dot on GPU/TPU, tiles on
  # CPU) | "tiles" | "ragged_dot"; tile_size 0 = chosen from N and E.
  config.model.moe.grouped_matmul = "auto"
  config.model.moe.tile_size = 0
  config.model.moe.router_init_scale = 0.1  # Switch: 0.1x the default init
  config.model.moe.router_jitter = 0.0  # Switch App. C uses 1e-2
  config.model.moe.router_bias = False
  # dtype of the router dot x W_r and softmax: "float32" (Switch §2.4
  # selective precision) | "bfloat16" (logits and probabilities rounded to
  # bf16, Switch Table 2's baseline; not for sinkhorn / deepseek). Parameters
  # stay float32 either way.
  config.model.moe.router_dtype = "float32"
  # Tokens-choose rule applied to the router's logits at evaluation ("":
  # route as in training), e.g. "top_k" for a causal eval of expert choice.
  config.model.moe.eval_router = ""
  # Expert choice and Sinkhorn routing read later tokens of the group; they
  # are refused in this decoder unless this is set.
  config.model.moe.allow_noncausal = False
  config.model.moe.router_noise_std = 1.0  # V-MoE: noise std = this / E
  config.model.moe.routing_seed = 0  # hash table; random routing at eval
  # DeepSeek-V3 router (router="deepseek", see moe_jax.deepseek): loss-free
  # balancing bias step u (Wang 2024 Fig. 4: 1e-3; 0 turns it off), group-
  # limited routing (1 group: plain top-k; a group scores the sum of its
  # expert_group_score_k best biased scores, DeepSeek-V3: 2) and the gate
  # scale (DeepSeek-V3: 2.5 at 256 experts).
  config.model.moe.bias_update_rate = 1e-3
  config.model.moe.num_expert_groups = 1
  config.model.moe.top_expert_groups = 1
  config.model.moe.expert_group_score_k = 2
  config.model.moe.routed_scaling_factor = 1.0
  # P of its sequence-wise balance loss (moe_jax.losses.sequence_balance_loss):
  # "deepseek_v3" (Eqs. 17-20, normalised scores s / sum_j s_j; 1 at
  # balance) | "wang2024" (Wang 2024 Eqs. 2-3, raw sigmoid scores; about
  # E / 2 at balance, so far stronger at the same weight).
  config.model.moe.sequence_balance_form = "deepseek_v3"
  # Always-active shared experts beside the routed ones, for any router
  # (DeepSeek-V3 Eq. 12); width 0 = expert_dim.
  config.model.moe.num_shared_experts = 0
  config.model.moe.shared_expert_dim = 0
  # Dropout on the experts' hidden activations, in training only (Switch §4,
  # Table 4: 0.4 inside the experts with 0.1 elsewhere for fine-tuning);
  # model.dropout_rate stays the rate everywhere else.
  config.model.moe.expert_dropout_rate = 0.0

  # ---- loss: LM cross-entropy + coefficient x each auxiliary loss.
  config.loss = ml_collections.ConfigDict()
  config.loss.load_balancing = (
    "switch"  # see moe_jax.losses.LOAD_BALANCING_LOSSES
  )
  config.loss.load_balancing_weight = 1e-2
  config.loss.router_z_loss_weight = 0.0
  # CV^2 losses sown by the noisy routers (Shazeer 2017 or V-MoE form).
  config.loss.importance_loss_weight = 0.0
  config.loss.load_loss_weight = 0.0
  # alpha of the sequence-wise balance loss (DeepSeek-V3 §4.2: 1e-4; Wang
  # 2024 §4.1: 1e-3 in its own form), sown by router="deepseek" only.
  config.loss.sequence_balance_weight = 1e-4
  config.loss.layer_reduction = (
    "sum"  # over MoE layers: "sum" (Switch) | "mean"
  )

  # ---- optimizer: AdamW, linear warmup then cosine decay.
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 3e-3
  config.optimizer.warmup_steps = 100
  config.optimizer.schedule = "cosine"  # "cosine" | "linear" | "constant"
  config.optimizer.final_learning_rate_fraction = 0.1
  config.optimizer.weight_decay = 0.01
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.98
  config.optimizer.grad_clip_norm = 1.0
  # Parameter groups that get no update at all (no Adam step, no weight
  # decay), e.g. ("non_expert",) or ("router",) for fine-tuning (ST-MoE §4):
  # "router" | "experts" | "non_expert" | "embeddings"; see
  # moe_jax.finetune.PARAM_GROUPS for the paths each one matches.
  config.optimizer.freeze = ()
  # The router's parameters learn at learning_rate x this (ST-MoE §4).
  config.optimizer.router_learning_rate_multiplier = 1.0
  # A step whose loss terms or gradient norm are not finite: "stop" the run
  # (errors.DivergenceError) | "skip" it (optax.apply_if_finite: params,
  # optimizer state and router state stay as they were; the step counter
  # and the data move on) until more than max_consecutive_nonfinite_skips
  # steps in a row are, which stops the run as "stop" does.
  config.optimizer.on_nonfinite = "stop"
  config.optimizer.max_consecutive_nonfinite_skips = 5

  # ---- mesh: devices as (data, expert, model); see moe_jax.sharding and the
  # README's "Distributed training". All 1s: one device, no mesh.
  config.mesh = ml_collections.ConfigDict()
  config.mesh.shape = (1, 1, 1)  # (data, expert, model); one size may be -1
  config.mesh.expert_parallel = "shard_map"  # "shard_map" | "gspmd"
  # Overrides of moe_jax.sharding.LOGICAL_AXIS_RULES: ((name, mesh_axes), ...)
  config.mesh.logical_axis_rules = ()

  # ---- train loop.
  config.train = ml_collections.ConfigDict()
  config.train.num_steps = 1500
  config.train.log_every = 50
  config.train.eval_every = 250
  config.train.checkpoint_every = 500
  config.train.max_checkpoints_to_keep = 2
  # Steps whose checkpoints are also saved (whatever checkpoint_every says)
  # and never cleaned up, e.g. (100, 500) to see when routing settles
  # (`python -m moe_jax.analysis`); each in 1 .. num_steps.
  config.train.keep_checkpoint_steps = ()
  config.train.progress_bar = True
  # Draw <workdir>/summary.png (loss curves, expert load) when training ends;
  # the smoke-scale reproductions turn it off (about 0.75 s per arm).
  config.train.summary_plot = True
  return config
