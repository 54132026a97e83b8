"""Distillation losses on tensors small enough to check by hand."""

from __future__ import annotations

import math

import pytest
import torch

from surgery.distill import losses as L
from surgery.errors import UserError


def logits_of(*probs: list[float]) -> torch.Tensor:
    """(1, S, V) logits whose softmax is the given distributions (one per position)."""
    return torch.tensor([probs], dtype=torch.float64).log().float()


def rand_logits(seed: int, shape=(2, 5, 7)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2


# ---------------------------------------------------------------- logit losses


def test_kl_of_identical_distributions_is_zero():
    z = rand_logits(0)
    assert L.kl(z, z.clone(), temperature=1.0).item() == pytest.approx(0.0, abs=1e-6)
    assert L.kl(z, z.clone(), temperature=3.0).item() == pytest.approx(0.0, abs=1e-5)


def test_kl_matches_the_hand_computed_value():
    teacher = logits_of([0.5, 0.5])
    student = logits_of([0.25, 0.75])
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert L.kl(student, teacher).item() == pytest.approx(expected, rel=1e-5)
    # and the reverse direction is KL(student || teacher)
    expected_r = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert L.rkl(student, teacher).item() == pytest.approx(expected_r, rel=1e-5)


def test_kl_is_scaled_by_t_squared():
    s, t = rand_logits(1), rand_logits(2)
    soft = L.kl(s / 2.0, t / 2.0, temperature=1.0)  # the same softened distributions, unscaled
    assert L.kl(s, t, temperature=2.0).item() == pytest.approx(4.0 * soft.item(), rel=1e-5)
    assert L.rkl(s, t, temperature=2.0).item() == pytest.approx(4.0 * L.rkl(s / 2, t / 2).item(), rel=1e-5)
    assert L.jsd(s, t, temperature=2.0).item() == pytest.approx(4.0 * L.jsd(s / 2, t / 2).item(), rel=1e-5)


def test_kl_gradient_is_t_times_student_minus_teacher_probs():
    """d/dz_s of T^2 KL(p_t || softmax(z_s / T)) = T (q_s - p_t) / (number of positions)."""
    s = rand_logits(3, (1, 1, 5)).requires_grad_()
    t = rand_logits(4, (1, 1, 5))
    T = 2.5
    L.kl(s, t, temperature=T).backward()
    expected = T * (torch.softmax(s.detach() / T, -1) - torch.softmax(t / T, -1))
    torch.testing.assert_close(s.grad, expected, rtol=1e-4, atol=1e-6)


def test_top_k_truncation_keeps_the_k_largest():
    z = torch.tensor([[[3.0, 0.0, 2.0, 1.0]]])
    out = L.truncate_top_k(z, 2)
    assert out[0, 0, 0].item() == 3.0 and out[0, 0, 2].item() == 2.0
    assert torch.isinf(out[0, 0, 1]) and torch.isinf(out[0, 0, 3])
    assert L.truncate_top_k(z, None) is z and L.truncate_top_k(z, 4) is z


def test_kl_with_top_k_uses_the_renormalised_teacher():
    teacher = torch.tensor([[[3.0, 0.0, 2.0, 1.0]]])
    student = torch.tensor([[[0.5, 0.1, -0.3, 0.2]]])
    p = torch.softmax(torch.tensor([3.0, 2.0]), -1)  # teacher over tokens 0 and 2 only
    q = torch.log_softmax(student[0, 0], -1)
    expected = p[0] * (p[0].log() - q[0]) + p[1] * (p[1].log() - q[2])
    assert L.kl(student, teacher, top_k=2).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("fn", [L.kl, L.rkl, L.jsd])
def test_top_k_losses_have_finite_values_and_gradients(fn):
    s = rand_logits(5).requires_grad_()
    t = rand_logits(6)
    loss = fn(s, t, temperature=2.0, top_k=3)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() >= 0
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_rkl_with_top_k_restricts_the_student_to_the_teacher_support():
    teacher = torch.tensor([[[3.0, 0.0, 2.0, 1.0]]])
    student = torch.tensor([[[1.0, 5.0, 1.0, 5.0]]])  # large mass outside the top 2 is ignored
    p = torch.softmax(torch.tensor([3.0, 2.0]), -1)
    q = torch.softmax(torch.tensor([1.0, 1.0]), -1)
    expected = (q * (q.log() - p.log())).sum()
    assert L.rkl(student, teacher, top_k=2).item() == pytest.approx(expected.item(), rel=1e-5)


def test_jsd_zero_for_identical_and_ln2_for_disjoint():
    z = rand_logits(7)
    assert L.jsd(z, z.clone()).item() == pytest.approx(0.0, abs=1e-6)
    a = torch.tensor([[[30.0, 0.0]]])
    b = torch.tensor([[[0.0, 30.0]]])
    assert L.jsd(a, b, beta=0.5).item() == pytest.approx(math.log(2), rel=1e-4)


def test_jsd_beta_swaps_roles():
    s, t = rand_logits(8), rand_logits(9)
    assert L.jsd(s, t, beta=0.2).item() == pytest.approx(L.jsd(t, s, beta=0.8).item(), rel=1e-5)
    assert L.jsd(s, t, beta=0.2).item() != pytest.approx(L.jsd(s, t, beta=0.8).item(), rel=1e-3)
    with pytest.raises(ValueError, match="beta"):
        L.jsd(s, t, beta=1.5)


def test_jsd_ends_are_forward_and_reverse_kl_as_in_trl():
    """GKD / TRL's generalized_jsd_loss: beta = 0 is KL(teacher || student), beta = 1 is KL(student || teacher)."""
    s, t = rand_logits(12), rand_logits(13)
    assert L.jsd(s, t, beta=0.0).item() == pytest.approx(L.kl(s, t).item(), rel=1e-6)
    assert L.jsd(s, t, beta=1.0).item() == pytest.approx(L.rkl(s, t).item(), rel=1e-6)
    assert L.jsd(s, t, beta=0.0, temperature=2.0, top_k=3).item() == pytest.approx(
        L.kl(s, t, temperature=2.0, top_k=3).item(), rel=1e-6)


def trl_generalized_jsd(student_logits, teacher_logits, beta):
    """TRL's definition written independently with F.kl_div (kl_div(input=log q, target=log p) = KL(p || q)):
    mixture m = beta p_t + (1 - beta) p_s, beta KL(p_t || m) + (1 - beta) KL(p_s || m), summed over the vocabulary,
    averaged over positions."""
    import torch.nn.functional as F

    log_s = F.log_softmax(student_logits, -1)
    log_t = F.log_softmax(teacher_logits, -1)
    log_m = torch.log(beta * log_t.exp() + (1 - beta) * log_s.exp())
    kl_t = F.kl_div(log_m, log_t, reduction="none", log_target=True).sum(-1)
    kl_s = F.kl_div(log_m, log_s, reduction="none", log_target=True).sum(-1)
    return (beta * kl_t + (1 - beta) * kl_s).mean()


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_matches_trl_and_a_hand_computed_value(beta):
    s, t = rand_logits(14).double(), rand_logits(15).double()
    assert L.jsd(s, t, beta=beta).item() == pytest.approx(trl_generalized_jsd(s, t, beta).item(), rel=1e-5)
    # by hand: p_t = (0.5, 0.5), p_s = (0.25, 0.75); m = beta p_t + (1 - beta) p_s
    pt, ps = (0.5, 0.5), (0.25, 0.75)
    m = [beta * a + (1 - beta) * b for a, b in zip(pt, ps)]
    expected = beta * sum(a * math.log(a / c) for a, c in zip(pt, m)) \
        + (1 - beta) * sum(b * math.log(b / c) for b, c in zip(ps, m))
    assert L.jsd(logits_of(ps), logits_of(pt), beta=beta).item() == pytest.approx(expected, rel=1e-5)


def test_uld_compares_sorted_probabilities_across_vocabularies():
    """ULD: |sorted p_s - sorted p_t| summed, the shorter vector zero-padded; token identity does not matter."""
    student = torch.tensor([[0.1, 0.7, 0.2]]).log()  # sorted: 0.7, 0.2, 0.1
    teacher = torch.tensor([[0.5, 0.1, 0.3, 0.1]]).log()  # sorted: 0.5, 0.3, 0.1, 0.1
    expected = abs(0.7 - 0.5) + abs(0.2 - 0.3) + abs(0.1 - 0.1) + abs(0.0 - 0.1)
    assert L.uld(student, teacher).item() == pytest.approx(expected, rel=1e-5)
    permuted = teacher[:, [3, 2, 1, 0]]
    assert L.uld(student, permuted).item() == pytest.approx(expected, rel=1e-5)
    assert L.uld(teacher, permuted).item() == pytest.approx(0.0, abs=1e-7)
    z = rand_logits(16, (6, 9)).requires_grad_()
    loss = L.uld(z, rand_logits(17, (6, 5)), temperature=2.0)
    loss.backward()
    assert torch.isfinite(loss) and z.grad.abs().sum() > 0
    assert L.uld(z[:0], rand_logits(17, (0, 5))).item() == 0.0  # no aligned position: no signal


def test_mask_ignores_positions():
    s, t = rand_logits(10, (1, 4, 6)), rand_logits(11, (1, 4, 6))
    mask = torch.tensor([[True, False, True, False]])
    expected = L.kl(s[:, [0, 2]], t[:, [0, 2]])
    assert L.kl(s, t, mask=mask).item() == pytest.approx(expected.item(), rel=1e-5)


# ---------------------------------------------------------------- cross-entropy


def test_ce_of_uniform_logits_is_log_vocab():
    ids = torch.tensor([[1, 2, 3, 0]])
    assert L.ce(torch.zeros(1, 4, 10), ids).item() == pytest.approx(math.log(10), rel=1e-6)


def test_ce_predicts_the_next_token():
    # position 0 gives token 1 probability 0.75, position 1 gives token 2 probability 0.5; position 2 has no target
    ids = torch.tensor([[0, 1, 2]])
    probs = [[0.125, 0.75, 0.125], [0.25, 0.25, 0.5], [1 / 3, 1 / 3, 1 / 3]]
    expected = (-math.log(0.75) - math.log(0.5)) / 2
    assert L.ce(logits_of(*probs), ids).item() == pytest.approx(expected, rel=1e-5)
    # the mask is over input positions: masking position 1 drops its token as a target (predicted by position 0)
    mask = torch.tensor([[True, False, True]])
    assert L.ce(logits_of(*probs), ids, mask=mask).item() == pytest.approx(-math.log(0.5), rel=1e-5)


# ---------------------------------------------------------------- hidden states


def test_hidden_cos_known_values():
    h = torch.randn(2, 3, 8)
    assert L.hidden_cos(h, h.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert L.hidden_cos(3.0 * h, h).item() == pytest.approx(0.0, abs=1e-6)  # scale does not matter
    assert L.hidden_cos(-h, h).item() == pytest.approx(2.0, abs=1e-6)
    e0, e1 = torch.zeros(1, 1, 4), torch.zeros(1, 1, 4)
    e0[..., 0], e1[..., 1] = 1.0, 1.0
    assert L.hidden_cos(e0, e1).item() == pytest.approx(1.0, abs=1e-6)


def test_hidden_l2_is_mean_squared_error():
    h = torch.randn(2, 3, 8)
    assert L.hidden_l2(h, h.clone()).item() == 0.0
    assert L.hidden_l2(h + 1.0, h).item() == pytest.approx(1.0, rel=1e-6)
    assert L.hidden_l2(h + 2.0, h).item() == pytest.approx(4.0, rel=1e-6)


def test_hidden_losses_refuse_different_widths():
    with pytest.raises(ValueError, match="projection"):
        L.hidden_cos(torch.zeros(1, 2, 4), torch.zeros(1, 2, 8))


def test_default_layer_map_is_evenly_spaced():
    assert L.default_layer_map(3, 6) == {0: 1, 1: 3, 2: 5}  # every 2nd teacher block
    assert L.default_layer_map(4, 4) == {0: 0, 1: 1, 2: 2, 3: 3}
    assert L.default_layer_map(2, 3) == {0: 0, 1: 2}  # last always on last
    assert L.default_layer_map(4, 2) == {0: 0, 1: 0, 2: 0, 3: 1}


def test_layer_map_naming_a_missing_layer_is_refused():
    assert L.check_layer_map({1: 5, 0: 2}, 3, 6) == [(0, 2), (1, 5)]
    with pytest.raises(UserError, match="teacher layer 6 but the teacher has 6 layers"):
        L.check_layer_map({0: 6}, 3, 6)
    with pytest.raises(UserError, match="student layer 3 but the student has 3 layers"):
        L.check_layer_map({3: 1}, 3, 6)
    with pytest.raises(UserError, match="empty"):
        L.check_layer_map({}, 3, 6)


def test_projection_shapes_identity_init_and_gradient():
    proj = L.HiddenProjection([0, 2], student_width=4, teacher_width=6)
    h = torch.randn(2, 3, 4)
    out = proj(2, h)
    assert out.shape == (2, 3, 6)
    torch.testing.assert_close(out[..., :4], h)  # rectangular identity: first 4 features copied, rest zero
    assert out[..., 4:].abs().sum() == 0
    square = L.HiddenProjection([0], 4, 4)
    torch.testing.assert_close(square(0, h), h)

    teacher = {1: torch.randn(2, 3, 6), 5: torch.randn(2, 3, 6)}
    student = {0: torch.randn(2, 3, 4, requires_grad=True), 2: torch.randn(2, 3, 4, requires_grad=True)}
    loss = L.hidden_loss("hidden-l2", student, teacher, [(0, 1), (2, 5)], projection=proj)
    loss.backward()
    assert proj.maps["0"].weight.grad.shape == (6, 4) and proj.maps["0"].weight.grad.abs().sum() > 0
    expected = (L.hidden_l2(proj(0, student[0]), teacher[1]) + L.hidden_l2(proj(2, student[2]), teacher[5])) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_weighted_total():
    terms = {"kl": torch.tensor(2.0), "ce": torch.tensor(3.0)}
    assert L.weighted_total(terms, {"kl": 1.0, "ce": 0.1}).item() == pytest.approx(2.3)


def test_fused_kl_matches_the_autograd_reference_with_a_mask():
    s = rand_logits(12, (2, 4, 9)).requires_grad_()
    t = rand_logits(13, (2, 4, 9))
    mask = torch.tensor([[True, True, False, True], [False, True, True, True]])
    loss = L.kl(s, t, temperature=1.7, mask=mask)
    loss.backward()
    ref_s = s.detach().clone().requires_grad_()
    per = L._kl_terms_exact(torch.log_softmax(t / 1.7, -1), torch.log_softmax(ref_s / 1.7, -1))
    ref = (per * mask).sum() / mask.sum() * 1.7**2
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(s.grad, ref_s.grad, rtol=1e-4, atol=1e-7)


def test_kl_with_a_teacher_that_masks_tokens_with_minus_inf():
    teacher = torch.tensor([[[float("-inf"), 0.0, 0.0]]])
    student = torch.tensor([[[1.0, 0.0, 0.0]]], requires_grad=True)
    q = torch.softmax(student.detach()[0, 0], -1)
    expected = 0.5 * (math.log(0.5) - q[1].log()) + 0.5 * (math.log(0.5) - q[2].log())
    loss = L.kl(student, teacher)
    loss.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.isfinite(student.grad).all()
