"""XMC-GAN networks (fastxmc.models): architecture fidelity, shapes, modulation, masking, gradients.

Forward/backward tests use tiny widths; the full-size models are only built on the meta device to
count their parameters.
"""
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm

from fastxmc.models.blocks import with_coordinates, with_saturation
from fastxmc.models import (Discriminator, Generator, SelfModulationBN, SpatialModulationBN,
                            count_parameters)

RESOLUTIONS = [32, 64, 128, 256]
TEXT_DIM, Z_DIM, WIDTH = 24, 16, 4


def _text(batch=3, tokens=6, text_dim=TEXT_DIM, seed=1):
    """sentence (B, E), words (B, T, E), word_mask (B, T) with captions of different lengths."""
    gen = torch.Generator().manual_seed(seed)
    sentence = torch.randn(batch, text_dim, generator=gen)
    words = torch.randn(batch, tokens, text_dim, generator=gen)
    lengths = torch.tensor([tokens - (i % 3) for i in range(batch)])
    word_mask = torch.arange(tokens)[None, :] < lengths[:, None]
    return sentence, words, word_mask


def _generator(resolution=32, **kwargs):
    return Generator(resolution, TEXT_DIM, z_dim=Z_DIM, width=WIDTH, **kwargs)


# ---------------------------------------------------------------- parameter counts
def _linear(fan_in, fan_out):
    return fan_in * fan_out + fan_out


def _conv(fan_in, fan_out, k):
    return k * k * fan_in * fan_out + fan_out


def _reference_generator_count(multipliers, text_dim, z_dim, width):
    """Layer list of the reference code's Generator (every layer with a bias; BN has no affine)."""
    cond, spatial = 2 * z_dim, text_dim + 2 * z_dim
    total = _linear(text_dim, z_dim) + _linear(z_dim, 16 * width * 16)
    channels = [16 * width] + [m * width for m in multipliers]
    for index, (cin, cout) in enumerate(zip(channels[:-1], channels[1:])):
        if index == 2:  # the query conv at 16x16, before the first per-pixel block
            total += _conv(cin, text_dim, 1)
        modulation = (lambda c: 2 * _linear(cond, c)) if index < 2 else (lambda c: 2 * _conv(spatial, c, 1))
        total += modulation(cin) + _conv(cin, cout, 3) + modulation(cout) + _conv(cout, cout, 3)
        total += _conv(cin, cout, 1)
    return total + 2 * _conv(spatial, channels[-1], 1) + _conv(channels[-1], 3, 3)


def _reference_discriminator_count(first, blocks, region_channels, text_dim, width):
    """Layer list of the reference code's Discriminator, word conv and sentence projection included."""
    total = _conv(3, first * width, 3) + _conv(first * width, first * width, 3) + _conv(3, first * width, 1)
    cin = first * width
    for multiplier, downsample in blocks:
        cout = multiplier * width
        total += _conv(cin, cout, 3) + _conv(cout, cout, 3)
        total += _conv(cin, cout, 1) if downsample or cin != cout else 0
        cin = cout
    return total + _linear(cin, 1) + _linear(text_dim, cin) + _conv(region_channels, text_dim, 1)


def _meta_models(resolution, text_dim=768, width=96, z_dim=128):
    with torch.device("meta"):
        return (Generator(resolution, text_dim, z_dim=z_dim, width=width),
                Discriminator(resolution, text_dim, width=width))


def test_parameter_counts_match_the_reference_code_at_128():
    # Published by the issue from the official JAX code (128px, width 96, z 128, BERT 768): matched
    # exactly, because every layer, bias and width follows xmc_net.py / common.py / layers.py.
    G, D = _meta_models(128)
    assert count_parameters(G) == 78_507_779
    assert count_parameters(D) == 87_911_713
    assert _reference_generator_count((16, 8, 4, 2, 1), 768, 128, 96) == 78_507_779
    assert _reference_discriminator_count(1, [(2, 1), (4, 1), (8, 1), (16, 1), (16, 0)], 384, 768,
                                          96) == 87_911_713


