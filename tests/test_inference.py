import itertools

import pytest
import torch

from config import Config
from evaluation.inference import gaussian_weights, predict_case, sliding_window, window_starts
from model import UNet


def doubling(batch):
    return batch * 2


class CountingPredictor:
    """Doubles its input and records the batch sizes it was called with."""

    def __init__(self, window):
        self.window, self.sizes = tuple(window), []

    def __call__(self, batch):
        assert tuple(batch.shape[2:]) == self.window
        self.sizes.append(batch.shape[0])
        return batch * 2


@pytest.mark.parametrize("spatial, window", [
    ((33, 34, 35), (16, 16, 16)), ((17, 9, 20), (16, 16, 16)), ((7, 5, 3), (8, 8, 8)),
    ((31, 45), (16, 12)), ((40, 24, 33), (24, 24, 32))])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.8])
def test_doubling_predictor_is_reproduced_at_odd_sizes(spatial, window, overlap):
    image = torch.randn(2, *spatial)
    predictor = CountingPredictor(window)
    out = sliding_window(predictor, image, window, overlap=overlap, batch_size=3)
    assert out.shape == image.shape
    torch.testing.assert_close(out, image * 2, rtol=1e-5, atol=1e-5)
    assert max(predictor.sizes) <= 3  # never more than one batch of windows at a time


@pytest.mark.parametrize("overlap", [0.0, 0.5, 0.75])
def test_uniform_weights_reproduce_integers_exactly(overlap):
    image = torch.randint(-50, 50, (1, 21, 19, 30)).float()
    out = sliding_window(lambda b: b + 0, image, (8, 8, 8), overlap=overlap, batch_size=4, gaussian=False)
    assert torch.equal(out, image)


def test_mirror_tta_averages_flipped_predictions_back_in_place():
    image = torch.randn(3, 18, 20, 22)
    out = sliding_window(doubling, image, (16, 16, 16), overlap=0.5, mirror=True)
    torch.testing.assert_close(out, image * 2, rtol=1e-5, atol=1e-5)
    # a predictor that is not flip-equivariant (adds a ramp) is averaged over its flips
    ramp = torch.arange(16.0).view(1, 1, 16, 1, 1)
    out = sliding_window(lambda b: b * 0 + ramp, image[:1], (16, 16, 16), overlap=0, mirror=True)
    torch.testing.assert_close(out, torch.full_like(out, 7.5))


def test_output_channels_may_differ_from_input_channels():
    image = torch.randn(4, 12, 13, 14)
    out = sliding_window(lambda b: b[:, :3] * 2, image, (8, 8, 8), overlap=0.5)
    torch.testing.assert_close(out, image[:3] * 2, rtol=1e-5, atol=1e-5)


def test_gaussian_weights_peak_in_the_centre_and_stay_positive():
    w = gaussian_weights((16, 15, 8))
    assert w.shape == (16, 15, 8)
    assert w.max() == pytest.approx(1.0, abs=0.02) and w.min() >= 1e-3
    assert torch.equal(w, w.flip(0)) and torch.equal(w, w.flip(1)) and torch.equal(w, w.flip(2))
    assert w[8, 7, 4] > w[3, 7, 4] > w[1, 7, 4] >= w[0, 0, 0]


@pytest.mark.parametrize("size, window, overlap", [(33, 16, 0.5), (16, 16, 0.5), (100, 32, 0.25), (17, 8, 0)])
def test_windows_cover_the_axis_and_end_at_the_border(size, window, overlap):
    starts = window_starts(size, window, overlap)
    assert starts[0] == 0 and starts[-1] == size - window
    assert all(0 < b - a <= max(1, int(window * (1 - overlap))) for a, b in zip(starts, starts[1:]))


def test_gaussian_weights_sum_correctly_at_borders():
    """The normaliser at each voxel is the sum of the weights of the windows covering it; a voxel
    covered once (a corner) gets exactly its window's weight, so a constant comes back unchanged."""
    spatial, window = (20, 27, 9), (8, 8, 8)
    weights = gaussian_weights(window)
    expected = torch.zeros(spatial)
    starts = itertools.product(*(window_starts(s, w, 0.5) for s, w in zip(spatial, window)))
    for start in starts:
        expected[tuple(slice(o, o + w) for o, w in zip(start, window))] += weights
    assert expected[0, 0, 0] == weights[0, 0, 0]
    seen = sliding_window(lambda b: torch.ones_like(b[:, :1]), torch.zeros(1, *spatial), window, 0.5)
    torch.testing.assert_close(seen, torch.ones(1, *spatial))
    # a predictor returning the window's own weight map gives sum(w^2)/sum(w): check at a border voxel
    out = sliding_window(lambda b: weights.expand(b.shape[0], 1, *window), torch.zeros(1, *spatial), window, 0.5)
    squares = torch.zeros(spatial)
    for start in itertools.product(*(window_starts(s, w, 0.5) for s, w in zip(spatial, window))):
        squares[tuple(slice(o, o + w) for o, w in zip(start, window))] += weights ** 2
    torch.testing.assert_close(out[0], squares / expected)


