"""DPO, KTO and reward-model losses and metrics equal the formulas written out by hand here (upstream
gpt-neox's forward_step) on known log-probabilities and scores; the model's summed log-probabilities equal a
log-softmax of its full logits; with the policy equal to the reference the DPO loss is ln 2 and every reward 0."""

import math

import pytest
import torch

from conftest import tiny_keys
from neox_fork.config.loading import from_dict
from neox_fork.errors import UserError
from neox_fork.model.transformer import build_model
from neox_fork.training.preference import Objective, dpo_loss, kto_loss, make_reference, rm_loss

TOL = 1e-6  # float32 arithmetic on numbers of size ~10: a few ulps


def logsig(x):
    return -math.log1p(math.exp(-x))


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_dpo_loss_and_metrics_by_hand():
    pi_c, pi_r, ref_c, ref_r, beta = [-3.0, -10.0], [-5.0, -4.0], [-4.0, -9.0], [-4.5, -6.0], 0.5
    loss, m = dpo_loss(*map(torch.tensor, (pi_c, pi_r, ref_c, ref_r)), beta)
    logits = [(pi_c[i] - pi_r[i]) - (ref_c[i] - ref_r[i]) for i in range(2)]  # 1.5, -3.0
    assert loss.item() == pytest.approx(-(logsig(beta * logits[0]) + logsig(beta * logits[1])) / 2, abs=TOL)
    chosen = [beta * (pi_c[i] - ref_c[i]) for i in range(2)]  # 0.5, -0.5
    rejected = [beta * (pi_r[i] - ref_r[i]) for i in range(2)]  # -0.25, 1.0
    assert m["chosen_rewards"].item() == pytest.approx(sum(chosen) / 2)
    assert m["rejected_rewards"].item() == pytest.approx(sum(rejected) / 2)
    assert m["reward_acc"].item() == 0.5  # pair 0 prefers chosen, pair 1 does not
    assert m["margins"].item() == pytest.approx((chosen[0] - rejected[0] + chosen[1] - rejected[1]) / 2)
    assert m["chosen_pos"].item() == pytest.approx(-6.5) and m["chosen_neg"].item() == pytest.approx(-4.5)
    assert m["ref_pos"].item() == pytest.approx(-6.5) and m["ref_neg"].item() == pytest.approx(-5.25)


def test_dpo_reference_free_objective():
    pi_c, pi_r, beta = [-3.0, -10.0], [-5.0, -4.0], 0.1
    loss, m = dpo_loss(torch.tensor(pi_c), torch.tensor(pi_r), None, None, beta, reference_free=True)
    want = -(logsig(beta * (pi_c[0] - pi_r[0])) + logsig(beta * (pi_c[1] - pi_r[1]))) / 2
    assert loss.item() == pytest.approx(want, abs=TOL)
    assert set(m) == {"chosen_pos", "chosen_neg"}  # upstream logs no rewards without a reference


def test_kto_loss_by_hand():
    # four examples: halves (0, 1) and (2, 3); rewards +1 desirable, -1 undesirable
    policy, reference, rewards = [-2.0, -7.0, -3.0, -4.0], [-3.0, -6.0, -3.5, -3.0], [1.0, -1.0, -1.0, 1.0]
    beta, wd, wu = 0.2, 1.0, 1.5
    loss, m = kto_loss(*map(torch.tensor, (policy, reference, rewards)), beta, wd, wu, torch.tensor(10.0))
    ratio = [p - r for p, r in zip(policy, reference)]  # 1, -1, 0.5, -1
    kl1 = (max(ratio[0], 0) + max(ratio[1], 0)) / 2  # 0.5: the first half's estimate ...
    kl2 = (max(ratio[2], 0) + max(ratio[3], 0)) / 2  # 0.25 ... is used by the other half
    w = [wd if r > 0 else wu for r in rewards]
    w1, w2 = (w[0] + w[1]) / 2, (w[2] + w[3]) / 2
    terms = [0.5 * w1 * (1 - sig(beta * rewards[j] * (ratio[j] - kl2)))
             + 0.5 * w2 * (1 - sig(beta * rewards[j + 2] * (ratio[j + 2] - kl1))) for j in range(2)]
    assert loss.item() == pytest.approx(sum(terms) / 2, abs=TOL)
    assert m["kl"].item() == pytest.approx(sum(ratio) / 10)
    assert m["reward_acc"].item() == pytest.approx(2 / 4)  # beta*r*ratio > 0 for examples 0 and 1 only


