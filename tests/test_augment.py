"""EDM geometric augmentation: identity at p=0, EDM's 9 labels, flips consistent with labels, replayable RNG,
resampling conventions (identity ≈ exact, rotation by π/2 = rot90)."""

import math

import pytest
import torch

from diffit_cli.augment import AugmentPipe, _resample, _rotate
from diffit_cli.data import SyntheticShapes, normalize_pixels

ONLY_FLIPS = dict(scale=0, rotate_frac=0, aniso=0, translate_frac=0)


@pytest.fixture(scope="module")
def images():
    src = SyntheticShapes(32, size=16)
    return normalize_pixels(torch.stack([src[i][0] for i in range(16)]))


def test_p0_is_the_identity_with_zero_labels(images):
    out, labels = AugmentPipe(0.0)(images)
    assert torch.equal(out, images)
    assert labels.shape == (16, 9) and labels.dtype == torch.float32 and not labels.any()


def test_p1_changes_images_and_labels(images):
    torch.manual_seed(0)
    pipe = AugmentPipe(1.0)
    assert pipe.label_dim == 9
    out, labels = pipe(images)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert labels.shape == (16, 9) and (labels != 0).any(dim=1).all()
    assert labels[:, 2:].abs().sum(dim=1).gt(0).all()  # every geometric transform fires at p = 1
    changed = (out - images).flatten(1).abs().amax(dim=1) > 1e-3
    assert changed.all()
    assert out.abs().max() < 1.5  # resampling stays in range (small filter overshoot only)


def test_xflip_and_yflip_labels_match_the_images(images):
    torch.manual_seed(1)
    out, labels = AugmentPipe(1.0, **ONLY_FLIPS)(images)
    assert labels.shape == (16, 2)
    assert set(labels[:, 0].tolist()) == {0.0, 1.0}  # x-flip: always drawn, taken with probability 1/2
    for x, y, (fx, fy) in zip(images, out, labels.tolist()):
        expect = x.flip(2) if fx else x
        assert torch.equal(y, expect.flip(1) if fy else expect)


def test_low_p_still_labels_every_xflip(images):
    torch.manual_seed(2)
    out, labels = AugmentPipe(0.12, yflip=0, **ONLY_FLIPS)(images)
    flipped = labels[:, 0] == 1
    assert flipped.any() and torch.equal(out[flipped], images[flipped].flip(3))
    assert torch.equal(out[~flipped], images[~flipped])


def test_untouched_samples_are_exact(images):
    torch.manual_seed(3)
    out, labels = AugmentPipe(0.3, xflip=0, yflip=0)(images)
    untouched = ~(labels != 0).any(dim=1)
    assert untouched.any()
    assert torch.equal(out[untouched], images[untouched])


def test_rng_replays_from_state_or_generator(images):
    pipe = AugmentPipe(0.5)
    torch.manual_seed(4)
    a = pipe(images)
    torch.manual_seed(4)
    b = pipe(images)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = pipe(images, generator=torch.Generator().manual_seed(9))
    d = pipe(images, generator=torch.Generator().manual_seed(9))
    assert torch.equal(c[0], d[0]) and torch.equal(c[1], d[1])


def test_integer_translation_is_a_mirrored_shift(images):
    torch.manual_seed(5)
    pipe = AugmentPipe(1.0, xflip=0, yflip=0, translate_int=1, **ONLY_FLIPS)
    out, labels = pipe(images)
    assert labels.shape == (16, 2)
    tx = (labels[:, 0] * 32 * 0.125).round().long()
    ty = (labels[:, 1] * 32 * 0.125).round().long()
    for x, y, dx, dy in zip(images, out, tx.tolist(), ty.tolist()):
        # out[y, x] = in[y + dy, x - dx] away from the borders
        ys, xs = slice(max(0, -dy), 32 - max(0, dy)), slice(max(0, dx), 32 - max(0, -dx))
        src_ys, src_xs = slice(ys.start + dy, ys.stop + dy), slice(xs.start - dx, xs.stop - dx)
        assert torch.equal(y[:, ys, xs], x[:, src_ys, src_xs])


def test_resampling_conventions():
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 24), torch.linspace(-1, 1, 24), indexing="ij")
    smooth = torch.stack([torch.sin(2 * xx + yy), torch.cos(3 * yy), xx * yy])[None].repeat(2, 1, 1, 1)
    eye = torch.eye(3).expand(2, 3, 3)
    assert (_resample(smooth, eye) - smooth).abs().max() < 1e-4
    rot = _resample(smooth, _rotate(torch.full((2,), math.pi / 2)))
    assert (rot - torch.rot90(smooth, 1, (2, 3))).abs().mean() < 0.02


def test_half_precision_batches_keep_their_dtype(images):
    out, labels = AugmentPipe(1.0)(images.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and labels.dtype == torch.float32
    with pytest.raises(ValueError):
        AugmentPipe(1.5)