def test_predict_case_patch_mode_returns_native_grid_probabilities():
    cfg = Config()
    cfg.data.mode, cfg.data.patch_size = "patch", (16, 16, 16)
    cfg.eval.overlap, cfg.eval.sw_batch_size = 0.5, 2
    model = UNet(4, 3, base_channels=4, depth=2)
    probs = predict_case(model, torch.rand(4, 19, 23, 17), cfg, torch.device("cpu"))
    assert probs.shape == (3, 19, 23, 17)
    assert 0 <= float(probs.min()) and float(probs.max()) <= 1


def test_predict_case_resize_mode_with_mirror():
    cfg = Config()
    cfg.data.image_size, cfg.eval.mirror = (16, 16, 16), True
    probs = predict_case(UNet(4, 3, base_channels=4, depth=2), torch.rand(4, 19, 23, 17), cfg, torch.device("cpu"))
    assert probs.shape == (3, 19, 23, 17)


def test_a_patch_model_at_a_coarser_spacing_predicts_at_the_native_shape():
    from conftest import SHAPE, TumourDetector, bright_case
    case = bright_case()
    cfg = Config()
    cfg.data.mode, cfg.data.patch_size, cfg.data.spacing = "patch", (8, 8, 8), (2.0, 2.0, 2.0)
    probs = predict_case(TumourDetector(), case.image, cfg, torch.device("cpu"), spacing=(1.0, 1.0, 1.0))
    assert probs.shape == (3, *SHAPE)  # resampled to 6x7x5 for the window, brought back to the native grid
    tumour = torch.from_numpy(case.mask > 0)
    assert probs[0][tumour].mean() > 0.5 > probs[0][~tumour].mean()
    with pytest.raises(ValueError, match="spacing must be given"):
        predict_case(TumourDetector(), case.image, cfg, torch.device("cpu"))
    cfg.data.spacing = (0.5, 0.5, 0.5)  # finer than the case: never resampled up, the native grid as it is
    native = predict_case(TumourDetector(), case.image, cfg, torch.device("cpu"), spacing=(1.0, 1.0, 1.0))
    cfg.data.spacing = ()
    torch.testing.assert_close(native, predict_case(TumourDetector(), case.image, cfg, torch.device("cpu")))


class CountingModel(torch.nn.Module):
    """A per-voxel model (its output at a voxel depends on that voxel only, so window borders do
    not matter) that counts the windows it is given."""

    def __init__(self):
        super().__init__()
        self.scale, self.windows = torch.nn.Parameter(torch.tensor(3.0)), 0

    def forward(self, batch):
        self.windows += batch.shape[0]
        return batch[:, :3] * self.scale - 1


def test_a_scan_is_predicted_on_its_brain_box_and_is_background_outside():
    cfg = Config()
    cfg.data.mode, cfg.data.patch_size, cfg.eval.overlap = "patch", (8, 8, 8), 0.5
    brain = torch.rand(4, 10, 12, 9) + 0.5
    scan = torch.zeros(4, 30, 28, 26)
    scan[:, 11:21, 5:17, 9:18] = brain
    scan[2, 11, 5, 9] = 0  # a zero inside the brain (one channel) leaves the box as it is
    cropped, whole = CountingModel(), CountingModel()
    probs = predict_case(cropped, scan, cfg, torch.device("cpu"))
    assert probs.shape == (3, 30, 28, 26)
    inside = (slice(None), slice(11, 21), slice(5, 17), slice(9, 18))
    torch.testing.assert_close(probs[inside], predict_case(CountingModel(), scan[inside], cfg, torch.device("cpu")))
    outside = torch.ones(30, 28, 26, dtype=torch.bool)
    outside[inside[1:]] = False
    assert float(probs[:, outside].abs().max()) == 0.0
    cfg.eval.crop_nonzero = False  # the whole scan: ~8x the windows here, the brain predicted alike
    uncropped = predict_case(whole, scan, cfg, torch.device("cpu"))
    torch.testing.assert_close(uncropped[inside], probs[inside])
    assert uncropped[:, outside].min() > 0  # sigmoid(-1) where the crop says background
    assert whole.windows > 5 * cropped.windows


def test_an_empty_scan_is_predicted_whole():
    cfg = Config()
    cfg.data.mode, cfg.data.patch_size = "patch", (8, 8, 8)
    probs = predict_case(CountingModel(), torch.zeros(4, 9, 10, 11), cfg, torch.device("cpu"))
    torch.testing.assert_close(probs, torch.full((3, 9, 10, 11), float(torch.sigmoid(torch.tensor(-1.0)))))


def test_windows_per_pass_auto_is_one_on_a_cpu_and_explicit_values_win():
    from evaluation.inference import windows_per_pass
    cfg = Config()
    assert windows_per_pass(cfg.eval, "cpu") == 1 and windows_per_pass(cfg.eval, "cuda") == 2
    cfg.eval.sw_batch_size = 4
    assert windows_per_pass(cfg.eval, "cpu") == 4
