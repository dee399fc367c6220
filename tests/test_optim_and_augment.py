"""SGD / schedule against a numpy transcription of torch.optim.SGD + MultiStepLR; augmentation properties."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mgd_jax import optim
from mgd_jax.data import augment
from mgd_jax.train import mesh as mesh_lib


def _cfg(**kw):
    return ml_collections.ConfigDict(dict(dict(lr=0.05, momentum=0.9, weight_decay=5e-4, milestones=(2, 3),
                                               gamma=0.1), **kw))


def test_sgd_matches_torch_semantics():
    spe = 3  # steps per epoch
    rng = np.random.default_rng(0)
    p = {"w": rng.normal(size=(4, 3)).astype(np.float32), "b": rng.normal(size=(3,)).astype(np.float32)}
    grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in p.items()} for _ in range(5 * spe)]
    tx = optim.sgd(_cfg(), spe)
    params, state = jax.tree.map(jnp.asarray, p), None
    state = tx.init(params)
    ref = {k: v.astype(np.float64) for k, v in p.items()}
    buf = None
    for t, g in enumerate(grads):
        upd, state = tx.update(jax.tree.map(jnp.asarray, g), state, params)
        params = optax.apply_updates(params, upd)
        # torch: d_p = g + wd p ; buf = d_p (first) else mom*buf + d_p ; p -= lr * buf ; lr per epoch
        epoch = t // spe
        lr = 0.05 * 0.1 ** sum(epoch >= m for m in (2, 3))
        d = {k: g[k] + 5e-4 * ref[k] for k in ref}
        buf = d if buf is None else {k: 0.9 * buf[k] + d[k] for k in ref}
        ref = {k: ref[k] - lr * buf[k] for k in ref}
    for k in ref:
        np.testing.assert_allclose(params[k], ref[k], rtol=2e-5, atol=1e-6)


def test_schedule_is_per_epoch():
    s = optim.multistep_schedule(0.05, (150, 180, 210), 0.1, 782)
    assert np.isclose(s(0), 0.05) and np.isclose(s(150 * 782 - 1), 0.05)
    assert np.isclose(s(150 * 782), 0.005) and np.isclose(s(180 * 782), 0.0005)
    assert np.isclose(s(240 * 782 - 1), 0.00005)


def test_epoch_batches_deterministic_and_complete():
    a = mesh_lib.epoch_batches(50000, 64, seed=1, epoch=3, pass_id=0, multiple_of=1)
    b = mesh_lib.epoch_batches(50000, 64, seed=1, epoch=3, pass_id=0, multiple_of=1)
    assert len(a) == 782 and len(a[-1]) == 16  # the reference's drop_last=False
    assert all((x == y).all() for x, y in zip(a, b))
    assert sorted(np.concatenate(a).tolist()) == list(range(50000))
    c = mesh_lib.epoch_batches(50000, 64, seed=1, epoch=4, pass_id=0, multiple_of=1)
    assert not (a[0] == c[0]).all()
    d = mesh_lib.epoch_batches(50, 16, seed=0, epoch=0, pass_id=0, multiple_of=4)
    assert [len(x) for x in d] == [16, 16, 16]  # remainder 2 trimmed to a multiple of the 4 devices
    e = mesh_lib.epoch_batches(50, 16, seed=0, epoch=0, pass_id=0, multiple_of=1, drop_remainder=True)
    assert [len(x) for x in e] == [16, 16, 16]


def test_crop_flip_is_a_padded_crop():
    rng = np.random.default_rng(0)
    imgs = rng.integers(1, 256, size=(64, 8, 8, 3), dtype=np.uint8)  # no zeros: padding is recognisable
    out = np.asarray(augment.random_crop_flip(jnp.asarray(imgs), jax.random.key(0), pad=2, flip=True))
    padded = np.pad(imgs, ((0, 0), (2, 2), (2, 2), (0, 0)))
    seen_offsets, flips = set(), 0
    for i in range(64):
        match = [(oy, ox, f) for oy in range(5) for ox in range(5) for f in (False, True)
                 if np.array_equal(out[i], (lambda c: c[:, ::-1] if f else c)(padded[i, oy:oy + 8, ox:ox + 8]))]
        assert match, f"image {i} is not a crop of its padded original"
        seen_offsets.add(match[0][:2])
        flips += match[0][2]
    assert len(seen_offsets) > 10 and 16 < flips < 48
    again = np.asarray(augment.random_crop_flip(jnp.asarray(imgs), jax.random.key(0), pad=2, flip=True))
    np.testing.assert_array_equal(out, again)
    other = np.asarray(augment.random_crop_flip(jnp.asarray(imgs), jax.random.key(1), pad=2, flip=True))
    assert not np.array_equal(out, other)


def test_normalize():
    img = np.arange(2 * 2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 2, 3) * 10
    mean, std = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
    got = augment.normalize(jnp.asarray(img), mean, std)
    np.testing.assert_allclose(got, (img / 255.0 - np.asarray(mean)) / np.asarray(std), rtol=1e-5, atol=1e-6)