@pytest.mark.parametrize("resolution, g_mult, d_first, d_blocks, region_mult", [
    (32, (16, 8, 4), 4, [(8, 1), (16, 1), (16, 0)], 4),
    (64, (16, 8, 4, 2), 2, [(4, 1), (8, 1), (16, 1), (16, 0)], 4),
    (256, (16, 8, 8, 4, 2, 1), 1, [(2, 1), (4, 1), (8, 1), (8, 1), (16, 1), (16, 0)], 8),
])
def test_parameter_counts_follow_the_layer_list(resolution, g_mult, d_first, d_blocks, region_mult):
    G, D = _meta_models(resolution)
    assert count_parameters(G) == _reference_generator_count(g_mult, 768, 128, 96)
    assert count_parameters(D) == _reference_discriminator_count(d_first, d_blocks, region_mult * 96,
                                                                 768, 96)
    if resolution == 256:  # one more 768-channel stage on each side (G 92.9M, D 99.4M)
        print(f"256px: G {count_parameters(G):,} D {count_parameters(D):,}")
        assert (count_parameters(G), count_parameters(D)) == (92_865_539, 99_415_585)


def test_count_parameters_ignores_frozen_and_buffers():
    layer = nn.Linear(3, 2)
    assert count_parameters(layer) == 8
    layer.bias.requires_grad_(False)
    assert count_parameters(layer) == 6
    assert count_parameters(SelfModulationBN(5, 3)) == 2 * (3 * 5 + 5)  # running stats are buffers


# ---------------------------------------------------------------- shapes, range, outputs
@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_shapes_and_range(resolution):
    G = _generator(resolution)
    D = Discriminator(resolution, TEXT_DIM, width=WIDTH)
    sentence, words, word_mask = _text(batch=2)
    images = G(torch.randn(2, Z_DIM), sentence, words, word_mask)
    assert images.shape == (2, 3, resolution, resolution)
    assert images.min() >= 0 and images.max() <= 1
    out = D(torch.cat([torch.rand_like(images), images]), sentence)
    assert out.logits.shape == (4,)
    assert out.features.shape == (4, 16 * WIDTH)
    assert out.regions.shape == (4, 256, TEXT_DIM)
    assert out.sentence.shape == (2, 16 * WIDTH)
    assert out.classes is None   # no class head without num_classes
    assert all(torch.isfinite(t).all() for t in out[:4])


def test_discriminator_projection_and_sentence_tiling():
    D = Discriminator(32, TEXT_DIM, width=WIDTH).eval()
    sentence, _, _ = _text(batch=3)
    real, fake = torch.rand(3, 3, 32, 32), torch.rand(3, 3, 32, 32)
    both = D(torch.cat([real, fake]), sentence)
    alone = D(fake, sentence)
    torch.testing.assert_close(both.logits[3:], alone.logits)
    torch.testing.assert_close(both.features[3:], alone.features)
    # logit = Linear(p) + <p, e>, p = sum-pooled ReLU of the last block, e = the sentence projection.
    h = fake
    for block in D.blocks:
        h = block(h)
    p = F.relu(h).sum(dim=(2, 3))
    torch.testing.assert_close(alone.features, p)
    torch.testing.assert_close(alone.sentence, D.sentence_proj(sentence))
    expected = D.head(p)[:, 0] + (p * alone.sentence).sum(1)
    torch.testing.assert_close(alone.logits, expected)


