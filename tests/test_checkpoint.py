"""Tests for moe_jax.checkpoint: exact round trips and the save policy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import freeze
from flax.training import train_state

from moe_jax.checkpoint import Checkpointer


class _Tiny(nn.Module):
  """Dense + BatchNorm: params and a non-trainable batch_stats collection."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(4)(x)
    return nn.BatchNorm(use_running_average=False)(x)


def _make_state(seed=0):
  """A TrainState-like dict after one real AdamW step (mu, nu, count != 0)."""
  model = _Tiny()
  x = jax.random.normal(jax.random.key(seed), (8, 3))
  variables = model.init(jax.random.key(seed + 1), x)
  params = freeze(variables["params"])
  tx = optax.adamw(1e-2)
  opt_state = tx.init(params)

  def loss_fn(p):
    y, _ = model.apply(
      {"params": p, "batch_stats": variables["batch_stats"]},
      x,
      mutable=["batch_stats"],
    )
    return jnp.mean(y**2)

  grads = jax.grad(loss_fn)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  return {
    "params": params,
    "opt_state": opt_state,
    "step": jnp.asarray(1, jnp.int32),
    "rng": jax.random.key_data(jax.random.key(seed + 2)),
    "batch_stats": variables["batch_stats"],
  }


def _assert_identical(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(
    jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True
  ):
    assert a.dtype == e.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e))
    assert np.asarray(a).tobytes() == np.asarray(e).tobytes()  # bit-identical


def test_restore_is_bit_identical_after_reopening(tmp_path):
  state = _make_state()
  data_state = {"epoch": 2, "position": 1234, "order": [3, 1, 2]}
  ckpt = Checkpointer(tmp_path / "ckpt", max_to_keep=2, save_interval_steps=5)
  assert ckpt.save(10, state, data_state)
  ckpt.close()

  reopened = Checkpointer(
    tmp_path / "ckpt", max_to_keep=2, save_interval_steps=5
  )
  template = jax.tree.map(jnp.zeros_like, state)
  restored, restored_data = reopened.restore(template)
  reopened.close()
  _assert_identical(restored, state)
  assert restored["step"].dtype == jnp.int32
  assert restored["rng"].dtype == jnp.uint32
  assert restored_data == data_state
  # The optax namedtuple survives as a namedtuple, with its fields.
  adam_state = restored["opt_state"][0]
  assert type(adam_state).__name__ == "ScaleByAdamState"
  assert int(adam_state.count) == 1


def test_restore_into_abstract_template_keeps_shardings(tmp_path):
  state = _make_state()
  with Checkpointer(tmp_path, max_to_keep=1, save_interval_steps=1) as ckpt:
    ckpt.save(3, state, {})
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      state,
    )
    restored, data_state = ckpt.restore(abstract)
  _assert_identical(restored, state)
  assert data_state == {}
  assert all(x.sharding == sharding for x in jax.tree.leaves(restored))