def test_rm_loss_by_hand():
    pos, neg, z = [1.0, -0.5, 2.0], [0.0, 0.5, 2.5], 0.01
    loss, m = rm_loss(torch.tensor(pos), torch.tensor(neg), z)
    want = -sum(logsig(p - n) for p, n in zip(pos, neg)) / 3 + z * sum(p * p + n * n for p, n in zip(pos, neg)) / 3
    assert loss.item() == pytest.approx(want, abs=TOL)
    assert m["accuracy"].item() == pytest.approx(1 / 3)
    assert m["margin"].item() == pytest.approx((1.0 - 1.0 - 0.5) / 3)
    assert m["pos_values"].item() == pytest.approx(2.5 / 3) and m["neg_values"].item() == pytest.approx(1.0)


def _model():
    torch.manual_seed(0)
    return build_model(from_dict(tiny_keys(seq_length=16, hidden_dropout=0.0, attention_dropout=0.0)))


def _pairs():
    """[2 pairs, (chosen, rejected), 16] with labels masked as preprocessing writes them."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 1000, (2, 2, 16), generator=g)
    labels = torch.randint(0, 1000, (2, 2, 16), generator=g)
    mask = (torch.rand(2, 2, 16, generator=g) > 0.4).float()
    labels[mask == 0] = -100
    return {"tokens": tokens, "labels": labels, "loss_mask": mask}


def test_sequence_logprobs_equal_log_softmax_of_full_logits(one_process):
    model = _model().eval()
    b = _pairs()
    tokens, labels, mask = (b[k].reshape(4, 16) for k in ("tokens", "labels", "loss_mask"))
    got = model(tokens, labels=labels, loss_mask=mask, score="logprobs")
    logp = torch.log_softmax(model(tokens).double(), -1)
    want = torch.stack([sum(logp[r, j, labels[r, j]] for j in range(16) if mask[r, j]) for r in range(4)])
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-4)  # fp32 logits, ~10 terms of size ~7


def test_dpo_at_the_first_step_is_ln2_with_zero_rewards(one_process):
    model = _model().train()  # dropout is 0, so train mode changes nothing
    keys = tiny_keys(train_impl="dpo", dataset_impl="pairwise", pos_train_data_paths=["p"],
                     neg_train_data_paths=["n"], dpo_beta=0.3)
    objective = Objective(from_dict(keys), make_reference(model))
    loss, m = objective(model, _pairs())
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    for key in ("chosen_rewards", "rejected_rewards", "margins"):
        assert m[key].item() == 0.0
    assert m["chosen_pos"].item() == m["ref_pos"].item() != 0
    loss.backward()  # the policy gets gradients; the reference none
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert all(p.grad is None for p in objective.reference.parameters())


@pytest.mark.parametrize("keys, message", [
    (dict(train_impl="reinforce"), "REINFORCE"),
    (dict(train_impl="dpo"), "dataset_impl: pairwise"),
    (dict(train_impl="dpo", dataset_impl="pairwise"), "pos_train_data_paths"),
    (dict(train_impl="rm", dataset_impl="pairwise", pos_train_data_paths=["a", "b"], neg_train_data_paths=["c"]),
     "neg_train_data_paths"),
    (dict(train_impl="kto", train_reward_data_paths=["r"], train_micro_batch_size_per_gpu=3), "even"),
    (dict(dataset_impl="online"), "not built"),
])
def test_post_training_keys_refuse_in_one_line(keys, message):
    with pytest.raises(UserError, match=message) as e:
        from_dict(tiny_keys(**keys))
    assert "\n" not in str(e.value)
