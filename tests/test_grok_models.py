import dataclasses
import io

import numpy as np
import pytest
import torch

from conftest import REPO
from labpipe.config import load_params
from labpipe.grok.features import FeatureLayout
from labpipe.grok.models import ResNetMLP, SparseMoE, build_model, log2_loss, log2_prediction, violation_penalty

# Four groups over three (n, k) pairs: (4, 2) holds m = 1 and m = 2.
LAYOUT = FeatureLayout(groups=((4, 2, 1), (4, 2, 2), (5, 2, 1), (5, 3, 1)), max_k=3, max_r=3, p_scale=1.0)
PAIR_OF_GROUP = [0, 0, 1, 2]  # index in the sorted pairs (4, 2), (5, 2), (5, 3)


def _inputs(groups: list[int], seed: int = 0) -> torch.Tensor:
    """Random P features, then the one-hot of each row's group (the layout's last columns)."""
    generator = torch.Generator().manual_seed(seed)
    p = torch.randn(len(groups), LAYOUT.max_k * LAYOUT.max_r, generator=generator, dtype=torch.float64)
    return torch.cat([p, torch.eye(len(LAYOUT.groups), dtype=torch.float64)[groups]], dim=1)


def _params(**changes):
    return dataclasses.replace(load_params(REPO / "params.yaml").grok, width=8, blocks=1, **changes)


def test_log2_head_is_bounded_below_by_one_and_loss_is_squared_log2_error():
    z = torch.tensor([-30.0, -1.0, 0.0, 2.5, 40.0], dtype=torch.float64)
    h_hat = 2.0 ** np.log1p(np.exp(z.numpy()))  # textbook softplus in the log2 domain
    assert np.allclose(log2_prediction(z).numpy(), np.log2(h_hat), rtol=1e-12)
    assert (h_hat >= 1).all() and (log2_prediction(z) >= 0).all()
    target = torch.tensor([0.0, 1.0, 3.0, 5.0, 2.0], dtype=torch.float64)
    assert np.allclose(log2_loss(z, target).numpy(), (target.numpy() - np.log2(h_hat)) ** 2, rtol=1e-12)


def test_seed_head_is_one_plus_softplus_on_the_h_scale():
    z = torch.tensor([-30.0, -1.0, 0.0, 2.5, 40.0], dtype=torch.float64)
    h_hat = 1 + np.log1p(np.exp(z.numpy()))  # the seed's head, on the h scale
    log2_h_hat = log2_prediction(z, head="seed")
    assert np.allclose(2.0 ** log2_h_hat.numpy(), h_hat, rtol=1e-14)
    assert log2_h_hat[3].item() == pytest.approx(np.log2(1 + np.log(1 + np.exp(2.5))), rel=1e-14)  # 1.8395
    # z = -30: h_hat - 1 = 9.4e-14, which log2(1 + .) would round; log2 h_hat ~ e^-30 / ln 2 to ~1e-13.
    assert log2_h_hat[0].item() == pytest.approx(np.exp(-30) / np.log(2), rel=1e-12)
    target = torch.tensor([1.0, 1.0, 3.0, 5.0, 2.0], dtype=torch.float64)
    assert np.allclose(log2_loss(z, target, head="seed").numpy(), (target.numpy() - np.log2(h_hat)) ** 2,
                       rtol=1e-12)
    with pytest.raises(ValueError, match="unknown output head 'h'"):
        log2_prediction(z, head="h")


def test_violation_penalty_is_zero_at_or_above_the_bound():
    log2_pred = torch.tensor([[3.0, 1.0], [0.5, 2.0]])
    log2_bound = torch.tensor([[2.0, 2.5], [0.5, 4.0]])
    # (2.5 - 1)^2 = 2.25 and (4 - 2)^2 = 4 below the bound; 3 > 2 and 0.5 = 0.5 are not penalised.
    assert torch.equal(violation_penalty(log2_pred, log2_bound), torch.tensor([[0.0, 2.25], [0.0, 4.0]]))


