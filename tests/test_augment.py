"""Batch augmentations are per image: crops, flips and Cutout squares vary across a batch; validation is untouched."""
import torch
import torch.nn.functional as F
import pytest

from fastai.torch_core import TensorCategory, TensorImage

from augment import batch_crop, batch_cutout, batch_flip_lr, Cutout, PadCropFlip


def coords(n=64, c=3, h=32, w=32):
    "A batch whose pixel values name their own position, so an output reveals where it was read from."
    pos = torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w) + 1  # +1: no pixel is 0
    return pos.expand(n, c, h, w).clone()


def crop_offsets(out, x, pad):
    "For each output image, the (dy, dx) of the reflect-padded input it equals, or None."
    padded = F.pad(x, (pad,) * 4, mode='reflect')
    h, w = x.shape[-2:]
    found = []
    for i in range(len(x)):
        hits = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                if torch.equal(out[i], padded[i, :, dy:dy + h, dx:dx + w])]
        found.append(hits[0] if hits else None)
    return found


def test_crop_is_a_reflect_pad_and_crop_that_varies_per_image():
    torch.manual_seed(0)
    x = coords()
    out = batch_crop(x, pad=4)
    offs = crop_offsets(out, x, 4)
    assert None not in offs  # every image is an exact crop of its padded copy
    assert len(set(offs)) > 20  # and the crops differ across the batch (81 possible)


def test_crop_works_on_uint8_and_keeps_shape_and_dtype():
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    out = batch_crop(x, 4, flip_p=0.5)
    assert out.shape == x.shape and out.dtype == torch.uint8


def test_flip_is_per_image():
    torch.manual_seed(0)
    x = coords(200)
    out = batch_flip_lr(x, p=0.5)
    flipped = torch.tensor([torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)])
    same = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert (flipped ^ same).all()  # each image is either mirrored or untouched
    assert 60 < flipped.sum() < 140  # about half of them, independently


def test_crop_then_flip_in_one_gather_matches_a_flip_of_some_crop():
    torch.manual_seed(1)
    x = coords(32)
    out = batch_crop(x, 4, flip_p=0.5)
    plain, mirrored = crop_offsets(out, x, 4), crop_offsets(out.flip(-1), x, 4)
    assert all(p is not None or m is not None for p, m in zip(plain, mirrored))
    assert sum(m is not None and p is None for p, m in zip(plain, mirrored)) > 5


def test_cutout_zeroes_one_8x8_square_per_image_at_varying_places():
    torch.manual_seed(0)
    x = coords(100)
    out = batch_cutout(x, 8)
    places = set()
    for o in out:
        zero = (o == 0)
        assert zero.all(0).eq(zero.any(0)).all()  # the same square in every channel
        ys, xs = torch.nonzero(zero[0], as_tuple=True)
        assert len(ys) == 64 and ys.max() - ys.min() == 7 and xs.max() - xs.min() == 7
        places.add((int(ys.min()), int(xs.min())))
    assert len(places) > 50
    assert torch.equal(out[x != out], torch.zeros_like(out[x != out]))  # nothing else changed


@pytest.mark.parametrize('fn', [lambda x: batch_crop(x, 4, 0.5), lambda x: batch_cutout(x, 8)])
def test_pure_functions_leave_their_input_alone(fn):
    x = coords(4)
    before = x.clone()
    fn(x)
    assert torch.equal(x, before)


def test_fastai_wrappers_are_training_only_and_leave_labels_alone():
    x, y = TensorImage(coords(4)), TensorCategory(torch.arange(4))
    for tfm in (PadCropFlip(4), Cutout(8)):
        assert tfm.split_idx == 0
        assert torch.equal(tfm(x, split_idx=1), x)  # validation: untouched
        xa, ya = tfm((x, y), split_idx=0)
        assert not torch.equal(xa, x) and torch.equal(ya, y)


def test_the_defaults_are_the_recipes_and_reach_every_place():
    # pad 4 (offsets -4..4 both ways, none further), no flip unless asked, p = 0.5, an 8×8 square anywhere inside
    torch.manual_seed(0)
    x = coords(400)
    offs = crop_offsets(batch_crop(x), x, 4)
    assert None not in offs and {dy for dy, _ in offs} == {dx for _, dx in offs} == set(range(9))
    flipped = sum(torch.equal(o, xi.flip(-1)) for o, xi in zip(batch_flip_lr(x), x))
    assert 150 < flipped < 250
    tops, lefts = set(), set()
    for o in batch_cutout(coords(1000)):
        ys, xs = torch.nonzero(o[0] == 0, as_tuple=True)
        assert len(ys) == 64
        tops.add(int(ys.min())), lefts.add(int(xs.min()))
    assert tops == lefts == set(range(25))  # 32 - 8 + 1 places each way, the edges included


def test_the_wrappers_defaults_are_the_recipes():
    torch.manual_seed(0)
    x = TensorImage(coords(400))
    out = PadCropFlip()(x, split_idx=0)
    plain, mirrored = crop_offsets(out, x, 4), crop_offsets(out.flip(-1), x, 4)
    assert all(p is not None or m is not None for p, m in zip(plain, mirrored))  # within 4 pixels
    assert 150 < sum(p is None for p in plain) < 250  # about half mirrored
    for size, tfm in ((8, Cutout()), (4, Cutout(4))):
        for o in tfm(x, split_idx=0):
            assert (o[0] == 0).sum() == size * size


@pytest.mark.parametrize('fn', [lambda x: batch_crop(x, 4, 0.5), lambda x: batch_cutout(x, 8)])
def test_every_tensor_is_made_on_the_batchs_device(fn):
    # On the 'meta' device a tensor made on the CPU by mistake cannot be mixed in: the same error CUDA gives.
    out = fn(torch.empty(4, 3, 32, 32, device='meta'))
    assert out.device.type == 'meta' and out.shape == (4, 3, 32, 32)
