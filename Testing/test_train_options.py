"""Training options: the two losses, overlapping/max slab aggregation and where slabs land in the map,
background masking, the paper preset, the per-epoch log and checkpoints from before these options."""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import grid_affine, phantom, run_cli

from SimpleSliceNetLib.cli import build_parser
from SimpleSliceNetLib.encoder import EncoderConfig
from SimpleSliceNetLib.errors import UserError
from SimpleSliceNetLib.flow import FlowConfig
from SimpleSliceNetLib.model_file import read_model_file
from SimpleSliceNetLib.preprocess import PreprocessConfig, placement_jitter, preprocess
from SimpleSliceNetLib.progress import Progress
from SimpleSliceNetLib.resources import bundled_models_dir
from SimpleSliceNetLib.slicenet import SliceNetConfig, SliceNetModel
from SimpleSliceNetLib.volume_io import Volume, save_volume
from SimpleSliceNetTraining import train
from SimpleSliceNetTraining.distributed import Context
from SimpleSliceNetTraining.grid_options import SLICENET_GRID, grid_config
from SimpleSliceNetTraining.train import (
    History,
    TrainConfig,
    TrainingLog,
    VolumeItem,
    flow_loss,
    semi_push_pull_loss,
    triplet_loss,
)

# --- losses --------------------------------------------------------------------------------------


def _logps(seed: int, n: int = 400, fake_shift: float = -0.5):
    g = torch.Generator().manual_seed(seed)
    real = (0.3 * torch.randn(n, generator=g) - 1.0).requires_grad_()
    fake = (real.detach() + fake_shift + 0.3 * torch.randn(n, generator=g)).requires_grad_()
    return real, fake


def test_spp_gradients_pull_reals_up_and_push_fakes_above_the_boundary_down():
    config = TrainConfig()
    real, fake = _logps(0)
    loss, parts = semi_push_pull_loss(real, fake, config, with_spp=True)
    loss.backward()
    assert set(parts) == {"ml", "pull", "push"} and parts["pull"] > 0 and parts["push"] > 0
    assert (real.grad < 0).all()  # every real log-likelihood is pushed up (the ML term)
    b_a = torch.quantile(real.detach() / config.spp_normalizer, config.spp_beta) - config.spp_tau
    above = fake.detach() / config.spp_normalizer > b_a
    assert above.any() and (~above).any()
    assert (fake.grad[above] > 0).all() and (fake.grad[~above] == 0).all()


def test_spp_epoch_zero_is_maximum_likelihood_only():
    real, fake = _logps(1)
    loss, parts = flow_loss(real, fake, TrainConfig(), epoch=0)
    loss.backward()
    assert set(parts) == {"ml"} and fake.grad is None


def test_spp_empty_sets_add_nothing():
    config = TrainConfig()
    real = torch.full((64,), -1.0, requires_grad=True)  # no real value below its own quantile
    fake = torch.full((64,), -50.0, requires_grad=True)  # every fake far below the abnormal boundary
    loss, parts = semi_push_pull_loss(real, fake, config, with_spp=True)
    loss.backward()
    assert torch.isfinite(loss) and parts["pull"] == 0.0 and parts["push"] == 0.0
    assert torch.isfinite(real.grad).all() and fake.grad is None  # no term reaches the fakes


def test_triplet_loss_is_the_public_codes_triplet_margin_loss_on_log_likelihood_vectors():
    config = TrainConfig(loss="triplet", triplet_margin=1.0)
    real, fake = _logps(2, fake_shift=-0.01)
    torch.manual_seed(5)
    loss, parts = triplet_loss(real, fake, config)
    torch.manual_seed(5)
    positive = real.detach()[torch.randperm(real.numel())]
    a, n = real.detach(), fake.detach()
    # torch's pairwise distance adds eps=1e-6 to the difference; the 1-D inputs are ONE vector each.
    d_ap, d_an = torch.linalg.norm(a - positive + 1e-6), torch.linalg.norm(a - n + 1e-6)
    expected_triplet = torch.clamp(d_ap - d_an + config.triplet_margin, min=0)
    expected_ml = -F.logsigmoid(a).mean()
    assert parts["triplet"] == pytest.approx(float(expected_triplet), rel=1e-5)
    assert parts["ml"] == pytest.approx(float(expected_ml), rel=1e-5)
    assert loss.item() == pytest.approx(float(expected_triplet + expected_ml), rel=1e-5)
    loss.backward()
    # With fakes below their reals and the hinge active, descent pushes every fake further down.
    assert expected_triplet > 0 and ((fake.grad > 0) == (a > n)).all()


def test_triplet_is_used_from_the_first_epoch_and_empty_sets_stay_finite():
    real, fake = _logps(3)
    _loss, parts = flow_loss(real, fake, TrainConfig(loss="triplet"), epoch=0)
    assert set(parts) == {"ml", "triplet"}
    empty = torch.zeros(0, requires_grad=True)
    loss, parts = triplet_loss(empty, torch.zeros(0), TrainConfig(loss="triplet"))
    loss.backward()
    assert loss.item() == 0.0 and parts == {"ml": 0.0}


