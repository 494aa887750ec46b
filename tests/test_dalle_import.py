"""DALL-E dVAE encoder import: our re-implementation gives exactly the original's tokens.

Needs the ``dall_e`` package only for the test (skipped without it). Install it without its
torchvision dependency: ``pip install --no-deps dall-e==0.1 attrs requests urllib3 idna
charset-normalizer certifi``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vimpac.tokenize.dalle import dalle_key_to_ours, import_dalle
from vimpac.tokenize.tokenizer import encode_frames, load_tokenizer


def frames(n: int = 3, size: int = 64, seed: int = 0) -> torch.Tensor:
    """uint8 [n,size,size,3]: smooth random images (blurred noise) so the logits are not flat."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size // 8, size // 8, generator=g)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear")
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def reference_tokens(encoder: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    from dall_e import map_pixels

    x = map_pixels(pixels.permute(0, 3, 1, 2).float() / 255.0)
    with torch.no_grad():
        return encoder(x).argmax(dim=1)


def pickled_encoder(tmp_path, **kwargs) -> tuple[torch.nn.Module, str]:
    dall_e = pytest.importorskip("dall_e")
    torch.manual_seed(0)
    encoder = dall_e.Encoder(**kwargs)
    path = tmp_path / "encoder.pkl"
    torch.save(encoder, path)  # the whole module, like OpenAI's encoder.pkl
    return encoder, str(path)


def test_import_matches_original_tokens_exactly(tmp_path):
    encoder, path = pickled_encoder(tmp_path, n_hid=64, n_blk_per_group=1, vocab_size=1024)
    model = import_dalle(path, tmp_path / "tok")
    assert model.config.kind == "dalle" and model.codebook_size == 1024
    assert model.config.channels == 64 and model.config.blocks_per_group == 1
    pixels = frames()
    expected = reference_tokens(encoder, pixels)
    assert expected.shape == (3, 8, 8) and len(expected.unique()) > 1
    assert torch.equal(model.encode(pixels), expected)
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.fingerprint() == model.fingerprint()
    np.testing.assert_array_equal(encode_frames(loaded, pixels.numpy(), batch_size=2),
                                  expected.numpy().astype(np.uint16))


def test_dalle_kind_has_no_decoder(tmp_path):
    _, path = pickled_encoder(tmp_path, n_hid=64, n_blk_per_group=1, vocab_size=512)
    model = import_dalle(path, tmp_path / "tok")
    with pytest.raises(NotImplementedError, match="no decoder"):
        model.decode(torch.zeros(1, 2, 2, dtype=torch.long))


def test_import_refuses_non_encoder(tmp_path):
    path = tmp_path / "not_encoder.pkl"
    torch.save({"w": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not_encoder.pkl"):
        import_dalle(path, tmp_path / "tok")


def test_key_mapping():
    assert dalle_key_to_ours("blocks.input.w") == "stem.weight"
    assert dalle_key_to_ours("blocks.group_2.block_1.id_path.b") == "groups.1.0.skip.bias"
    assert dalle_key_to_ours("blocks.group_4.block_2.res_path.conv_3.w") == \
        "groups.3.1.conv3.weight"
    assert dalle_key_to_ours("blocks.output.conv.b") == "head.bias"
    with pytest.raises(KeyError, match="blocks.extra"):
        dalle_key_to_ours("blocks.extra.w")


@pytest.mark.slow
def test_import_full_size_encoder(tmp_path):
    encoder, path = pickled_encoder(tmp_path)  # 53.8M parameters, 8192 codes
    model = import_dalle(path, tmp_path / "tok")
    assert model.codebook_size == 8192 and model.config.channels == 256
    pixels = frames(2)
    assert torch.equal(model.encode(pixels), reference_tokens(encoder, pixels))
