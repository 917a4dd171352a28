"""2.5D members: a 2D network whose input channels are each axial slice and its neighbours, the same way in
training (``PatchSampler``) and in the engine (``inference.predict_softmax``)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from VSCochleaSegLib.inference import InferenceSettings, predict_softmax, slice_context
from VSCochleaSegLib.model_folder import NetworkSpec
from VSCochleaSegLib.networks import build_network, load_inference_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root holds training/

from training.augment import _blur, augment_intensity  # noqa: E402
from training.segmentation import PatchSampler, TrainConfig, train_network  # noqa: E402

NET_25D = {"dims": 2, "in_channels": 3, "out_channels": 3, "filters": [4, 8, 8],
           "kernel_size": [[3, 3]] * 3, "strides": [[1, 1], [2, 2], [2, 2]]}


def _slice_numbers(nz=5, ny=8, nx=8) -> np.ndarray:
    """A volume (z, y, x) whose every voxel holds its slice number + 1."""
    return np.broadcast_to(np.arange(1, nz + 1, dtype=np.float32)[:, None, None], (nz, ny, nx)).copy()


def test_slice_context_stacks_neighbours_lowest_first_and_repeats_the_edge_slices():
    x = torch.from_numpy(_slice_numbers())[None, None]
    out = slice_context(x, 5)
    assert out.shape == (1, 5, 5, 8, 8)
    assert out[0, :, :, 0, 0].tolist() == [[1, 1, 1, 2, 3], [1, 1, 2, 3, 4], [1, 2, 3, 4, 5],
                                           [2, 3, 4, 5, 5], [3, 4, 5, 5, 5]]
    assert slice_context(x, 1) is x


class _ChannelsAsLogits(torch.nn.Module):
    """A stand-in 2D network: the logits of classes 0, 1, 2 are its three input channels."""

    in_channels = 3

    def forward(self, x):
        assert x.shape[1] == 3
        return x * 1.0


def test_the_engine_feeds_a_25d_network_each_slice_with_its_neighbours():
    vol = _slice_numbers()
    prob = predict_softmax(_ChannelsAsLogits(), vol, (8, 8), torch.device("cpu"), InferenceSettings(precision="fp32"))
    assert prob.shape == (3, 5, 8, 8)
    at = prob[:, :, 4, 4]  # (class, z)
    inner = slice(1, 4)
    assert (at[2, inner] > at[1, inner]).all() and (at[1, inner] > at[0, inner]).all()  # slices z+1 > z > z−1
    assert np.isclose(at[0, 0], at[1, 0]) and at[2, 0] > at[1, 0]  # below the volume: slice 0 repeated
    assert np.isclose(at[1, 4], at[2, 4]) and at[0, 4] < at[1, 4]  # above it: the last slice repeated


def test_training_patches_of_a_25d_network_hold_the_labelled_slice_in_the_middle():
    img = _slice_numbers(nz=6, ny=16, nx=16)
    lab = np.zeros(img.shape, np.uint8)
    lab[3, 6:9, 6:9] = 1
    lab[0, 2:4, 2:4] = 2
    cfg = TrainConfig(network=NET_25D, patch_size_zyx=[16, 16], batch_size=30, oversample_vs=0.5,
                      oversample_cochlea=0.5)
    x, y = PatchSampler([(img, lab)], cfg, np.random.default_rng(0)).batch()
    assert x.shape == (30, 3, 16, 16) and y.shape == (30, 1, 16, 16)
    for xi, yi in zip(x.numpy(), y[:, 0].numpy()):
        inside = xi[1] > 0  # zero outside the volume
        middle = set(np.unique(xi[1][inside]))
        assert len(middle) == 1
        z = int(middle.pop()) - 1
        assert z in (0, 3) and ((yi == 1).any() if z == 3 else (yi == 2).any())
        assert (xi[0][inside] == max(z, 1)).all() and (xi[2][inside] == z + 2).all()  # z−1 (or z) and z+1


def test_one_channel_2d_patches_keep_their_shape():
    img = _slice_numbers(nz=4, ny=16, nx=16)
    net = {**NET_25D, "in_channels": 1}
    x, _ = PatchSampler([(img, np.zeros(img.shape, np.uint8))],
                        TrainConfig(network=net, patch_size_zyx=[16, 16], batch_size=3), np.random.default_rng(0)).batch()
    assert x.shape == (3, 1, 16, 16)


def test_blur_and_intensity_augmentation_treat_each_slice_channel_alone():
    x = torch.zeros(1, 3, 9, 9)
    x[0, 1, 4, 4] = 1.0
    blurred = _blur(x, 1.0)
    assert blurred.shape == x.shape
    assert blurred[0, 0].abs().max() == 0 and blurred[0, 2].abs().max() == 0  # nothing leaks across slices
    assert 0 < blurred[0, 1, 4, 4] < 1 and blurred[0, 1].sum() > 0.9
    single = torch.zeros(1, 1, 9, 9)
    single[0, 0, 4, 4] = 1.0
    assert torch.allclose(_blur(single, 1.0)[0, 0], blurred[0, 1])
    out = augment_intensity(torch.rand(4, 3, 16, 16), torch.Generator().manual_seed(0), p=1.0)
    assert out.shape == (4, 3, 16, 16)


def test_a_25d_member_trains_and_runs_in_the_engine(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.random((6, 16, 16)).astype(np.float32)
    lab = np.zeros(img.shape, np.uint8)
    lab[2:4, 5:9, 5:9] = 1
    state = train_network([(img, lab)], TrainConfig(network=NET_25D, patch_size_zyx=[16, 16], iterations=2,
                                                     batch_size=2, optimizer="adamw"), tmp_path, "m", progress=False)
    net = build_network(NetworkSpec.from_dict(NET_25D))
    load_inference_state_dict(net, state)
    prob = predict_softmax(net.eval(), img, (16, 16), torch.device("cpu"))
    assert prob.shape == (3, 6, 16, 16) and np.allclose(prob.sum(0), 1.0, atol=1e-4)