# --- slab aggregation and geometry ---------------------------------------------------------------


def _config(shape=(64, 48, 24), group=3, stride=None, aggregation="mean", map_factor=2, score=None) -> SliceNetConfig:
    return SliceNetConfig(preprocess=PreprocessConfig(shape=shape, spacing=(3.0, 3.0, 6.0)), flow=FlowConfig(blocks=1),
                          group=group, slab_stride=stride, aggregation=aggregation, map_factor=map_factor,
                          score_stride=score)


def test_overlapping_slabs_and_max_aggregation_of_slice_features():
    torch.manual_seed(0)
    net = SliceNetModel(_config(group=4, stride=2, aggregation="max"), encoder_weights="none").eval()
    assert net.config.slabs(24) == 11
    image = np.random.default_rng(0).uniform(0, 1, (64, 48, 24)).astype(np.float32)
    features = net.features(image)
    assert features.shape == (8, 6, 11, net.dim) and net.position.shape == (8, 6, 11, 128)
    with torch.inference_mode():
        per_slice = net.encoder(torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[:, None])
    # Slab 3 is slices 6..9, combined by their per-channel maximum.
    torch.testing.assert_close(features[:, :, 3], per_slice[6:10].amax(0).permute(1, 2, 0), rtol=1e-4, atol=1e-4)
    assert net.score_map(net.nll_grid(features)).shape == (32, 24, 12)


@pytest.mark.parametrize("group, stride", [(3, 4), (3, 0), (4, 3), (30, 30)])
def test_slab_layouts_that_do_not_cover_the_slices_are_refused(group, stride):
    with pytest.raises(ValueError, match="groups"):
        SliceNetModel(_config(group=group, stride=stride), encoder_weights="none")


@pytest.mark.parametrize("stride, score", [(3, 2), (3, 4), (3, 0)])
def test_score_strides_that_do_not_divide_the_slab_stride_are_refused(stride, score):
    with pytest.raises(ValueError, match="does not divide"):
        SliceNetModel(_config(stride=stride, score=score), encoder_weights="none")


@pytest.mark.parametrize("group, stride, score", [(3, 3, 1), (4, 2, 1), (6, 6, 2)])
def test_scored_slabs_between_the_trained_ones_keep_the_trained_slabs_and_their_codes(group, stride, score):
    """A model scoring every ``score`` slices holds the tiling model's slabs and position codes, to the bit,
    at every ``fit_step``-th slab, and slabs and codes in between (a position code halfway between two
    trained slabs' is another code, not a copy of either)."""
    torch.manual_seed(0)
    trained = SliceNetModel(_config(group=group, stride=stride), encoder_weights="none").eval()
    scored = SliceNetModel(_config(group=group, stride=stride, score=score), encoder_weights="none").eval()
    scored.load_state_dict(trained.state_dict())
    step = stride // score
    assert scored.config.fit_step == step and scored.config.slabs(24) == (24 - group) // score + 1
    assert torch.equal(scored.position[:, :, ::step], trained.position)
    assert not torch.equal(scored.position[:, :, 1], trained.position[:, :, 0])
    image = np.random.default_rng(0).uniform(0, 1, (64, 48, 24)).astype(np.float32)
    features = scored.features(image)
    assert features.shape[2] == scored.config.slabs(24)
    assert torch.equal(features[:, :, ::step], trained.features(image))
    brain = np.zeros((64, 48, 24), dtype=bool)
    brain[20:40, 10:30, 5:15] = True
    assert torch.equal(scored.slab_brain(brain)[:, :, ::step], trained.slab_brain(brain))
    nll = scored.nll_grid(features)
    torch.testing.assert_close(nll[:, :, ::step], trained.nll_grid(features[:, :, ::step]), rtol=1e-5, atol=1e-5)
    assert scored.score_map(nll).shape == trained.score_map(nll[:, :, ::step]).shape == (32, 24, 12)