def test_discriminator_class_head_classifies_the_global_feature():
    """num_classes > 0 (loss.class_weight): class logits = Linear(p), spectrally normalised like
    every D layer; without it D has no head and returns classes=None."""
    torch.manual_seed(0)
    D = Discriminator(32, TEXT_DIM, width=WIDTH, num_classes=7).eval()
    out = D(torch.rand(4, 3, 32, 32), _text(batch=2)[0])
    assert out.classes.shape == (4, 7) and _has_spectral_norm(D.classifier)
    torch.testing.assert_close(out.classes, D.classifier(out.features))
    plain = Discriminator(32, TEXT_DIM, width=WIDTH)
    assert plain.classifier is None and plain(torch.rand(2, 3, 32, 32), _text(batch=2)[0]).classes is None
    extra = count_parameters(D) - count_parameters(Discriminator(32, TEXT_DIM, width=WIDTH))
    assert extra == 16 * WIDTH * 7 + 7
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match="num_classes must be an int >= 0"):
            Discriminator(32, TEXT_DIM, width=WIDTH, num_classes=bad)


def test_coordinate_channels_are_appended_to_the_input():
    """With coords, D's first conv sees (image, x, y) and everything downstream is computed from that."""
    assert with_coordinates(torch.zeros(1, 3, 2, 3)).tolist()[0][3:] == [
        [[-1.0, 0.0, 1.0], [-1.0, 0.0, 1.0]], [[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]]
    torch.manual_seed(0)
    D = Discriminator(32, TEXT_DIM, width=WIDTH, coords=True).eval()
    assert D.blocks[0].conv1.weight.shape[1] == 5 and D.coords
    images = torch.rand(2, 3, 32, 32)
    out = D(images, _text(batch=2)[0])
    h = with_coordinates(images)
    for block in D.blocks:
        h = block(h)
    torch.testing.assert_close(out.features, F.relu(h).sum(dim=(2, 3)))


def test_saturation_channel_comes_before_the_coordinates():
    """saturation=True: D's first conv sees (image, max - min over RGB[, x, y])."""
    rgb = torch.tensor([[[[0.2, 0.9]], [[0.5, 0.5]], [[0.4, 0.4]]]])  # (1, 3, 1, 2)
    assert with_saturation(rgb)[0, 3, 0].tolist() == pytest.approx([0.3, 0.5])
    torch.manual_seed(0)
    D = Discriminator(32, TEXT_DIM, width=WIDTH, coords=True, saturation=True).eval()
    assert D.blocks[0].conv1.weight.shape[1] == 6 and D.saturation
    assert Discriminator(32, TEXT_DIM, width=WIDTH, saturation=True).blocks[0].conv1.weight.shape[1] == 4
    images = torch.rand(2, 3, 32, 32)
    out = D(images, _text(batch=2)[0])
    h = with_coordinates(with_saturation(images))
    for block in D.blocks:
        h = block(h)
    torch.testing.assert_close(out.features, F.relu(h).sum(dim=(2, 3)))


def test_input_scale_runs_the_twice_larger_architecture_on_the_enlarged_input():
    """input_scale=2: a 32px D is the 64px D (same parameters, same outputs) applied to the input
    enlarged 2x (bilinear); it still takes 32px images and gives 16x16 regions."""
    torch.manual_seed(0)
    D = Discriminator(32, TEXT_DIM, width=WIDTH, coords=True, saturation=True, input_scale=2).eval()
    big = Discriminator(64, TEXT_DIM, width=WIDTH, coords=True, saturation=True).eval()
    assert count_parameters(D) == count_parameters(big) and len(D.blocks) == 5
    big.load_state_dict(D.state_dict())
    images, sentence = torch.rand(2, 3, 32, 32), _text(batch=2)[0]
    out = D(images, sentence)
    want = big(F.interpolate(images, size=(64, 64), mode="bilinear", align_corners=False), sentence)
    for got, expected in zip(out, want):
        if got is not None:
            torch.testing.assert_close(got, expected)
    assert out.regions.shape == (2, 256, TEXT_DIM)
    with pytest.raises(ValueError, match=r"images must have shape \(N, 3, 32, 32\)"):
        D(torch.rand(2, 3, 64, 64), sentence)


@pytest.mark.parametrize("resolution, scale, message", [
    (32, 3, "input_scale must be 1 or 2, got 3"),
    (32, True, "input_scale must be 1 or 2, got True"),
    (256, 2, "input_scale=2 needs a D architecture for 512px; resolution 256 has none"),
])
def test_input_scale_errors(resolution, scale, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Discriminator(resolution, TEXT_DIM, width=WIDTH, input_scale=scale)


def test_region_features_come_from_the_16x16_map_in_row_major_order():
    D = Discriminator(128, TEXT_DIM, width=WIDTH).eval()
    captured = {}
    D.blocks[D.region_block].register_forward_hook(lambda m, i, o: captured.setdefault("map", o))
    out = D(torch.rand(2, 3, 128, 128), _text(batch=2)[0])
    feature_map = captured["map"]
    assert feature_map.shape == (2, 4 * WIDTH, 16, 16)
    weight = D.region_proj.weight[:, :, 0, 0]                   # spectrally normalised (TEXT_DIM, C)
    for row, col in [(0, 0), (3, 11), (15, 15)]:
        expected = feature_map[:, :, row, col] @ weight.T + D.region_proj.bias
        torch.testing.assert_close(out.regions[:, row * 16 + col], expected)


# ---------------------------------------------------------------- spectral norm
def _has_spectral_norm(layer):
    return parametrize.is_parametrized(layer, "weight") and any(
        isinstance(p, _SpectralNorm) for p in layer.parametrizations.weight)


@pytest.mark.parametrize("resolution", [32, 128])
def test_spectral_norm_on_every_discriminator_layer_and_none_in_generator(resolution):
    D = Discriminator(resolution, TEXT_DIM, width=WIDTH)
    layers = [m for m in D.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == 3 + 3 * (len(D.blocks) - 1) - 1 + 3  # the last block has no shortcut conv
    assert all(_has_spectral_norm(m) for m in layers)
    G = _generator(resolution, attention_every_block=True)
    assert not any(parametrize.is_parametrized(m) for m in G.modules())


def test_spectral_norm_can_be_left_out():
    D = Discriminator(32, TEXT_DIM, width=WIDTH, spectral_norm=False)
    assert not any(parametrize.is_parametrized(m) for m in D.modules())
    assert count_parameters(D) == count_parameters(Discriminator(32, TEXT_DIM, width=WIDTH))


def test_spectral_norm_power_iteration_only_in_training():
    D = Discriminator(32, TEXT_DIM, width=WIDTH)
    layer = D.blocks[1].conv1                                      # (8w, 4w, 3, 3)
    sn = layer.parametrizations.weight[0]
    images, sentence = torch.rand(2, 3, 32, 32), _text(batch=2)[0]
    u0 = sn._u.clone()
    D.eval()
    first = D(images, sentence).logits
    assert torch.equal(sn._u, u0)
    torch.testing.assert_close(D(images, sentence).logits, first, rtol=0, atol=0)
    D.train()
    D(images, sentence)
    assert not torch.equal(sn._u, u0)
    for _ in range(20):
        D(images, sentence)
    # The power iteration has converged: the (out, in*kh*kw) weight has spectral norm 1.
    weight = layer.weight.detach().flatten(1)
    assert torch.linalg.matrix_norm(weight, ord=2).item() == pytest.approx(1.0, rel=1e-3)


# ---------------------------------------------------------------- modulation modules vs hand composition
def _bn_noaffine(x, eps=1e-5):
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def test_self_modulation_bn_matches_hand_composition():
    bn = SelfModulationBN(5, 7)
    x, cond = torch.randn(4, 5, 3, 3) * 2 + 1, torch.randn(4, 7)
    gamma, beta = cond @ bn.gamma.weight.T + bn.gamma.bias, cond @ bn.beta.weight.T + bn.beta.bias
    expected = _bn_noaffine(x) * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]
    torch.testing.assert_close(bn(x, cond), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn(x, cond, relu=True), expected.relu(), rtol=1e-5, atol=1e-5)
    # Two training calls moved the buffers with PyTorch's momentum 0.1 and the unbiased variance.
    mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=True)
    torch.testing.assert_close(bn.running_mean, (1 - 0.9 ** 2) * mean)
    torch.testing.assert_close(bn.running_var, 0.81 + (1 - 0.81) * var)
    bn.eval()
    normalized = (x - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + 1e-5)
    expected_eval = normalized * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]
    torch.testing.assert_close(bn(x, cond), expected_eval, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cond_size", [2, 8, 16])
def test_spatial_modulation_bn_matches_hand_composition(cond_size):
    # x at 8x8; the condition is nearest-resized first (the reference's order), then conv1x1.
    bn = SpatialModulationBN(3, 6)
    x, cond = torch.randn(2, 3, 8, 8), torch.randn(2, 6, cond_size, cond_size)
    if cond_size <= 8:
        factor = 8 // cond_size
        resized = cond.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)
    else:
        resized = cond[:, :, ::2, ::2]  # PyTorch's nearest downsampling keeps the top-left pixel
    gamma = torch.einsum("bkhw,ck->bchw", resized, bn.gamma.weight[:, :, 0, 0]) + bn.gamma.bias[:, None, None]
    beta = torch.einsum("bkhw,ck->bchw", resized, bn.beta.weight[:, :, 0, 0]) + bn.beta.bias[:, None, None]
    expected = _bn_noaffine(x) * (1 + gamma) + beta
    torch.testing.assert_close(bn(x, cond), expected, rtol=1e-5, atol=1e-5)
    bn.eval()
    normalized = (x - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + 1e-5)
    torch.testing.assert_close(bn(x, cond, relu=True), (normalized * (1 + gamma) + beta).relu(),
                               rtol=1e-5, atol=1e-5)