def test_flax_train_state_round_trips(tmp_path):
  params = freeze({"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)})
  state = train_state.TrainState.create(
    apply_fn=lambda *a: None, params=params, tx=optax.adamw(1e-3)
  ).replace(step=jnp.asarray(7, jnp.int32))
  with Checkpointer(tmp_path, max_to_keep=1, save_interval_steps=7) as ckpt:
    assert ckpt.save(7, state, {"position": 7})
    template = state.replace(params=jax.tree.map(jnp.zeros_like, params))
    restored, _ = ckpt.restore(template)
  assert isinstance(restored, train_state.TrainState)
  assert restored.apply_fn is state.apply_fn  # taken from the template
  np.testing.assert_array_equal(restored.params["w"], params["w"])
  assert restored.step.dtype == jnp.int32 and int(restored.step) == 7


def test_save_interval_force_and_duplicates(tmp_path):
  state = {"x": jnp.arange(3)}
  with Checkpointer(tmp_path, max_to_keep=5, save_interval_steps=5) as ckpt:
    # orbax alone would save a first step of 3; the interval forbids it.
    assert not ckpt.save(3, state, {})
    assert ckpt.save(5, state, {})
    assert not ckpt.save(6, state, {})
    assert ckpt.save(7, state, {}, force=True)
    assert not ckpt.save(7, state, {}, force=True)  # already saved
    assert ckpt.save(10, state, {})
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [5, 7, 10]
    assert ckpt.latest_step() == 10


def test_max_to_keep_and_restore_of_a_given_step(tmp_path):
  with Checkpointer(tmp_path, max_to_keep=2, save_interval_steps=1) as ckpt:
    for step in range(4):
      ckpt.save(step, {"x": jnp.full((2,), step, jnp.float32)}, {"pos": step})
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [2, 3]
    template = {"x": jnp.zeros((2,), jnp.float32)}
    latest, latest_data = ckpt.restore(template)
    older, older_data = ckpt.restore(template, step=2)
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == [
    "2",
    "3",
  ]
  np.testing.assert_array_equal(latest["x"], [3.0, 3.0])
  assert latest_data == {"pos": 3}
  np.testing.assert_array_equal(older["x"], [2.0, 2.0])
  assert older_data == {"pos": 2}


def test_keep_steps_are_saved_off_the_interval_and_survive_cleanup(tmp_path):
  # Interval 3, max_to_keep 1, keep steps 2 and 5: steps 2, 3, 5, 6 are
  # written; cleanup leaves the newest (6) and the kept 2 and 5 (3 goes).
  with Checkpointer(
    tmp_path, max_to_keep=1, save_interval_steps=3, keep_steps=(5, 2)
  ) as ckpt:
    saved = [
      step
      for step in range(1, 7)
      if ckpt.save(step, {"x": jnp.full((2,), step, jnp.float32)}, {})
    ]
    ckpt.wait_until_finished()
    assert saved == [2, 3, 5, 6]
    assert ckpt.all_steps() == [2, 5, 6]
    kept, _ = ckpt.restore({"x": jnp.zeros((2,), jnp.float32)}, step=2)
  np.testing.assert_array_equal(kept["x"], [2.0, 2.0])
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == [
    "2",
    "5",
    "6",
  ]
  with pytest.raises(ValueError, match=r"keep_steps=\[-1\]"):
    Checkpointer(
      tmp_path, max_to_keep=1, save_interval_steps=1, keep_steps=[-1]
    )


def test_restore_with_nothing_saved_names_the_directory(tmp_path):
  directory = tmp_path / "empty"
  with Checkpointer(directory, max_to_keep=1, save_interval_steps=1) as ckpt:
    assert ckpt.latest_step() is None
    with pytest.raises(FileNotFoundError, match=str(directory)):
      ckpt.restore({"x": jnp.zeros(2)})


def test_restore_of_a_missing_step_lists_saved_steps(tmp_path):
  with Checkpointer(tmp_path, max_to_keep=1, save_interval_steps=1) as ckpt:
    ckpt.save(4, {"x": jnp.zeros(2)}, {})
    with pytest.raises(FileNotFoundError, match=r"step=9 .*\[4\]"):
      ckpt.restore({"x": jnp.zeros(2)}, step=9)


@pytest.mark.parametrize(
  "template, message",
  [
    ({"x": jnp.zeros(2, jnp.bfloat16)}, "'x' has dtype bfloat16"),
    ({"x": jnp.zeros(3)}, r"'x' has shape \(3,\)"),
    ({"y": jnp.zeros(2)}, r"not in the checkpoint, e.g. \[.y.\]"),
  ],
)
def test_mismatched_template_is_rejected(tmp_path, template, message):
  with Checkpointer(tmp_path, max_to_keep=1, save_interval_steps=1) as ckpt:
    ckpt.save(1, {"x": jnp.ones(2, jnp.float32)}, {})
    with pytest.raises(ValueError, match=message):
      ckpt.restore(template)


def test_bad_arguments_are_rejected(tmp_path):
  with pytest.raises(ValueError, match="max_to_keep=0"):
    Checkpointer(tmp_path, max_to_keep=0, save_interval_steps=1)
  with pytest.raises(ValueError, match="save_interval_steps=0"):
    Checkpointer(tmp_path, max_to_keep=1, save_interval_steps=0)


def test_typed_prng_keys_round_trip(tmp_path):
  state = {"rng": jax.random.key(42), "step": jnp.asarray(2, jnp.int32)}
  with Checkpointer(tmp_path, max_to_keep=1, save_interval_steps=1) as ckpt:
    ckpt.save(2, state, {})
    restored, _ = ckpt.restore(jax.eval_shape(lambda: state))
  assert jax.dtypes.issubdtype(restored["rng"].dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(
    jax.random.key_data(restored["rng"]), jax.random.key_data(state["rng"])
  )


def test_should_save_answers_what_save_would_do(tmp_path):
  with Checkpointer(tmp_path, max_to_keep=5, save_interval_steps=5) as ckpt:
    assert not ckpt.should_save(3)
    assert ckpt.should_save(3, force=True)
    assert ckpt.should_save(5)
    ckpt.save(5, {"x": jnp.zeros(2)}, {})
    assert not ckpt.should_save(5)
    assert not ckpt.should_save(5, force=True)  # already saved
    ckpt.wait_until_finished()
    assert ckpt.step_path(5) == str(tmp_path / "5")
    assert (tmp_path / "5").is_dir()
