"""DPO, clipped policy-gradient and group-advantage math against values worked out by hand (scalar Python,
written independently of the vectorized code), for every option."""

import math

import pytest
import torch

from automodel_mimo.metrics import combine_metrics
from automodel_mimo.losses import PGLossConfig, clipped_pg_loss, dpo_loss, group_advantages, kl_penalty, sequence_logprobs


def logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def close(a, b, tol=1e-6):
    return abs(float(a) - float(b)) <= tol * max(1.0, abs(float(b)))


# ---------------------------------------------------------------- DPO

# rows: chosen0, rejected0, chosen1, rejected1 (+ a pair whose rejected row has no tokens)
SEQ = [-2.0, -3.0, -1.5, -1.0, -4.0, 0.0]
REF = [-2.5, -2.5, -1.0, -1.2, -3.0, 0.0]
TOKENS = [2.0, 3.0, 1.0, 4.0, 5.0, 0.0]


def test_sequence_logprobs_sums_masked_tokens():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.25, -4.0]])
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    sums, counts = sequence_logprobs(lp, mask)
    assert sums.tolist() == [-4.0, 0.0] and counts.tolist() == [2.0, 0.0]


@pytest.mark.parametrize("average", [False, True])
def test_dpo_loss_and_metrics(average):
    beta, pairs = 0.5, 4.0  # the global pair count includes pairs held by other ranks
    seq = torch.tensor(SEQ, requires_grad=True)
    loss, m = dpo_loss(seq, torch.tensor(REF), torch.tensor(TOKENS), beta=beta, global_pairs=pairs, average_logprobs=average)
    if average:  # rewards (seq - ref) / tokens
        r = [0.5 / 2, -0.5 / 3, -0.5 / 1, 0.2 / 4]
    else:
        r = [0.5, -0.5, -0.5, 0.2]
    margins = [r[0] - r[1], r[2] - r[3]]  # the third pair has an empty row: ignored
    expected = -(logsigmoid(beta * margins[0]) + logsigmoid(beta * margins[1])) / pairs
    assert close(loss, expected)
    assert close(m["dpo_loss"], expected)
    assert close(m["preference_accuracy"], 1 / pairs)  # only the first pair prefers chosen
    assert close(m["reward_margin"], sum(margins) / pairs)
    assert close(m["chosen_reward"], (r[0] + r[2]) / pairs)
    assert close(m["rejected_reward"], (r[1] + r[3]) / pairs)
    assert float(m["pairs"]) == 2
    loss.backward()
    # d/d seq_chosen of -logsigmoid(beta * margin) = -beta * sigmoid(-beta * margin) (/ tokens when averaging)
    g = -beta / (1 + math.exp(beta * margins[0])) / pairs
    assert close(seq.grad[0], g / (2 if average else 1)) and close(seq.grad[1], -g / (3 if average else 1))
    assert seq.grad[4] == 0 and seq.grad[5] == 0


def test_dpo_sft_term_uses_its_own_token_count():
    beta, pairs, chosen_tokens, w = 0.1, 2.0, 10.0, 0.3
    loss, m = dpo_loss(torch.tensor(SEQ), torch.tensor(REF), torch.tensor(TOKENS), beta=beta, global_pairs=pairs,
                       sft_weight=w, global_chosen_tokens=chosen_tokens)
    dpo = -(logsigmoid(beta * 1.0) + logsigmoid(beta * -0.7)) / pairs
    sft = -(-2.0 + -1.5) / chosen_tokens  # chosen rows of valid pairs only
    assert close(m["sft_loss"], sft) and close(loss, dpo + w * sft)


def test_dpo_rejects_odd_rows():
    with pytest.raises(ValueError, match="pairs"):
        dpo_loss(torch.zeros(3), torch.zeros(3), torch.ones(3), beta=0.1, global_pairs=1)


# ---------------------------------------------------------------- clipped policy gradient