def test_modulation_rejects_bad_inputs():
    with pytest.raises(ValueError, match="channels"):
        SelfModulationBN(0, 4)
    with pytest.raises(ValueError, match="cond must have shape"):
        SelfModulationBN(3, 4)(torch.randn(2, 3, 4, 4), torch.randn(2, 5))
    with pytest.raises(ValueError, match="x must be"):
        SpatialModulationBN(3, 4)(torch.randn(2, 2, 4, 4), torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match="cond must have shape"):
        SpatialModulationBN(3, 4)(torch.randn(2, 3, 4, 4), torch.randn(2, 4, 4))


# ---------------------------------------------------------------- generator behaviour
def _attention_reference(queries, words, word_mask, rho=15.0):
    q, w = F.normalize(queries, dim=-1), F.normalize(words, dim=-1)
    logits = (rho * q @ w.transpose(1, 2)).masked_fill(~word_mask[:, None], -1e9)
    return torch.softmax(logits, dim=-1) @ w


def test_generator_spatial_condition_is_word_context_and_global_condition():
    G = _generator(64).eval()
    sentence, words, word_mask = _text(batch=2)
    z = torch.randn(2, Z_DIM)
    seen = {}
    G.global_blocks[-1].register_forward_hook(lambda m, i, o: seen.setdefault("x16", o))

    def keep_cond(module, args):
        seen["cond"] = args[1]

    G.spatial_blocks[1].register_forward_pre_hook(keep_cond)
    G(z, sentence, words, word_mask)
    x16 = seen["x16"]
    queries = G.queries[0](x16).flatten(2).transpose(1, 2)        # (B, 256, E), row-major regions
    context = _attention_reference(queries, words, word_mask)
    global_cond = torch.cat([G.sentence_proj(sentence), z], 1)
    cond = seen["cond"]                                            # still the 16x16 condition
    assert cond.shape == (2, TEXT_DIM + 2 * Z_DIM, 16, 16)
    torch.testing.assert_close(cond[:, :TEXT_DIM].flatten(2).transpose(1, 2), context,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cond[:, TEXT_DIM:], global_cond[:, :, None, None].expand(-1, -1, 16, 16))


