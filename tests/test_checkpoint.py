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


def _data_file(step_dir):
  """The largest array data file of the checkpoint in `step_dir`."""
  return max(
    (p for p in (step_dir / "state").rglob("d/*") if p.is_file()),
    key=lambda p: p.stat().st_size,
  )


def _corrupt(step_dir, how):
  """Damages the checkpoint in `step_dir` the way `how` says."""
  if how == "truncated":
    path = _data_file(step_dir)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  elif how == "garbage":
    path = _data_file(step_dir)
    path.write_bytes(bytes(range(256)) * (path.stat().st_size // 256 + 1))
  elif how == "one_bit":  # tensorstore reads this without complaint
    path = _data_file(step_dir)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
  elif how == "no_commit_marker":
    (step_dir / "commit_success.txt").unlink()
  elif how == "bad_metadata":
    (step_dir / "_CHECKPOINT_METADATA").write_text("{")
  elif how == "data_state":
    (step_dir / "data" / "metadata").write_text('{"position": 99}')
  else:
    raise ValueError(how)


CORRUPTIONS = (
  "truncated",
  "garbage",
  "one_bit",
  "no_commit_marker",
  "bad_metadata",
  "data_state",
)


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_a_bad_newest_checkpoint_is_skipped_and_moved_aside(tmp_path, how):
  """Steps 1 and 2 saved, step 2 damaged: restore_newest_good returns step
  1 bit-identical, names step 2 with a reason, and renames it (not deletes
  it) to 2.corrupt; step 2 can then be saved again."""
  states = {step: _make_state(seed=step) for step in (1, 2)}
  with Checkpointer(tmp_path, max_to_keep=5, save_interval_steps=1) as ckpt:
    for step, state in states.items():
      ckpt.save(step, state, {"position": step})
  _corrupt(tmp_path / "2", how)
  before = sorted(p.name for p in (tmp_path / "2").rglob("*"))
  with Checkpointer(tmp_path, max_to_keep=5, save_interval_steps=1) as ckpt:
    template = jax.tree.map(jnp.zeros_like, states[1])
    state, data_state, step, bad = ckpt.restore_newest_good(template)
    assert (step, data_state) == (1, {"position": 1})
    _assert_identical(state, states[1])
    assert [(b.step, b.path) for b in bad] == [(2, str(tmp_path / "2"))]
    (b,) = bad
    assert b.moved_to == str(tmp_path / "2.corrupt")
    assert b.reason and "\n" not in b.reason
    assert ckpt.all_steps() == [1]
    moved = sorted(p.name for p in (tmp_path / "2.corrupt").rglob("*"))
    assert moved == before
    assert ckpt.save(2, states[2], {"position": 2})
  with Checkpointer(tmp_path, max_to_keep=5, save_interval_steps=1) as ckpt:
    state, _, step, bad = ckpt.restore_newest_good(template)
  assert (step, bad) == (2, [])
  _assert_identical(state, states[2])


def test_every_checkpoint_bad_is_an_error_that_moves_nothing(tmp_path):
  """No good checkpoint: NoGoodCheckpointError (a RuntimeError) naming the
  directory, each step and the ways out; every step directory stays."""
  from moe_jax.checkpoint import NoGoodCheckpointError

  state = _make_state()
  with Checkpointer(tmp_path, max_to_keep=5, save_interval_steps=1) as ckpt:
    ckpt.save(1, state, {"position": 1})
    ckpt.save(2, state, {"position": 2})
  _corrupt(tmp_path / "1", "one_bit")
  _corrupt(tmp_path / "2", "no_commit_marker")
  with Checkpointer(tmp_path, max_to_keep=5, save_interval_steps=1) as ckpt:
    with pytest.raises(RuntimeError) as failed:
      ckpt.restore_newest_good(jax.tree.map(jnp.zeros_like, state))
  assert isinstance(failed.value, NoGoodCheckpointError)
  message = str(failed.value)
  for fragment in (str(tmp_path), "step 2: ", "step 1: ", "delete the workdir"):
    assert fragment in message
  assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]


def test_opening_removes_only_unfinished_writes(tmp_path):
  """A leftover `<step>.orbax-checkpoint-tmp-<t>` directory (a killed write)
  is listed in unfinished_writes and removed when the Checkpointer opens;
  finished steps, a `.corrupt` one and a file with the suffix stay."""
  state = _make_state()
  with Checkpointer(tmp_path, max_to_keep=5, save_interval_steps=1) as ckpt:
    ckpt.save(1, state, {"position": 1})
    ckpt.save(2, state, {"position": 2})
  (tmp_path / "2").rename(tmp_path / "2.orbax-checkpoint-tmp-1700000000")
  (tmp_path / "3.corrupt").mkdir()
  (tmp_path / "note.orbax-checkpoint-tmp.txt").write_text("a file")
  with Checkpointer(tmp_path, max_to_keep=5, save_interval_steps=1) as ckpt:
    assert ckpt.unfinished_writes == [
      str(tmp_path / "2.orbax-checkpoint-tmp-1700000000")
    ]
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [1]
    _, _, step, bad = ckpt.restore_newest_good(
      jax.tree.map(jnp.zeros_like, state)
    )
  assert (step, bad) == (1, [])
  assert sorted(p.name for p in tmp_path.iterdir()) == [
    "1",
    "3.corrupt",
    "note.orbax-checkpoint-tmp.txt",
  ]
