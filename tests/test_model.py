"""The model pieces and the evaluation protocol, on tensors and arrays with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from histmol.errors import ConfigError
from histmol.model.clip import HistMolCLIP, ModelConfig, info_nce, masked_mse, normalise_expression
from histmol.model.encoders import ExpressionEncoder, image_encoder
from histmol.model.evaluate import _pearson, ridge_fold, score_fold


def test_normalise_expression_is_log1p_cp10k_over_measured_genes() -> None:
    counts = torch.tensor([[1.0, 3.0, 50.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    out = normalise_expression(counts, mask)
    expected = [math.log1p(2500.0), math.log1p(7500.0), 0.0]  # gene 2 unmeasured: not in total
    torch.testing.assert_close(out[0], torch.tensor(expected))
    assert out[1].tolist() == [0.0, 0.0, 0.0]  # no counts: zeros, no NaN


def test_masked_mse_ignores_unmeasured_genes() -> None:
    target = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.tensor([[True, False], [True, True]])
    pred = torch.tensor([[2.0, 100.0], [3.0, 6.0]])
    assert masked_mse(pred, target, mask).item() == pytest.approx((1 + 0 + 4) / 3)
    pred[0, 1] = -1e6  # an unmeasured entry cannot change the loss
    assert masked_mse(pred, target, mask).item() == pytest.approx(5 / 3)
    assert masked_mse(pred, target, torch.zeros_like(mask)).item() == 0.0


def test_info_nce_matches_its_definition_and_is_symmetric() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(5, 4, generator=g), dim=1)
    b = torch.nn.functional.normalize(torch.randn(5, 4, generator=g), dim=1)
    scale = torch.tensor(3.0)
    logits = 3.0 * a @ b.T
    manual = 0.0
    for i in range(5):
        manual -= (logits[i, i] - torch.logsumexp(logits[i], 0)) / 10
        manual -= (logits[i, i] - torch.logsumexp(logits[:, i], 0)) / 10
    torch.testing.assert_close(info_nce(a, b, scale), manual)
    torch.testing.assert_close(info_nce(a, b, scale), info_nce(b, a, scale))
    assert info_nce(a, a, torch.tensor(1000.0)).item() < 1e-6  # aligned pairs, sharp: zero loss


@pytest.mark.parametrize(("name", "dim"), [("vit-tiny", 64), ("resnet18", 256)])
def test_image_encoders_map_patches_to_features(name: str, dim: int) -> None:
    encoder = image_encoder(name, 32, width=32)
    assert encoder(torch.rand(2, 3, 32, 32)).shape == (2, dim)


def test_bad_encoder_names_are_refused() -> None:
    with pytest.raises(ConfigError, match="'vit-tiny', 'resnet18'"):
        image_encoder("vgg", 32)
    with pytest.raises(ConfigError, match="divisible by 8"):
        image_encoder("vit-tiny", 36)
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="needs timm"):
            image_encoder("timm:resnet18", 32)


def test_expression_encoder_reads_unmeasured_genes_as_unknown() -> None:
    torch.manual_seed(0)
    encoder = ExpressionEncoder(3, 8)
    mask = torch.tensor([[True, False, True]])
    x = torch.tensor([[1.0, 5.0, 2.0]])
    y = torch.tensor([[1.0, -9.0, 2.0]])
    torch.testing.assert_close(encoder(x, mask), encoder(y, mask))
    assert not torch.allclose(encoder(x, mask), encoder(x, torch.ones_like(mask)))


def test_model_forward_gives_unit_embeddings_and_finite_losses() -> None:
    torch.manual_seed(0)
    model = HistMolCLIP(ModelConfig(n_genes=6, patch_px=16, width=16, embed_dim=8))
    mask = torch.ones(4, 6, dtype=torch.bool)
    out = model(torch.rand(4, 3, 16, 16), torch.randint(0, 5, (4, 6)), mask)
    torch.testing.assert_close(out["z_image"].norm(dim=1), torch.ones(4))
    torch.testing.assert_close(out["z_expression"].norm(dim=1), torch.ones(4))
    assert math.isfinite(out["contrastive"].item()) and math.isfinite(out["prediction"].item())


def test_pearson_matches_numpy_and_is_nan_for_constants() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(30, 3)), rng.normal(size=(30, 3))
    b[:, 2] = 1.0
    r = _pearson(a, b)
    for j in range(2):
        assert r[j] == pytest.approx(np.corrcoef(a[:, j], b[:, j])[0, 1])
    assert np.isnan(r[2])


def test_ridge_probe_recovers_a_linear_map_on_held_out_groups() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 20))
    y = x[:, :4] @ rng.normal(size=(4, 5)) + 3.0
    test = np.repeat([False, False, True], 100)
    mask = np.ones_like(y, dtype=bool)
    ridge = score_fold(x, y, mask, ~test, test)
    mean = score_fold(None, y, mask, ~test, test)
    assert (ridge["pearson"] > 0.99).all() and (mean["pearson"] == 0.0).all()
    assert ridge["mse_all"] < 0.01 * mean["mse_all"]
    np.testing.assert_allclose(mean["mse"], ((y[test] - y[~test].mean(0)) ** 2).mean(0))
    pred = ridge_fold(x[:200], y[:200], x[200:])
    np.testing.assert_allclose(pred.mean(0), y[200:].mean(0), atol=0.1)  # the mean is kept


def test_score_fold_needs_both_sides_and_skips_unmeasured_genes() -> None:
    x, y = np.ones((4, 2)), np.ones((4, 2))
    with pytest.raises(ConfigError, match="both sides"):
        score_fold(x, y, np.ones_like(y, dtype=bool), np.ones(4, bool), np.zeros(4, bool))
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(40, 3)), rng.normal(size=(40, 2))
    mask = np.ones_like(y, dtype=bool)
    mask[20:, 1] = False  # the test half never measured gene 1
    test = np.arange(40) >= 20
    result = score_fold(x, y, mask, ~test, test)
    assert np.isnan(result["pearson"][1]) and np.isfinite(result["pearson"][0])
    assert np.isnan(result["mse"][1]) and np.isfinite(result["mse"][0])
