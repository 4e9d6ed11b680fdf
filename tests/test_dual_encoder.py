"""fastxmc.models.dual_encoder: shapes, masking, batch independence, checkpoints, and learning."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from fastxmc.eval.metrics import r_precision
from fastxmc.losses import info_nce, region_word_loss
from fastxmc.models.dual_encoder import DualEncoder, DualEncoderConfig

SMALL = DualEncoderConfig(resolution=32, text_dim=12, embed_dim=16, width=8, region_size=16)


def _text(b, t=6, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    words = torch.randn(b, t, d, generator=g)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None] < lengths[:, None]
    return words.mean(1), words, mask


@pytest.mark.parametrize("resolution,region_size,regions", [(32, 16, 256), (64, 8, 64), (16, 4, 16)])
def test_image_encoder_shapes(resolution, region_size, regions):
    cfg = dataclasses.replace(SMALL, resolution=resolution, region_size=region_size)
    enc = DualEncoder(cfg).encode_image(torch.rand(3, 3, resolution, resolution))
    assert enc.regions.shape == (3, regions, 16)
    assert enc.global_feature.shape == (3, 16)
    assert enc.pooled.shape == (3, DualEncoder(cfg).image_encoder.pooled_dim)


@pytest.mark.parametrize("layers", [0, 2])
def test_text_encoder_shapes_and_padding(layers):
    model = DualEncoder(dataclasses.replace(SMALL, text_layers=layers)).eval()
    sentence, words, mask = _text(5)
    out = model.encode_text(sentence, words, mask)
    assert out.words.shape == (5, 6, 16) and out.sentence.shape == (5, 16)
    assert (out.words[~mask] == 0).all()
    # Values at padded positions never matter.
    noisy = torch.where(mask[..., None], words, torch.randn_like(words) * 100)
    again = model.encode_text(sentence, noisy, mask)
    torch.testing.assert_close(again.words, out.words)
    torch.testing.assert_close(again.sentence, out.sentence)


@pytest.mark.parametrize("layers", [0, 1])
def test_encodings_do_not_depend_on_the_batch(layers):
    model = DualEncoder(dataclasses.replace(SMALL, text_layers=layers)).train()
    images = torch.rand(4, 3, 32, 32)
    sentence, words, mask = _text(4)
    whole = model(images, sentence, words, mask)
    for i in range(4):
        one = model(images[i:i + 1], sentence[i:i + 1], words[i:i + 1], mask[i:i + 1])
        close = dict(atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(one[0].global_feature, whole[0].global_feature[i:i + 1], **close)
        torch.testing.assert_close(one[0].regions, whole[0].regions[i:i + 1], **close)
        torch.testing.assert_close(one[1].sentence, whole[1].sentence[i:i + 1], **close)


def test_similarity_is_the_cosine_of_the_encodings():
    model = DualEncoder(SMALL).eval()
    images = torch.rand(3, 3, 32, 32)
    sentence, words, mask = _text(5)
    sim = model.similarity(images, sentence, words, mask)
    image = model.encode_image(images).global_feature
    text = model.encode_text(sentence, words, mask).sentence
    expected = torch.stack([torch.stack([F.cosine_similarity(a, b, dim=0) for b in text])
                            for a in image])
    assert sim.shape == (3, 5)
    torch.testing.assert_close(sim, expected, atol=1e-6, rtol=1e-5)


def test_save_and_load_round_trip(tmp_path):
    model = DualEncoder(dataclasses.replace(SMALL, text_layers=1)).eval()
    path = model.save(tmp_path / "sub" / "dual.pt")
    back = DualEncoder.load(path)
    assert back.config == model.config and not back.training
    images, (sentence, words, mask) = torch.rand(2, 3, 32, 32), _text(2)
    torch.testing.assert_close(back.similarity(images, sentence, words, mask),
                               model.similarity(images, sentence, words, mask))
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        DualEncoder.load(tmp_path / "nothing.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt"):
        DualEncoder.load(tmp_path / "other.pt")


def test_input_validation():
    model = DualEncoder(SMALL)
    with pytest.raises(ValueError, match="images"):
        model.encode_image(torch.rand(2, 3, 64, 64))
    sentence, words, mask = _text(2)
    with pytest.raises(ValueError, match="word_mask"):
        model.encode_text(sentence, words, mask.float())
    with pytest.raises(ValueError, match="at least one real token"):
        model.encode_text(sentence, words, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="sentence"):
        model.encode_text(sentence[:1], words, mask)
    with pytest.raises(ValueError, match="max_tokens"):
        short = DualEncoder(dataclasses.replace(SMALL, text_layers=1, max_tokens=4))
        short.encode_text(sentence, words, mask)
    with pytest.raises(ValueError, match="region_size"):
        DualEncoderConfig(resolution=48, region_size=16)
    with pytest.raises(ValueError, match="region_size"):
        DualEncoderConfig(resolution=64, region_size=32)
    with pytest.raises(ValueError, match="text_heads"):
        DualEncoderConfig(embed_dim=30, text_heads=4, text_layers=1)


def _toy_batch(labels, generator):
    """Class c: a bright square in cell c of a 3x3 grid; caption: class word vector + noise."""
    b = labels.numel()
    images = torch.rand(b, 3, 16, 16, generator=generator) * 0.3
    colours = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1],
                            [1, 1, 1], [1, .5, 0], [.5, 0, 1]], dtype=torch.float32)
    for i, c in enumerate(labels.tolist()):
        r, q = divmod(c, 3)
        images[i, :, 1 + 5 * r:5 + 5 * r, 1 + 5 * q:5 + 5 * q] = colours[c][:, None, None]
    vocab = torch.randn(9, 12, generator=torch.Generator().manual_seed(99))
    words = vocab[labels][:, None, :].repeat(1, 4, 1) + 0.3 * torch.randn(b, 4, 12, generator=generator)
    mask = torch.ones(b, 4, dtype=torch.bool)
    mask[:, 3] = False
    return images, words.mean(1), words, mask


@pytest.fixture
def one_thread():
    # On the shared 2-core machines two intra-op threads made this small training ~15x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_few_steps_of_contrastive_training_align_the_towers(one_thread):
    torch.manual_seed(0)
    model = DualEncoder(dataclasses.replace(SMALL, resolution=16, region_size=4))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        images, sentence, words, mask = _toy_batch(torch.randint(0, 9, (24,), generator=g), g)
        img, txt = model(images, sentence, words, mask)
        loss = 2 * info_nce(img.global_feature, txt.sentence, 0.1, impl="reference") + \
            region_word_loss(img.regions, txt.words, mask, impl="reference")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.6 * sum(losses[:5])
    labels = torch.randint(0, 9, (300,), generator=g)
    images, sentence, words, mask = _toy_batch(labels, g)
    model.eval()
    with torch.no_grad():
        img, txt = model(images, sentence, words, mask)
    # Mismatched captions from other classes only: a trained encoder ranks the true one first.
    result = r_precision(img.global_feature, txt.sentence, groups=labels, num_mismatched=8, folds=3)
    assert result["mean"] > 0.9