@pytest.mark.parametrize("gate_input, gate_column", [("nk", PAIR_OF_GROUP), ("nkm", [0, 1, 2, 3])])
def test_soft_moe_routes_to_top_k_experts_and_balances_like_switch(gate_input, gate_column):
    torch.manual_seed(0)
    moe = SparseMoE(LAYOUT, width=8, blocks=1, experts=4, top_k=2, gate_input=gate_input).double()
    assert moe.gate.weight.shape == (4, max(gate_column) + 1)  # nkm: (experts, n_groups) as before
    groups = [0, 1, 2, 3, 0, 1, 2, 3]
    x = _inputs(groups)
    z, aux = moe(x)
    # By hand: the gate's logits of each row's gate input, its two best experts, softmax over their logits.
    weight, bias = moe.gate.weight.detach().numpy(), moe.gate.bias.detach().numpy()
    logits = np.stack([weight[:, gate_column[g]] + bias for g in groups])
    scores = np.stack([e.score(x).detach().numpy() for e in moe.experts], axis=1)
    expected, routed = [], np.zeros(4)
    for row in range(len(groups)):
        best = np.argsort(-logits[row])[:2]
        w = np.exp(logits[row, best] - logits[row, best].max())
        w /= w.sum()
        expected.append((w * scores[row, best]).sum())
        routed[best] += 1
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    balance = 4 * ((routed / (len(groups) * 2)) * probs.mean(0)).sum()
    assert np.allclose(z.detach().numpy(), expected, rtol=1e-10)
    assert aux.item() == pytest.approx(balance, rel=1e-10)
    with pytest.raises(ValueError, match="top_k=5 must be between 1 and experts=4"):
        SparseMoE(LAYOUT, 8, 1, experts=4, top_k=5)


def test_nk_gate_weights_groups_that_differ_only_in_m_alike():
    torch.manual_seed(0)
    x = _inputs([0, 1])  # (4, 2, 1) and (4, 2, 2)
    x[1, :-len(LAYOUT.groups)] = x[0, :-len(LAYOUT.groups)]
    z = {}
    for gate_input in ("nk", "nkm"):
        moe = SparseMoE(LAYOUT, width=8, blocks=1, experts=4, top_k=2, gate_input=gate_input).double()
        with torch.no_grad():
            for expert in moe.experts:  # experts blind to the group: any difference in z is the gate's
                expert.inp.weight[:, -len(LAYOUT.groups):] = 0
        z[gate_input] = moe(x)[0]
    assert z["nk"][0].item() == pytest.approx(z["nk"][1].item(), rel=1e-12)
    assert abs(z["nkm"][0].item() - z["nkm"][1].item()) > 1e-3


@pytest.mark.parametrize("gate_input", ["nk", "nkm"])
def test_moe_of_one_resnet_with_top_1_routing_is_that_resnet(gate_input):
    torch.manual_seed(0)
    resnet = ResNetMLP(LAYOUT.dim, 8, 2).double()
    moe = SparseMoE(LAYOUT, width=8, blocks=2, experts=3, top_k=1, gate_input=gate_input).double()
    for expert in moe.experts:
        expert.load_state_dict(resnet.state_dict())
    x = _inputs([0, 1, 2, 3, 2, 0])
    z, _aux = moe(x)
    assert torch.equal(z, resnet(x)[0])


@pytest.mark.parametrize("gate_input, expert_of_group", [("nk", [0, 0, 1, 0]), ("nkm", [0, 1, 0, 1])])
def test_hard_gating_sends_the_ith_gate_input_to_expert_i_mod_experts(gate_input, expert_of_group):
    torch.manual_seed(0)
    moe = SparseMoE(LAYOUT, width=8, blocks=1, experts=2, top_k=2, gate_input=gate_input, gating="hard").double()
    assert all(name.startswith("experts.") for name in moe.state_dict())  # no gate to learn
    groups = [0, 1, 2, 3, 3, 2, 1, 0]
    x = _inputs(groups)
    z, aux = moe(x)
    scores = [expert.score(x) for expert in moe.experts]
    assert torch.equal(z, torch.stack([scores[expert_of_group[g]][row] for row, g in enumerate(groups)]))
    assert torch.equal(aux, torch.zeros((), dtype=torch.float64))


def test_build_model_describes_itself_and_a_resnet_loads_into_an_expert():
    resnet = build_model(_params(model="resnet"), LAYOUT)
    moe = build_model(_params(model="moe", experts=2, top_k=1, gate_input="nk", output_head="seed"), LAYOUT)
    assert (resnet.layout, resnet.output_head) == (LAYOUT, "log2")
    assert (moe.layout, moe.output_head) == (LAYOUT, "seed")
    assert set(resnet.state_dict()) == set(ResNetMLP(LAYOUT.dim, 8, 1).state_dict())
    for expert in moe.experts:
        expert.load_state_dict(resnet.state_dict())
    x = _inputs([0, 1, 2, 3]).float()
    assert torch.equal(moe(x)[0], resnet(x)[0])
    # The whole pickled module (what MLflow logs) keeps its layout, head and routing buffers.
    buffer = io.BytesIO()
    torch.save(moe, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert (loaded.layout, loaded.output_head) == (LAYOUT, "seed")
    assert torch.equal(loaded(x)[0], moe(x)[0])