@pytest.mark.parametrize("training", [True, False])
def test_padding_words_do_not_change_the_images(training):
    G = _generator(32).train(training)
    sentence, words, word_mask = _text(batch=3)
    assert not word_mask.all()
    z = torch.randn(3, Z_DIM)
    state = {k: v.clone() for k, v in G.state_dict().items()}
    before = G(z, sentence, words, word_mask)
    G.load_state_dict(state)  # the same running buffers for the second call
    noisy = torch.where(word_mask[..., None], words, 100 * torch.randn_like(words))
    torch.testing.assert_close(G(z, sentence, noisy, word_mask), before, rtol=0, atol=1e-6)
    real_changed = words.clone()
    real_changed[:, 0] += 1
    G.load_state_dict(state)
    assert not torch.allclose(G(z, sentence, real_changed, word_mask), before)


def test_generator_eval_mode_uses_running_statistics():
    G = _generator(32)
    sentence, words, word_mask = _text(batch=4)
    z = torch.randn(4, Z_DIM)
    for _ in range(3):
        G(z, sentence, words, word_mask)
    assert any(m.running_mean.abs().sum() > 0 for m in G.modules() if isinstance(m, SelfModulationBN))
    G.eval()
    batch = G(z, sentence, words, word_mask)
    single = G(z[:1], sentence[:1], words[:1], word_mask[:1])  # one sample: no batch statistics
    torch.testing.assert_close(single, batch[:1], rtol=1e-5, atol=1e-6)


