"""Loss values against numbers computed by hand (the arithmetic is in the comments)."""

import math

import pytest
import torch

from ad2_ds.losses import attention_kl, attention_mse, hard_loss, hidden_mse, kd_loss, patient_loss

LN3 = math.log(3.0)


def test_kd_loss_hand_value_t1():
    # p_t = softmax([ln3, 0]) = [3/4, 1/4], p_s = [1/2, 1/2]
    # KL = 3/4 ln(3/2) + 1/4 ln(1/2)
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    got = kd_loss(torch.tensor([[0.0, 0.0]]), torch.tensor([[LN3, 0.0]]), temperature=1.0)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.130812, abs=1e-6)


def test_kd_loss_temperature_squared_and_batchmean():
    # t = 2: p_t = softmax([ln3/2, 0]) = [√3/(√3+1), 1/(√3+1)]; KL times t² = 4
    a = math.sqrt(3) / (math.sqrt(3) + 1)
    kl = a * math.log(a / 0.5) + (1 - a) * math.log((1 - a) / 0.5)
    # a second row where student == teacher adds 0 KL but counts in the batch mean
    logits_s = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    logits_t = torch.tensor([[LN3, 0.0], [1.0, -1.0]])
    got = kd_loss(logits_s, logits_t, temperature=2.0)
    assert got.item() == pytest.approx(4 * kl / 2, rel=1e-5)


def test_kd_loss_zero_when_equal_and_shape_error():
    x = torch.randn(3, 4)
    assert kd_loss(x, x.clone(), 3.0).abs().item() < 1e-6
    with pytest.raises(ValueError, match="differ"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 2))


def test_kd_loss_accepts_half_precision_teacher():
    s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[LN3, 0.0]], dtype=torch.bfloat16)
    assert kd_loss(s, t).dtype == torch.float32


def test_regression_branch():
    # one output column: squared error, no temperature
    pred_s, pred_t = torch.tensor([[1.0], [3.0]]), torch.tensor([[2.0], [1.0]])
    assert kd_loss(pred_s, pred_t, temperature=5.0).item() == pytest.approx((1 + 4) / 2)
    assert hard_loss(pred_s, torch.tensor([1.0, 1.0])).item() == pytest.approx((0 + 4) / 2)


def test_hard_loss_classification():
    # CE of [ln3, 0] with label 0 = -ln(3/4)
    assert hard_loss(torch.tensor([[LN3, 0.0]]), torch.tensor([0])).item() == pytest.approx(-math.log(0.75), rel=1e-6)


def test_hidden_mse_ignores_padding():
    h_s = torch.zeros(1, 3, 2)
    h_t = torch.tensor([[[1.0, 1.0], [2.0, 0.0], [100.0, 100.0]]])  # last token is padding
    mask = torch.tensor([[1, 1, 0]])
    # valid squared errors: 1+1 + 4+0 = 6 over 2 tokens x 2 dims
    assert hidden_mse(h_s, h_t, mask).item() == pytest.approx(6 / 4)


def test_attention_kl_hand_value_and_masking():
    # one head, T=2, second position padded: only query row 0 counts
    attn_t = torch.tensor([[[[0.75, 0.25], [0.1, 0.9]]]])
    attn_s = torch.tensor([[[[0.5, 0.5], [0.9, 0.1]]]])
    mask = torch.tensor([[1, 0]])
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert attention_kl(attn_s, attn_t, mask).item() == pytest.approx(expected, rel=1e-5)
    assert attention_kl(attn_t, attn_t, torch.ones(1, 2)).abs().item() < 1e-7


def test_attention_mse_masks_pairs():
    attn_t = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    attn_s = torch.tensor([[[[0.5, 0.5], [1.0, 0.0]]]])
    mask = torch.tensor([[1, 0]])
    # only the (0,0) pair counts: (1 - 0.5)^2 = 0.25
    assert attention_mse(attn_s, attn_t, mask).item() == pytest.approx(0.25)


def test_patient_loss_normalises():
    # orthogonal unit directions are √2 apart; scale does not matter
    assert patient_loss(torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 0.5]])).item() == pytest.approx(2.0)
    assert patient_loss(torch.tensor([[2.0, 2.0]]), torch.tensor([[1.0, 1.0]])).item() == pytest.approx(0.0, abs=1e-7)
