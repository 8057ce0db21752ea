"""U2AD building blocks: ROI-restricted masking, Monte-Carlo masks, uncertainty maps, guidance phases, detection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from SimpleSliceNetLib.preprocess import PreprocessConfig
from SimpleSliceNetLib.u2ad import (
    U2ADConfig,
    U2ADModel,
    guided_masks,
    monte_carlo_masks,
    patchify,
    reconstruction_loss,
    roi_patches,
    slab_scores,
    uncertainty_maps,
    unpatchify,
)
from SimpleSliceNetTraining.train_u2ad import U2ADTrainConfig, phase, top_error_patches


def tiny_config(**changes) -> U2ADConfig:
    values = dict(preprocess=PreprocessConfig(shape=(32, 32, 16), spacing=(6.0, 6.0, 8.0), min_brain_ml=1.0),
                  patch=4, encoder_depth=1, encoder_dim=32, encoder_heads=2, decoder_depth=1, decoder_dim=16,
                  decoder_heads=2)
    values.update(changes)
    return U2ADConfig(**values)


def disc_roi(batch: int = 3, size: int = 32, radius: float = 10.0) -> torch.Tensor:
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < radius**2
    return torch.from_numpy(disc)[None].repeat(batch, 1, 1)


def test_patchify_round_trip_and_roi_patches():
    images = torch.rand(2, 16, 24)
    tokens = patchify(images, 4)
    assert tokens.shape == (2, 24, 16)
    assert torch.equal(unpatchify(tokens, 4, (16, 24)), images)
    roi = torch.zeros(1, 16, 24, dtype=torch.bool)
    roi[0, 5, 9] = True  # one pixel makes its patch (row 1, column 2) part of the ROI
    assert roi_patches(roi, 4)[0].nonzero()[:, 0].tolist() == [1 * 6 + 2]


def test_masks_stay_inside_the_roi_with_the_requested_ratio():
    roi = roi_patches(disc_roi(), 4)
    generator = torch.Generator().manual_seed(0)
    masked = guided_masks(roi, 0.75, generator)
    assert not (masked & ~roi).any()
    assert torch.equal(masked.sum(1), torch.round(0.75 * roi.sum(1).float()).long())
    assert ((roi & ~masked).sum(1) >= 1).all()
    # A slice whose ROI is a single patch keeps it visible (the encoder needs a token).
    one = torch.zeros(1, roi.shape[1], dtype=torch.bool)
    one[0, 5] = True
    assert not guided_masks(one, 0.9, generator).any()


def test_excluded_patches_are_never_masked():
    roi = roi_patches(disc_roi(), 4)
    excluded = torch.zeros_like(roi)
    excluded[:, roi[0].nonzero()[:4, 0]] = True
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        masked = guided_masks(roi, 0.75, generator, excluded=excluded)
        assert not (masked & excluded).any()
        eligible = (roi & ~excluded).sum(1).float()
        assert torch.equal(masked.sum(1), torch.round(0.75 * eligible).long())


def test_eu_guided_masking_masks_uncertain_patches_more():
    roi = roi_patches(disc_roi(1), 4)
    eu = torch.full(roi.shape, 0.01)
    hot = roi[0].nonzero()[:5, 0]
    eu[0, hot] = 1.0
    generator = torch.Generator().manual_seed(2)
    uniform = torch.stack([guided_masks(roi, 0.5, generator) for _ in range(300)]).float().mean(0)
    guided = torch.stack([guided_masks(roi, 0.5, generator, eu=eu, eu_strength=3.0)
                          for _ in range(300)]).float().mean(0)
    others = roi[0].clone()
    others[hot] = False
    assert guided[0, hot].mean() > uniform[0, hot].mean() + 0.2
    assert guided[0, hot].mean() > guided[0, others].mean() + 0.3
    assert abs(float(uniform[0, hot].mean()) - 0.5) < 0.1


def test_monte_carlo_masks_cover_every_roi_patch():
    roi = roi_patches(disc_roi(), 4)
    masks = monte_carlo_masks(roi, 4, 0.75, torch.Generator().manual_seed(3))
    assert masks.shape == (4, *roi.shape)
    assert not (masks & ~roi[None]).any()
    visible = (~masks & roi[None]).sum(0)
    assert (visible[roi] == 1).all()  # hidden in exactly 3 of the 4 masks: every patch is reconstructed


def test_uncertainty_maps_on_known_inputs():
    recons = torch.tensor([1.0, 2.0, 3.0, 10.0]).view(4, 1, 1, 1).expand(4, 1, 2, 2).clone()
    hidden = torch.ones(4, 1, 2, 2, dtype=torch.bool)
    hidden[3] = False  # the 4th reconstruction saw the input there: it does not count
    hidden[:, 0, 1, 1] = False  # never hidden: no estimate
    images = torch.full((1, 2, 2), 0.5)
    roi = torch.ones(1, 2, 2, dtype=torch.bool)
    roi[0, 1, 0] = False  # outside the ROI
    eu, au = uncertainty_maps(recons, hidden, images, roi)
    assert eu[0, 0, 0] == pytest.approx(2.0 / 3.0)  # variance of 1, 2, 3
    assert au[0, 0, 0] == pytest.approx(1.5)  # |mean 2 - 0.5|
    assert eu[0, 1, 0] == au[0, 1, 0] == 0.0
    assert eu[0, 1, 1] == au[0, 1, 1] == 0.0


def test_reconstruction_loss_weights_l1_and_edges():
    images = torch.zeros(1, 8, 8)
    region = torch.ones(1, 8, 8, dtype=torch.bool)
    loss, parts = reconstruction_loss(images.clone(), images, region)
    assert float(loss) == 0.0
    flat = torch.full((1, 8, 8), 0.2)  # constant offset: no edges inside, L1 0.2
    loss, parts = reconstruction_loss(flat, images, region, l1_weight=10.0, edge_weight=0.0)
    assert parts["l1"] == pytest.approx(0.2) and float(loss) == pytest.approx(2.0)


def test_reconstruction_ignores_hidden_and_non_roi_content():
    torch.manual_seed(0)
    cfg = tiny_config()
    net = U2ADModel(cfg).eval()
    roi_pixels = disc_roi(1)
    roi = roi_patches(roi_pixels, cfg.patch)
    masked = guided_masks(roi, 0.75, torch.Generator().manual_seed(4))
    images = torch.rand(1, 32, 32)
    pixels_hidden = unpatchify(masked[..., None].expand(-1, -1, 16).float(), 4, (32, 32)) > 0
    pixels_roi = unpatchify(roi[..., None].expand(-1, -1, 16).float(), 4, (32, 32)) > 0
    changed = torch.where(pixels_hidden | ~pixels_roi, torch.rand(1, 32, 32), images)
    with torch.inference_mode():
        out = net(images, roi, masked)
        again = net(changed, roi, masked)
    assert torch.allclose(out, again, atol=1e-5)
    assert (out[~roi] == 0).all() and (out[roi].abs() > 0).any()


def test_guidance_phases():
    eu_au = U2ADTrainConfig(epochs=10, guidance="eu+au", au_start=0.5)
    assert [phase(e, eu_au, e >= 2) for e in range(10)] == ["random"] * 2 + ["eu"] * 3 + ["eu+au"] * 5
    eu_only = U2ADTrainConfig(epochs=10, guidance="eu")
    assert {phase(e, eu_only, True) for e in range(10)} == {"eu"}
    assert {phase(e, U2ADTrainConfig(guidance="none"), True) for e in range(10)} == {"random"}


def test_top_error_patches_are_chosen_per_volume():
    tokens = torch.ones(4, 10, dtype=torch.bool)
    tokens[:, 0] = False
    au = torch.arange(40, dtype=torch.float32).view(4, 10)
    au[2:] *= 0.01  # the second volume's errors are much lower, yet it has its own top patches
    volume = np.array([0, 0, 1, 1])
    excluded = top_error_patches(au, tokens, volume, 0.2)
    assert not (excluded & ~tokens).any()
    for v in (0, 1):
        rows = torch.from_numpy(volume == v)
        picked = au[rows][excluded[rows]]
        assert len(picked) == 4  # 20% of 18 ROI patches, ties included
        assert picked.min() >= au[rows][tokens[rows]].max() - 3 * (au[rows][0, 2] - au[rows][0, 1]) - 1e-6


def test_config_round_trip_and_slab_scores(make_phantom):
    from conftest import grid_affine

    from SimpleSliceNetLib.preprocess import preprocess
    from SimpleSliceNetLib.volume_io import Volume

    cfg = tiny_config(slab_mm=16.0)
    assert U2ADConfig.from_dict(cfg.to_dict()) == cfg
    shape = (60, 72, 50)
    affine = grid_affine(shape, (2.5, 2.5, 2.5))
    pre = preprocess(Volume(make_phantom(shape, affine), affine), cfg.preprocess)
    heat = np.zeros(cfg.preprocess.shape, dtype=np.float32)
    heat[16, 16, 7] = 3.0
    slabs = slab_scores(heat, pre.brain, pre, cfg)
    assert all(s["axis"] == "S" and s["to_mm"] - s["from_mm"] == pytest.approx(16.0) for s in slabs)
    best = max(slabs, key=lambda s: s["score"])
    z = pre.mapping.model_affine[2, 3] + 8.0 * 7
    assert best["score"] == 3.0 and best["from_mm"] <= z <= best["to_mm"]


def test_detector_runs_a_u2ad_model_file(tmp_path, make_phantom):
    from conftest import grid_affine

    from SimpleSliceNetLib.detector import Detector
    from SimpleSliceNetLib.model_file import read_model_file, write_model_file
    from SimpleSliceNetLib.volume_io import Volume

    cfg = tiny_config()
    net = U2ADModel(cfg)
    path = write_model_file(tmp_path / "u2ad-tiny.json", state_dict=net.state_dict(), method="u2ad",
                            config=cfg.to_dict())
    detector = Detector(read_model_file(path), "cpu")
    shape = (50, 60, 40)
    affine = grid_affine(shape, (3.0, 3.0, 3.5))
    volume = Volume(make_phantom(shape, affine), affine)
    result = detector.detect(volume)
    assert result.heatmap.shape == shape
    assert set(result.extra_maps) == {"uncertainty", "aleatoric"}
    for array in (result.heatmap, *result.extra_maps.values()):
        assert array.shape == shape and (array[~result.brain_mask] == 0).all()
    assert (result.extra_maps["uncertainty"] >= 0).all() and result.extra_maps["aleatoric"].max() > 0
    assert result.slab_scores and result.threshold == 1.0
    again = detector.detect(volume)  # masks come from the model's seed: reproducible
    assert np.array_equal(again.heatmap, result.heatmap)