LP = [[-1.0, -0.5, -2.0], [-0.3, -1.2, -0.7]]
OLD = [[-1.2, -0.4, -2.0], [-0.8, -1.0, -0.7]]
REFLP = [[-1.1, -0.9, -1.0], [-0.3, -2.0, -0.1]]
GEN = [[-1.0, -0.6, -1.5], [-0.9, -1.0, -0.5]]
MASK = [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
ADV = [1.5, -2.0]


def scalar_pg(lp, old, a, eps_low, eps_high, dual=None):
    ratio = math.exp(lp - old)
    clipped = min(max(ratio, 1 - eps_low), 1 + eps_high)
    pg = max(-a * ratio, -a * clipped)
    if dual is not None and a < 0:
        pg = min(pg, -a * dual)
    return pg, ratio, -a * clipped > -a * ratio


def run_pg(cfg, **extra):
    lp = torch.tensor(LP, requires_grad=True)
    kwargs = dict(global_valid_tokens=extra.pop("tokens", 5.0), global_valid_seqs=extra.pop("seqs", 2.0))
    loss, m = clipped_pg_loss(lp, torch.tensor(OLD), torch.tensor(ADV), torch.tensor(MASK), cfg, **kwargs, **extra)
    return lp, loss, m


def tokens():
    return [(b, t) for b in range(2) for t in range(3) if MASK[b][t]]


def test_pg_token_level_clip_and_metrics():
    cfg = PGLossConfig(eps_low=0.1, eps_high=0.3)
    lp, loss, m = run_pg(cfg, tokens=8.0)
    per = {(b, t): scalar_pg(LP[b][t], OLD[b][t], ADV[b], 0.1, 0.3) for b, t in tokens()}
    assert close(loss, sum(v[0] for v in per.values()) / 8.0)
    assert close(m["clip_fraction"], sum(v[2] for v in per.values()) / 8.0)
    ratios = [v[1] for v in per.values()]
    assert close(m["ratio_min"], min(ratios)) and close(m["ratio_max"], max(ratios))
    assert close(m["ratio_mean"], sum(ratios) / 8.0)
    # by hand for two tokens: row 0 token 0: ratio e^0.2 = 1.2214 inside [0.9, 1.3] -> loss -1.5 * 1.2214
    assert close(per[(0, 0)][0], -1.5 * math.exp(0.2))
    # row 1 token 0: ratio e^0.5 = 1.6487 > 1.3 with A = -2 -> unclipped 2 * 1.6487 is larger and kept
    assert close(per[(1, 0)][0], 2 * math.exp(0.5)) and not per[(1, 0)][2]
    # row 1 token 1: ratio e^-0.2 = 0.8187 < 0.9, A = -2 -> clipped 2 * 0.9 wins: counted as clipped
    assert close(per[(1, 1)][0], 2 * 0.9) and per[(1, 1)][2]
    loss.backward()
    # gradient of -A * ratio is -A * ratio where unclipped, 0 where the clip is active
    assert close(lp.grad[0, 0], -1.5 * math.exp(0.2) / 8.0)
    assert lp.grad[1, 1] == 0 and lp.grad[0, 2] == 0


def test_pg_dual_clip_caps_negative_advantages():
    cfg = PGLossConfig(eps_low=0.2, eps_high=0.2, dual_clip=1.5)
    lp, loss, m = run_pg(cfg)
    per = {(b, t): scalar_pg(LP[b][t], OLD[b][t], ADV[b], 0.2, 0.2, dual=1.5) for b, t in tokens()}
    assert close(loss, sum(v[0] for v in per.values()) / 5.0)
    # row 1 token 0: ratio 1.6487 > 1.5 with A = -2: capped at 2 * 1.5 = 3
    assert close(per[(1, 0)][0], 3.0)
    assert close(m["dual_clip_fraction"], 1 / 5.0)
    loss.backward()
    assert lp.grad[1, 0] == 0


def test_pg_sequence_level_normalization():
    cfg = PGLossConfig(sequence_level=True)
    _, loss, _ = run_pg(cfg, seqs=3.0)
    per = {(b, t): scalar_pg(LP[b][t], OLD[b][t], ADV[b], 0.2, 0.2)[0] for b, t in tokens()}
    row0 = (per[(0, 0)] + per[(0, 1)]) / 2
    row1 = (per[(1, 0)] + per[(1, 1)] + per[(1, 2)]) / 3
    assert close(loss, (row0 + row1) / 3.0)


def test_pg_gspo_sequence_ratio():
    cfg = PGLossConfig(gspo=True, eps_low=0.1, eps_high=0.1, sequence_level=True)
    lp, loss, m = run_pg(cfg)
    s0 = math.exp(((-1.0 + 1.2) + (-0.5 + 0.4)) / 2)  # exp(mean over row 0's tokens of lp - lp_old)
    s1 = math.exp(((-0.3 + 0.8) + (-1.2 + 1.0) + 0.0) / 3)
    pg0 = max(-1.5 * s0, -1.5 * min(max(s0, 0.9), 1.1))
    pg1 = max(2.0 * s1, 2.0 * min(max(s1, 0.9), 1.1))
    assert close(loss, (pg0 + pg1) / 2.0)
    assert close(m["ratio_min"], min(s0, s1)) and close(m["ratio_max"], max(s0, s1))
    loss.backward()
    # row 0 is unclipped (s0 = 1.051): d/d lp of -A * exp(mean) = -A * s0 / n_tokens / seqs, on both tokens
    assert close(lp.grad[0, 0], -1.5 * s0 / 2 / 2.0) and close(lp.grad[0, 1], lp.grad[0, 0])


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_pg_kl_penalty(kind):
    cfg = PGLossConfig(kl_beta=0.05, kl_type=kind, kl_input_clamp=0.8, kl_output_clamp=0.5)
    _, loss, m = run_pg(cfg, ref_logprobs=torch.tensor(REFLP))

    def kl(lp, ref):
        x = min(max(ref - lp, -0.8), 0.8)
        value = -x if kind == "k1" else math.exp(x) - x - 1
        return min(max(value, -0.5), 0.5)

    kls = {(b, t): kl(LP[b][t], REFLP[b][t]) for b, t in tokens()}
    pgs = {(b, t): scalar_pg(LP[b][t], OLD[b][t], ADV[b], 0.2, 0.2)[0] for b, t in tokens()}
    assert close(m["kl"], sum(kls.values()) / 5.0)
    assert close(loss, sum(pgs[k] + 0.05 * kls[k] for k in kls) / 5.0)
    # by hand: row 1 token 1 has ref - lp = -0.8 -> k3 = e^-0.8 + 0.8 - 1 = 0.2493; k1 = 0.8 -> clamped to 0.5
    assert close(kls[(1, 1)], math.exp(-0.8) - 0.2 if kind == "k3" else 0.5)


def test_kl_input_clamp():
    lp, ref = torch.tensor([0.0]), torch.tensor([-50.0])
    assert close(kl_penalty(lp, ref, "k3", 20.0, 1e9)[0], math.exp(-20) + 20 - 1)


def test_pg_truncated_importance_weight_and_generator_errors():
    cfg = PGLossConfig(truncated_is_cap=1.1)
    lp, loss, m = run_pg(cfg, gen_logprobs=torch.tensor(GEN))
    total = err = mult = 0.0
    for b, t in tokens():
        w = min(math.exp(OLD[b][t] - GEN[b][t]), 1.1)
        total += scalar_pg(LP[b][t], OLD[b][t], ADV[b], 0.2, 0.2)[0] * w
        err += abs(OLD[b][t] - GEN[b][t])
        mult += math.exp(abs(OLD[b][t] - GEN[b][t]))
    assert close(loss, total / 5.0)
    assert close(m["gen_kl_error"], err / 5.0) and close(m["token_mult_prob_error"], mult / 5.0)
    with pytest.raises(ValueError, match="generator"):
        clipped_pg_loss(lp, torch.tensor(OLD), torch.tensor(ADV), torch.tensor(MASK), cfg, global_valid_tokens=5, global_valid_seqs=2)


def test_pg_per_token_advantages_and_empty_rows():
    adv = torch.tensor([[1.0, -1.0, 5.0], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])  # row 1: a weight-0 dummy
    lp = torch.tensor(LP)
    loss, m = clipped_pg_loss(lp, lp.clone(), adv, mask, PGLossConfig(), global_valid_tokens=2, global_valid_seqs=1)
    assert close(loss, (-1.0 + 1.0) / 2) and close(m["advantage_mean"], 0.0)
    empty, em = clipped_pg_loss(lp, lp.clone(), adv, torch.zeros_like(mask), PGLossConfig(), global_valid_tokens=2, global_valid_seqs=1)
    assert float(empty) == 0 and em["ratio_min"] == math.inf and em["ratio_max"] == -math.inf


def test_pg_first_step_ratio_is_one():
    lp = torch.tensor(LP)
    _, m = clipped_pg_loss(lp, lp.clone(), torch.tensor(ADV), torch.tensor(MASK), PGLossConfig(), global_valid_tokens=5, global_valid_seqs=2)
    assert m["ratio_min"] == 1 and m["ratio_max"] == 1 and m["clip_fraction"] == 0


def test_pg_config_validation():
    for bad in (dict(dual_clip=1.0), dict(kl_type="k2"), dict(eps_low=-0.1), dict(truncated_is_cap=0.0)):
        with pytest.raises(ValueError):
            PGLossConfig(**bad).validate()


# ---------------------------------------------------------------- advantages and metric combination


def test_group_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.7, 0.7, 0.7, 0.7])
    a = group_advantages(rewards, 4, normalize_std=False)
    assert torch.allclose(a[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    assert a[4:].tolist() == [0.0] * 4  # identical rewards: exactly zero
    std = math.sqrt(4 * 0.25 / 3)  # unbiased std of [1, 0, 0, 1]
    a = group_advantages(rewards, 4, normalize_std=True, eps=1e-6)
    assert close(a[0], 0.5 / (std + 1e-6)) and a[4:].tolist() == [0.0] * 4
    with pytest.raises(ValueError):
        group_advantages(rewards, 3)


def test_combine_metrics():
    got = combine_metrics([{"loss": 1.0, "ratio_min": 0.9, "ratio_max": 1.1}, {"loss": 2.0, "ratio_min": 0.8, "ratio_max": 1.0}])
    assert got == {"loss": 3.0, "ratio_min": 0.8, "ratio_max": 1.1}