def test_gradients_reach_every_parameter():
    G = _generator(64, attention_every_block=True)
    D = Discriminator(64, TEXT_DIM, width=WIDTH)
    sentence, words, word_mask = _text(batch=2)
    images = G(torch.randn(2, Z_DIM), sentence, words, word_mask)
    out = D(torch.cat([torch.rand_like(images), images]), sentence)
    loss = out.logits.sum() + out.regions.square().mean() + (out.features @ out.sentence.T).mean()
    loss.backward()
    for name, p in list(G.named_parameters()) + list(D.named_parameters()):
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_attention_every_block_adds_one_query_per_block():
    once, every = _generator(128), _generator(128, attention_every_block=True)
    assert len(once.queries) == 1 and len(every.queries) == 3
    assert [q.in_channels for q in every.queries] == [8 * WIDTH, 4 * WIDTH, 2 * WIDTH]
    # At 32px there is a single per-pixel block: both modes build and compute the same network.
    torch.manual_seed(3)
    a = _generator(32)
    torch.manual_seed(3)
    b = _generator(32, attention_every_block=True)
    args = (torch.randn(2, Z_DIM),) + _text(batch=2)
    torch.testing.assert_close(a(*args), b(*args), rtol=0, atol=0)


def test_text_stem_lets_the_sentence_lay_out_the_4x4_map():
    stems = {}
    for text_stem in (False, True):
        torch.manual_seed(5)
        G = _generator(32, text_stem=text_stem)
        assert G.stem.in_features == (2 * Z_DIM if text_stem else Z_DIM)
        outputs = []
        G.stem.register_forward_hook(lambda module, args, out: outputs.append(out.detach()))
        z = torch.randn(1, Z_DIM).expand(2, -1)       # one z, two different sentences
        G(z, *_text(batch=2))
        stems[text_stem] = outputs[0]
    # the reference's stem sees z only: equal rows; the text stem's rows differ with the sentence
    torch.testing.assert_close(stems[False][0], stems[False][1], rtol=0, atol=0)
    assert (stems[True][0] - stems[True][1]).abs().max() > 1e-3
    # off by default, so the 128px model keeps the reference's parameter count
    assert not Generator(128, 768).text_stem