def test_overlapping_map_path_agrees_with_trilinear_resizing_for_tiling_slabs():
    net = SliceNetModel(_config(group=3), encoder_weights="none")
    nll = torch.rand(8, 6, 8)
    expected = F.interpolate(nll[None, None], size=[32, 24, 12], mode="trilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(net._overlapping_slabs_to_map(nll, [32, 24, 12]), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("group, stride, factor", [(3, 3, 2), (3, 1, 1), (6, 2, 1), (4, 2, 2), (3, 1, 2)])
@pytest.mark.parametrize("lesion_slice", [7, 10, 13])
def test_a_lesion_in_one_slice_peaks_in_the_map_at_that_slice(group, stride, factor, lesion_slice):
    """Per-slice anomaly -> slab values (the model's aggregation) -> map: its centre of mass along the
    slices is the lesion's slice, within half a slab step (exactly where slabs overlap symmetrically)."""
    config = _config(group=group, stride=stride, map_factor=factor)
    config.scoring.smoothing_mm = 0.0
    net = SliceNetModel(config, encoder_weights="none")
    per_slice = torch.zeros(24, 8, 6)
    per_slice[lesion_slice] = 1.0
    slabs = net.aggregate(per_slice).permute(1, 2, 0)  # (h, w, slabs)
    profile = net.score_map(slabs)[16, 12].astype(np.float64)  # along the map's slices
    centres = factor * np.arange(profile.size) + (factor - 1) / 2.0  # in model slices
    centre_of_mass = float((profile * centres).sum() / profile.sum())
    assert abs(centre_of_mass - lesion_slice) <= stride / 2.0 + (factor - 1) / 2.0 + 1e-6
    if stride == 1 and factor == 1:
        assert centre_of_mass == pytest.approx(lesion_slice, abs=1e-4)
        assert profile[lesion_slice] == pytest.approx(profile.max())


def test_slab_brain_marks_vectors_whose_cells_hold_brain():
    net = SliceNetModel(_config(group=3, stride=1), encoder_weights="none")
    brain = np.zeros((64, 48, 24), dtype=bool)
    brain[17:30, 8:9, 10:11] = True  # feature cells of 8 pixels: rows 2..3, column 1; slice 10
    marked = net.slab_brain(brain)
    assert marked.shape == (8, 6, 22)
    expected = torch.zeros(8, 6, 22, dtype=torch.bool)
    expected[2:4, 1, 8:11] = True  # slabs starting at slices 8, 9, 10 contain slice 10
    assert torch.equal(marked, expected)


def test_old_model_files_load_with_the_tiling_mean_slabs():
    # A file from before overlapping slabs, max aggregation and grid alignment: none of those keys.
    old = read_model_file(bundled_models_dir() / "simpleslicenet-t1-synth.json").config
    old = {k: v for k, v in old.items() if k not in ("slab_stride", "score_stride", "aggregation")}
    old["preprocess"] = {k: v for k, v in old["preprocess"].items() if k != "align"}
    config = SliceNetConfig.from_dict(old)
    assert (config.slab_stride, config.stride, config.aggregation) == (None, 3, "mean")
    assert (config.score_stride, config.scored_stride, config.fit_step) == (None, 3, 1)  # scored where trained
    assert config.preprocess.align == "none"
    old.pop("position_norm", None)
    assert not SliceNetConfig.from_dict(old).position_norm  # and its weights hold no position statistics
    new = _config(group=4, stride=2, aggregation="max", score=1)
    assert SliceNetConfig.from_dict(json.loads(json.dumps(asdict(new)))) == new


# --- background masking, feature statistics and equal steps per rank -----------------------------


def test_validation_items_keep_masks_at_one_bit_a_voxel_and_drop_the_model_grid_image():
    shape = (61, 73, 29)  # no multiple of 8
    affine = grid_affine(shape, (2.5, 2.5, 5.0))
    pre = preprocess(Volume(phantom(shape, affine), affine), PreprocessConfig(shape=(64, 64, 32), spacing=(3, 3, 5)))
    lesion = np.zeros(shape, dtype=bool)
    lesion[30:34, 40:42, 14] = True
    item = VolumeItem.of("case", torch.zeros(1), "lesion", lesion, pre, slim=True)
    np.testing.assert_array_equal(item.lesion, lesion)
    np.testing.assert_array_equal(item.input_brain, pre.input_brain)
    assert item.has_lesion and item.lesion_bits.packed.nbytes == -(-lesion.size // 8)
    assert item.pre.image is None and item.pre.brain is None and item.pre.mapping is pre.mapping
    assert pre.image is not None  # the caller's object is left whole
    healthy = VolumeItem.of("healthy", torch.zeros(1), "healthy", np.zeros(shape, dtype=bool), pre)
    assert not healthy.has_lesion and healthy.pre is pre  # not slim: U2AD items keep the image
    assert not VolumeItem("bare", None).has_lesion and VolumeItem("bare", None).lesion is None


def _items(seed: int = 0) -> list[VolumeItem]:
    g = torch.Generator().manual_seed(seed)
    items = [VolumeItem(f"v{i}", torch.randn(4, 3, 5, 6, generator=g) * (i + 1) + i) for i in range(3)]
    items[1].keep = torch.tensor([0, 5, 7, 30, 59])
    return items


class _FakeNet:
    dim = 6

    def __init__(self) -> None:
        self.feature_mean, self.feature_std = torch.zeros(6), torch.ones(6)


def test_feature_statistics_use_the_kept_vectors_of_every_volume():
    items, net = _items(), _FakeNet()
    train._feature_statistics(net, items, Context())
    vectors = torch.cat([it.features.reshape(-1, 6) if it.keep is None else it.features.reshape(-1, 6)[it.keep]
                         for it in items])
    torch.testing.assert_close(net.feature_mean, vectors.mean(0))
    torch.testing.assert_close(net.feature_std, vectors.std(0))


def test_position_statistics_shrink_each_positions_healthy_nll_towards_the_whole_brains():
    torch.manual_seed(0)
    net = SliceNetModel(_config(), encoder_weights="none").eval()  # slab grid (8, 6, 8)
    g = torch.Generator().manual_seed(1)
    items = []
    for i in range(9):
        cells = torch.zeros(8, 6, 8, dtype=torch.bool)
        cells[1:7, 1:5, 1:7] = True  # every volume's brain
        cells[0, :, :] = i < 3  # an edge only 3 volumes reach (below the prior's weight of 5)
        items.append(VolumeItem(f"v{i}", torch.randn(8, 6, 8, net.dim, generator=g) * (1 + 0.1 * i), cells=cells))
    assert not net.config.position_norm
    train._position_statistics(net, items, Context())
    assert net.config.position_norm and set(net.state_dict()) >= {"nll_mean", "nll_std"}

    # The same statistics written out with numpy.
    nll = np.stack([net.nll_grid(it.features).numpy() for it in items]).astype(np.float64)
    cells = np.stack([it.cells.numpy() for it in items])
    n = cells.sum(0)
    mean = np.where(n > 0, (nll * cells).sum(0) / np.maximum(n, 1), 0.0)
    var = np.where(n > 1, ((nll - mean) ** 2 * cells).sum(0) / np.maximum(n - 1, 1), 0.0)
    pooled_mean, pooled_var = nll[cells].mean(), np.median(var[n >= 5])
    k = train.POSITION_PRIOR_VOLUMES
    np.testing.assert_allclose(net.nll_mean.numpy(), (n * mean + k * pooled_mean) / (n + k), rtol=1e-5)
    np.testing.assert_allclose(net.nll_std.numpy(), np.sqrt((n * var + k * pooled_var) / (n + k)), rtol=1e-4)
    # Outside every brain the whole brain's statistics stand in; the edge leans on them more than the centre.
    assert net.nll_mean[7, 5, 7].item() == pytest.approx(pooled_mean, rel=1e-5)
    assert net.nll_std[7, 5, 7].item() == pytest.approx(np.sqrt(pooled_var), rel=1e-4)
    # The heatmap is the map of the standardised NLL.
    plain = SliceNetModel(_config(), encoder_weights="none").eval()
    np.testing.assert_allclose(net.score_map(torch.from_numpy(nll[0]).float()),
                               plain.score_map((torch.from_numpy(nll[0]).float() - net.nll_mean) / net.nll_std),
                               rtol=1e-5, atol=1e-5)
    # The model file's configuration says so, and brings the statistics back.
    again = SliceNetModel(SliceNetConfig.from_dict(json.loads(json.dumps(asdict(net.config)))), encoder_weights="none")
    again.load_state_dict(net.state_dict())
    torch.testing.assert_close(again.nll_std, net.nll_std)


class _WiderJob(Context):
    """A rank whose busiest peer has ``steps`` sub-batches (what the max all-reduce would return)."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        object.__setattr__(self, "steps", steps)

    def all_reduce(self, tensor, op="sum"):
        if op == "max":
            tensor.fill_(self.steps)
        return tensor


def test_sub_batches_cover_each_kept_vector_once_and_pad_to_the_busiest_rank():
    items = _items()
    groups = train._sub_batches(items, 16, np.random.default_rng(0), Context())
    assert len(groups) == 3
    for item in items:
        picks = torch.cat([pick for group in groups for it, pick in group if it is item])
        count = len(item.keep) if item.keep is not None else 60
        assert sorted(picks.tolist()) == list(range(count))
    own = sum(len(g) for g in groups)
    padded = train._sub_batches(items, 16, np.random.default_rng(0), _WiderJob(own + 12))
    assert sum(len(g) for g in padded) == own + 12 and len(padded) == 4
    first = [(it.id, pick.tolist()) for group in padded[:3] for it, pick in group]
    assert [(it.id, pick.tolist()) for it, pick in padded[3]] == (first * 2)[:12]  # repeats its own, in order


# --- options and the paper preset ----------------------------------------------------------------


def _train_args(*extra: str):
    return build_parser().parse_args(["train", "--train", "x", "--name", "m", *extra])


def test_defaults_are_todays_configuration():
    args = _train_args()
    train.resolve_options(args)
    assert (args.epochs, args.lr, args.noise_sigma, args.noise_space, args.loss, args.background) == \
        (20, 1e-3, 0.3, "standardised", "spp", "keep")
    assert args.lr_schedule == "constant"
    assert (args.backbone, args.taps, args.channels_per_tap, args.encoder_weights, args.neighbourhood) == \
        ("tf_efficientnet_lite0", "2,3", 64, "imagenet", 1)
    assert (args.group, args.slab_stride, args.score_stride, args.aggregation, args.slab_position, args.blocks) == \
        (3, None, 1, "mean", True, 8)
    assert (args.position_norm, args.smoothing_mm, args.guide_radius_mm) == (True, 6.0, 4.0)
    assert args.shape is None and args.spacing is None and args.align is None
    assert grid_config(args, SLICENET_GRID).align == "brain-axes"


def test_encoder_precision_is_fp32_unless_asked_and_sets_the_features_the_flow_trains_on(tmp_path):
    from SimpleSliceNetLib.devices import encoder_autocast
    from SimpleSliceNetLib.scoring import ScoringConfig
    from SimpleSliceNetTraining.datasets import Case

    args = _train_args()
    train.resolve_options(args)
    assert args.encoder_precision == "fp32" == ScoringConfig().encoder_precision
    assert encoder_autocast("fp32") is None and encoder_autocast("bf16") is torch.bfloat16
    for bad in (lambda: encoder_autocast("fp16"), lambda: ScoringConfig(encoder_precision="fp16")):
        with pytest.raises(ValueError, match="encoder precision 'fp16'"):
            bad()
    with pytest.raises(SystemExit):
        _train_args("--encoder-precision", "fp16")
    shape = (70, 60, 30)
    affine = grid_affine(shape, (3.0, 3.0, 6.0))
    save_volume(tmp_path / "v.nii.gz", phantom(shape, affine), affine)
    case = Case("v", tmp_path / "v.nii.gz", None, "healthy", "train")
    torch.manual_seed(0)
    net = SliceNetModel(_config(), encoder_weights="none").eval()

    def features(precision):
        net.config.scoring.encoder_precision = precision
        items = train._extract(net, [case], Progress("train", "none"), "encoding", (0.0, 1.0), keep_maps=False)
        return items[0].features

    fp32, bf16 = features("fp32"), features("bf16")
    assert fp32.dtype == bf16.dtype == torch.float32
    assert not torch.equal(fp32, bf16)  # bf16 rounding reaches the flow's inputs ...
    torch.testing.assert_close(bf16, fp32, rtol=0.1, atol=0.1 * float(fp32.abs().max()))  # ... and no more


def test_healthy_vectors_are_jittered_only_when_asked_and_less_than_the_synthetic_anomalies():
    real = torch.randn(20000, 8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    same, fake = train.training_pair(real, 0.3)
    after = torch.randn(1)
    assert same is real and abs(float((fake - real).std()) - 0.3) < 0.01
    torch.manual_seed(1)
    torch.randn_like(real)
    torch.testing.assert_close(torch.randn(1), after)  # one draw only: runs without jitter repeat to the bit
    jittered, fake = train.training_pair(real, 0.3, 0.1)
    assert abs(float((jittered - real).std()) - 0.1) < 0.005 and abs(float((fake - jittered).std()) - 0.3) < 0.01
    args = _train_args()
    train.resolve_options(args)
    assert args.real_noise_sigma == 0.1 == TrainConfig().real_noise_sigma
    paper = _train_args("--preset", "paper", "--encoder-weights", "none")
    train.resolve_options(paper)
    assert paper.real_noise_sigma == 0.0  # the paper does not jitter
    for bad in ("-0.1", "0.3", "nan"):
        with pytest.raises(UserError, match=f"--real-noise-sigma {bad}: give 0"):
            train.resolve_options(_train_args("--real-noise-sigma", bad))
    # A lower --noise-sigma than the default jitter: the error says the jitter was the default.
    with pytest.raises(UserError, match=r"--real-noise-sigma 0.1 \(the default\): give 0 .* --noise-sigma \(0.05\)"):
        train.resolve_options(_train_args("--noise-sigma", "0.05"))
    low = _train_args("--noise-sigma", "0.05", "--real-noise-sigma", "0")
    train.resolve_options(low)
    assert low.real_noise_sigma == 0.0


def test_neighbourhood_must_be_an_odd_number_of_cells(tmp_path):
    args = _train_args("--neighbourhood", "1")
    train.resolve_options(args)
    assert args.neighbourhood == 1
    result = run_cli("train", "--train", str(tmp_path), "--name", "m", "--neighbourhood", "2")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: --neighbourhood 2: give an odd number of cells (1, 3, 5, ...)"
    # A model file saying so is refused too (an even window would shift the map by half a cell).
    with pytest.raises(ValueError, match="odd"):
        EncoderConfig(neighbourhood=4)


@pytest.mark.parametrize("option, bad, message, scoring, match", [
    ("smoothing-mm", "-2", "give a sigma of 0 mm (no smoothing) or more", {"smoothing_mm": float("nan")}, "sigma"),
    ("guide-radius-mm", "-1", "give a window half-width of 0 mm (no refinement) or more", {"guide_eps": 0.0}, "eps"),
])
def test_heatmap_scoring_options(tmp_path, option, bad, message, scoring, match):
    args = _train_args(f"--{option}", "0", "--no-position-norm")
    train.resolve_options(args)
    assert (getattr(args, option.replace("-", "_")), args.position_norm) == (0.0, False)
    result = run_cli("train", "--train", str(tmp_path), "--name", "m", f"--{option}", bad)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: --{option} {bad}: {message}"
    with pytest.raises(ValueError, match=match):  # a model file saying so is refused too
        SliceNetConfig.from_dict({**asdict(_config()), "scoring": scoring})


def test_model_files_from_before_the_refinement_load_without_it():
    old = SliceNetConfig.from_dict({**asdict(_config()), "scoring": {"smoothing_mm": 6.0}})
    assert old.scoring.guide_radius_mm == 0


def test_several_training_sources(tmp_path):
    assert _train_args().train == ["x"]
    assert build_parser().parse_args(["train", "--train", "a", "b/cases.json", "--name", "m"]).train == \
        ["a", "b/cases.json"]
    save_volume(tmp_path / "scans" / "a.nii.gz", np.ones((8, 8, 8), np.float32), np.eye(4))
    result = run_cli("train", "--train", str(tmp_path / "scans"), str(tmp_path / "nowhere"), "--name", "m",
                     "--output-dir", str(tmp_path / "models"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert str(tmp_path / "nowhere") in result.stderr and "not found" in result.stderr
    assert not (tmp_path / "models").exists()


def test_position_statistics_volumes_need_position_norm():
    args = _train_args("--position-stats", "a", "b/cases.json")
    train.resolve_options(args)
    assert args.position_stats == ["a", "b/cases.json"] and args.position_norm
    assert _train_args().position_stats is None
    for extra in (["--no-position-norm"], ["--preset", "paper", "--encoder-weights", "none"]):
        with pytest.raises(UserError, match="--position-stats gives volumes for the per-position statistics"):
            train.resolve_options(_train_args("--position-stats", "a", *extra))


def test_options_of_the_other_method_are_refused():
    """A forgotten --method u2ad (or a SimpleSliceNet option with it) would otherwise be ignored silently."""
    result = run_cli("train", "--train", "x", "--name", "m", "--guidance", "eu", "--mc-samples", "8")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == ("error: --guidance, --mc-samples: U2AD option(s); add --method u2ad, or drop "
                                     "them for SimpleSliceNet")
    with pytest.raises(UserError, match=r"^--smoothing-mm, --keep, --position-stats: SimpleSliceNet option"):
        train._check_method_options(_train_args("--method", "u2ad", "--smoothing-mm", "4", "--keep", "last",
                                                "--position-stats", "a"))
    # Options both methods read, values equal to the defaults, and each method's own options pass.
    for extra in (["--method", "u2ad", "--guidance", "eu", "--epochs", "3", "--lr", "1e-4", "--keep", "best"],
                  ["--smoothing-mm", "4", "--mc-samples", "4", "--calibration-fpr", "0.01"]):
        train._check_method_options(_train_args(*extra))


def test_the_kept_epoch_is_the_best_validated_or_the_last():
    rows = [{"epoch": 1, "val_auroc": 0.90}, {"epoch": 2, "val_auroc": 0.95}, {"epoch": 3, "val_auroc": 0.93}]
    assert train._selected_row(History(rows))["epoch"] == 2
    assert train._selected_row(History(rows), "last")["epoch"] == 3
    assert train._selected_row(History([{"epoch": 1}, {"epoch": 2}]))["epoch"] == 2  # nothing validated
    assert _train_args().keep == "best" and _train_args("--keep", "last").keep == "last"


def test_learning_rate_schedules():
    constant = TrainConfig(epochs=10, lr=1e-3)
    assert [train.epoch_learning_rate(constant, e) for e in (0, 5, 9)] == [1e-3] * 3
    cosine = TrainConfig(epochs=10, lr=1e-3, lr_schedule="cosine")
    rates = [train.epoch_learning_rate(cosine, e) for e in range(10)]
    assert rates[0] == pytest.approx(1e-3) and rates[5] == pytest.approx(5e-4)
    assert all(a > b > 0 for a, b in zip(rates[:-1], rates[1:], strict=True))  # decreasing, never 0
    args = _train_args("--lr-schedule", "cosine")
    train.resolve_options(args)
    assert args.lr_schedule == "cosine"


def test_modality_follows_the_contrast_unless_given():
    for extra, modality in (((), "T1"), (("--contrast", "flair"), "FLAIR"), (("--contrast", "t1ce"), "T1ce"),
                            (("--contrast", "t2", "--modality", "T2w"), "T2w")):
        args = _train_args(*extra)
        train.resolve_options(args)
        assert args.modality == modality


def test_grid_options_build_the_model_grid():
    config = grid_config(_train_args("--shape", "64,64,32", "--spacing", "2,2,3", "--anchor", "superior",
                                     "--slice-axis", "coronal"), PreprocessConfig())
    assert (config.shape, config.spacing, config.anchor, config.slice_axis) == \
        ((64, 64, 32), (2.0, 2.0, 3.0), "superior", "coronal")
    u2ad_grid = PreprocessConfig(shape=(128, 128, 64), spacing=(1.5, 1.5, 2.4))
    assert grid_config(_train_args(), u2ad_grid) == u2ad_grid  # silent options keep the method's grid
    # Alignment: SimpleSliceNet's default, off with the superior anchor unless both are asked for (refused).
    assert grid_config(_train_args("--anchor", "superior"), SLICENET_GRID).align == "none"
    assert grid_config(_train_args("--align", "none"), SLICENET_GRID).align == "none"
    with pytest.raises(UserError, match="centre anchor only"):
        grid_config(_train_args("--align", "brain-axes", "--anchor", "superior"), SLICENET_GRID)
    for bad, message in ((("--shape", "64,64"), "three values"), (("--spacing", "1,x,1"), "--spacing expects"),
                         (("--shape", "64,0,32"), "positive")):
        with pytest.raises(UserError, match=message):
            grid_config(_train_args(*bad), PreprocessConfig())


def test_paper_preset_with_explicit_overrides_and_the_encoder_alias(tmp_path):
    args = _train_args("--preset", "paper", "--encoder", str(tmp_path / "edc.safetensors"), "--epochs", "5",
                       "--loss", "triplet")
    train.resolve_options(args)
    assert args.encoder_weights == str(tmp_path / "edc.safetensors")
    assert (args.epochs, args.loss) == (5, "triplet")  # given explicitly
    assert (args.backbone, args.taps, args.channels_per_tap, args.shape, args.spacing) == \
        ("wide_resnet50_2", "2,3", 256, "192,192,96", "1,1,1")
    assert (args.noise_sigma, args.noise_space, args.lr, args.group, args.blocks, args.slab_position) == \
        (0.08, "raw", 1e-3, 3, 8, False)
    assert (args.neighbourhood, grid_config(args, SLICENET_GRID).align) == (3, "none")  # the paper's
    assert (args.position_norm, args.smoothing_mm, args.guide_radius_mm, args.score_stride) == (False, 4.0, 0.0, None)
    config = TrainConfig()
    assert (config.spp_beta, config.spp_tau, config.sub_batch) == (0.05, 0.1, 4096)


def test_paper_preset_needs_weights_unless_none_is_asked_for():
    with pytest.raises(UserError, match="--encoder-weights timm"):
        train.resolve_options(_train_args("--preset", "paper"))
    args = _train_args("--preset", "paper", "--encoder-weights", "none")
    train.resolve_options(args)
    assert args.encoder_weights == "none"
    with pytest.raises(UserError, match="u2ad"):
        train.resolve_options(_train_args("--preset", "paper", "--encoder-weights", "none", "--method", "u2ad"))


def test_paper_preset_builds_the_published_model_with_imagenet_normalisation():
    args = _train_args("--preset", "paper", "--encoder-weights", "none")
    train.resolve_options(args)
    mean, std = train._input_normalisation(args.backbone, args.encoder_weights, (0.5,) * 3, (0.5,) * 3)
    assert mean == (0.485, 0.456, 0.406) and std == (0.229, 0.224, 0.225)
    assert train._input_normalisation("tf_efficientnet_lite0", "imagenet", (0,) * 3, (1,) * 3) == \
        ((0.5,) * 3, (0.5,) * 3)


def test_preset_without_weights_is_one_line_from_the_cli(tmp_path):
    result = run_cli("train", "--train", str(tmp_path), "--name", "m", "--preset", "paper")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --preset paper") and "--encoder-weights timm" in lines[0]


# --- per-epoch log and checkpoints ---------------------------------------------------------------


def _csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_history_and_curves_are_rewritten_after_every_epoch(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    output = tmp_path / "m.json"
    messages = []
    progress = Progress("train", "none")
    progress.info = messages.append
    log = TrainingLog(output, progress, History())
    assert messages == ["tensorboard is not installed: no TensorBoard logs (pip install tensorboard to get them)"]
    log.epoch(step=4, epoch=1, loss=0.5, ml=0.5, elapsed_s=1.0, epoch_s=1.0)
    rows = _csv_rows(output.with_suffix(".history.csv"))
    assert [(r["epoch"], r["step"], r["loss"]) for r in rows] == [("1", "4", "0.5")]
    assert list(rows[0])[:3] == ["epoch", "step", "elapsed_s"]
    assert output.with_suffix(".curves.png").stat().st_size > 0
    log.epoch(step=8, epoch=2, loss=0.25, ml=0.2, push=0.05, elapsed_s=2.0, epoch_s=1.0, val_auroc=0.9)
    rows = _csv_rows(output.with_suffix(".history.csv"))
    assert [(r["step"], r["push"], r["val_auroc"]) for r in rows] == [("4", "", ""), ("8", "0.05", "0.9")]
    log.close()
    assert len(messages) == 1 and not output.with_suffix(".tb").exists()


def test_tensorboard_scalars_when_the_package_is_installed(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output = tmp_path / "m.json"
    log = TrainingLog(output, Progress("train", "none"), History())
    log.epoch(step=3, epoch=1, loss=0.5, elapsed_s=1.0, val_auroc=0.75)
    log.epoch(step=6, epoch=2, loss=0.25, elapsed_s=2.0, val_auroc=0.8)
    log.close()
    events = EventAccumulator(str(output.with_suffix(".tb"))).Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(3, 0.5), (6, 0.25)]
    assert [e.step for e in events.Scalars("val_auroc")] == [3, 6]


def test_non_writer_ranks_log_nothing(tmp_path):
    output = tmp_path / "m.json"
    history = History()
    log = TrainingLog(output, Progress("train", "none"), history, write=False)
    log.epoch(step=1, epoch=1, loss=1.0, elapsed_s=0.1)
    log.close()
    assert history.rows == [{"step": 1, "epoch": 1, "loss": 1.0, "elapsed_s": 0.1}] and list(tmp_path.iterdir()) == []


def test_checkpoints_from_before_the_new_options_resume_and_others_are_refused(tmp_path):
    net = SliceNetModel(_config(), encoder_weights="none")
    optimizer = torch.optim.Adam(net.flow.parameters())
    output = tmp_path / "m.json"
    meta = {"model_config": train._config_dict(net.config), "train_config": {}}
    train._save_checkpoint(output, net, optimizer, 2, History([{"epoch": 3}]), meta)
    info = output.with_suffix(".checkpoint.json")
    saved = json.loads(info.read_text())
    for key in ("slab_stride", "aggregation"):
        del saved["model_config"][key]
    del saved["model_config"]["scoring"]["encoder_precision"]  # a field added inside a nested config
    info.write_text(json.dumps(saved))
    epoch, history = train._load_checkpoint(output, net, optimizer, meta)
    assert epoch == 2 and history.rows == [{"epoch": 3}]
    other = SliceNetModel(_config(stride=1), encoder_weights="none")
    other_meta = {"model_config": train._config_dict(other.config), "train_config": {}}
    with pytest.raises(UserError, match="another model configuration"):
        train._load_checkpoint(output, other, torch.optim.Adam(other.flow.parameters()), other_meta)


# --- placement augmentation (--augment) ----------------------------------------------------------


def test_placement_jitter_turns_scales_and_shifts_the_grid_about_its_centre_within_bounds():
    config = PreprocessConfig(shape=(64, 48, 24), spacing=(1.0, 1.0, 2.0))
    assert np.allclose(placement_jitter(config, np.random.default_rng(0), 0.0, 0.0, 0.0), np.eye(4))
    centre = np.append((np.asarray(config.shape) - 1) / 2.0, 1.0)
    spacing = np.asarray(config.spacing)
    shifts, sizes = [], []
    for seed in range(50):
        offset = placement_jitter(config, np.random.default_rng(seed), 4.0, 5.0, 0.04)
        shifts.append(np.abs((offset @ centre - centre)[:3] * spacing))  # in mm
        mm = np.diag(spacing) @ offset[:3, :3] @ np.diag(1.0 / spacing)  # the linear part in mm
        size = np.cbrt(np.linalg.det(mm))
        turn = mm / size
        assert np.allclose(turn @ turn.T, np.eye(3), atol=1e-9)  # a rotation in millimetres, on anisotropic voxels
        assert np.degrees(np.arccos((np.trace(turn) - 1) / 2)) <= 5.0 * np.sqrt(3) + 1e-6
        sizes.append(size)
    assert np.max(shifts) <= 4.0 + 1e-9 and np.max(shifts) > 3.0  # the bounds, and they are used
    assert 0.96 - 1e-9 <= min(sizes) < 0.98 and 1.02 < max(sizes) <= 1.04 + 1e-9


def test_a_grid_offset_moves_the_model_grid_and_the_maps_still_land_on_the_input_grid():
    shape, spacing = (48, 56, 40), (1.5, 1.5, 2.0)
    affine = grid_affine(shape, spacing)
    volume = Volume(phantom(shape, affine), affine)
    config = PreprocessConfig(shape=(64, 64, 32), spacing=(2.0, 2.0, 3.0))
    plain = preprocess(volume, config)
    offset = placement_jitter(config, np.random.default_rng(3), 4.0, 4.0, 0.04)
    moved = preprocess(volume, config, grid_offset=offset)
    np.testing.assert_allclose(moved.mapping.model_affine, plain.mapping.model_affine @ offset)
    assert not np.array_equal(moved.image, plain.image)
    assert moved.mapping.input_affine is plain.mapping.input_affine and moved.input_brain.shape == shape


def test_each_epoch_fits_one_placement_of_every_volume():
    items = [VolumeItem(f"v{i}", None, variant=k, variants=3) for i in range(4) for k in range(3)]
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(10):
        chosen = train._epoch_placements(items, rng)
        assert sorted(item.id for item in chosen) == ["v0", "v1", "v2", "v3"]
        seen |= {(item.id, item.variant) for item in chosen}
    assert len(seen) > 8  # the placements vary from epoch to epoch
    single = [VolumeItem(f"v{i}", None) for i in range(3)]
    assert train._epoch_placements(single, rng) is single  # no augmentation: the same items, no draw


def test_placements_of_one_volume_count_as_one_volume_in_the_position_statistics():
    torch.manual_seed(0)
    net = SliceNetModel(_config(), encoder_weights="none").eval()
    g = torch.Generator().manual_seed(1)
    cells = torch.ones(8, 6, 8, dtype=torch.bool)
    volumes = [torch.randn(8, 6, 8, net.dim, generator=g) for _ in range(6)]
    train._position_statistics(net, [VolumeItem(f"v{i}", f, cells=cells) for i, f in enumerate(volumes)], Context())
    once = net.nll_mean.clone(), net.nll_std.clone()
    tripled = [VolumeItem(f"v{i}", f, cells=cells, variant=k, variants=3) for i, f in enumerate(volumes)
               for k in range(3)]
    train._position_statistics(net, tripled, Context())
    torch.testing.assert_close(net.nll_mean, once[0])
    torch.testing.assert_close(net.nll_std, once[1])


def test_augment_needs_one_placement_or_more(tmp_path):
    args = _train_args("--augment", "4")
    train.resolve_options(args)
    assert args.augment == 4 and _train_args().augment == 1
    result = run_cli("train", "--train", str(tmp_path), "--name", "m", "--augment", "0")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: --augment 0: give 1 (no placement jitter) or more placements per volume"