def test_generator_coords_feed_the_region_queries():
    G = _generator(32, coords=True)
    assert G.queries[0].in_channels == 8 * WIDTH + 2 and not _generator(32).coords
    seen = []
    G.queries[0].register_forward_hook(lambda module, args, out: seen.append(args[0].detach()))
    G(torch.randn(2, Z_DIM), *_text(batch=2))
    q_in = seen[0]                                    # (B, 8w + 2, 16, 16)
    assert q_in.shape == (2, 8 * WIDTH + 2, 16, 16)
    torch.testing.assert_close(q_in[:, -2:], with_coordinates(torch.zeros(2, 0, 16, 16)))


def test_construction_and_forward_are_deterministic():
    def run():
        torch.manual_seed(11)
        G, D = _generator(32), Discriminator(32, TEXT_DIM, width=WIDTH)
        images = G(torch.randn(2, Z_DIM), *_text(batch=2))
        return G, D, images, D(images, _text(batch=2)[0]).logits
    G1, D1, img1, log1 = run()
    G2, D2, img2, log2 = run()
    for a, b in zip(list(G1.state_dict().values()) + list(D1.state_dict().values()),
                    list(G2.state_dict().values()) + list(D2.state_dict().values())):
        assert torch.equal(a, b)
    assert torch.equal(img1, img2) and torch.equal(log1, log2)


def test_glorot_normal_init_and_zero_biases():
    G = Generator(32, 64, z_dim=32, width=16)
    weight = G.stem.weight                                          # (16*16*16, 32)
    expected_std = (2.0 / (weight.shape[0] + weight.shape[1])) ** 0.5
    assert weight.std().item() == pytest.approx(expected_std, rel=0.02)
    conv = G.spatial_blocks[0].conv1.weight                         # (64, 128, 3, 3)
    fan_in, fan_out = conv.shape[1] * 9, conv.shape[0] * 9
    assert conv.std().item() == pytest.approx((2.0 / (fan_in + fan_out)) ** 0.5, rel=0.03)
    limit = 2 * (2.0 / (weight.shape[0] + weight.shape[1])) ** 0.5 / 0.8796
    assert weight.abs().max() <= limit * 1.0001                     # truncated at two sigma
    assert all(m.bias.abs().sum() == 0 for m in G.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def test_bfloat16_autocast_forward_and_backward():
    # Layers inside autocast return bfloat16 while z, the words and the BN buffers stay float32.
    G = _generator(32, attention_every_block=True)
    D = Discriminator(32, TEXT_DIM, width=WIDTH)
    sentence, words, word_mask = _text(batch=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        images = G(torch.randn(2, Z_DIM), sentence, words, word_mask)
        out = D(torch.cat([images, images]), sentence)
    assert images.dtype == torch.bfloat16 and out.logits.dtype == torch.bfloat16
    (out.logits.float().mean() + out.regions.float().mean()).backward()
    assert G.stem.weight.grad is not None and torch.isfinite(G.stem.weight.grad).all()


# ---------------------------------------------------------------- bad input
def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="resolution"):
        Generator(48, TEXT_DIM)
    with pytest.raises(ValueError, match="resolution"):
        Discriminator(512, TEXT_DIM)
    with pytest.raises(ValueError, match="width"):
        Discriminator(32, TEXT_DIM, width=0)
    G, D = _generator(32), Discriminator(32, TEXT_DIM, width=WIDTH)
    sentence, words, word_mask = _text(batch=2)
    z = torch.randn(2, Z_DIM)
    with pytest.raises(ValueError, match="z must have shape"):
        G(torch.randn(2, Z_DIM + 1), sentence, words, word_mask)
    with pytest.raises(ValueError, match="sentence must have shape"):
        G(z, sentence[:1], words, word_mask)
    with pytest.raises(ValueError, match="words must have shape"):
        G(z, sentence, words[..., :-1], word_mask)
    with pytest.raises(TypeError, match="word_mask must be a bool"):
        G(z, sentence, words, word_mask.long())
    with pytest.raises(ValueError, match="images must have shape"):
        D(torch.rand(2, 3, 64, 64), sentence)
    with pytest.raises(ValueError, match="multiple of the sentence count"):
        D(torch.rand(3, 3, 32, 32), sentence)
