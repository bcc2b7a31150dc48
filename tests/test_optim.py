"""speed/optim.py: AdamW with bf16 moments (--adamw-state bf16). Stochastic rounding is unbiased and
repeatable; the update is torch.optim.AdamW's; a state_dict round trip keeps the moments bf16 and
continues bit for bit."""
import torch

from speed.optim import AdamWBf16State, round_to_bf16


def test_rounding_is_unbiased_and_goes_only_to_the_two_neighbours():
    for value in (1 + 2**-10, -(1 + 3 * 2**-10), 3.0e-7 * (1 + 2**-9)):
        x = torch.full((100_000,), value)
        rounded = round_to_bf16(x, torch.tensor(7)).float()
        down = torch.tensor(value).to(torch.bfloat16).float()  # (round to nearest: one of them)
        assert len(rounded.unique()) == 2 and down in rounded.unique()
        # round to nearest would give `down` every time: an error of the whole remainder
        assert abs(rounded.mean().item() - value) < 0.02 * abs(value - rounded.unique()).max()
    x = torch.randn(1000)
    assert torch.equal(round_to_bf16(x, torch.tensor(3)), round_to_bf16(x, torch.tensor(3)))
    assert not torch.equal(round_to_bf16(x, torch.tensor(3)), round_to_bf16(x, torch.tensor(4)))


TARGET = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))


def fit(w, optimizer, steps, first=0):
    """AdamW steps first..first+steps-1 of a small least-squares fit (each step its own batch)."""
    for i in range(first, first + steps):
        x = torch.randn(16, 64, generator=torch.Generator().manual_seed(i))
        ((x @ w - TARGET) ** 2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return w.detach()


def regression(optimizer_class, steps):
    """`steps` steps from the same start, weight decay on: (weight, optimizer)."""
    w = torch.nn.Parameter(torch.randn(64, 32, generator=torch.Generator().manual_seed(0)))
    optimizer = optimizer_class([w], lr=1e-2, weight_decay=0.1)
    return fit(w, optimizer, steps), optimizer


def test_the_update_is_adamws():
    one_step, optimizer = regression(AdamWBf16State, 1)
    assert torch.allclose(one_step, regression(torch.optim.AdamW, 1)[0], rtol=1e-6, atol=1e-7)
    ours = regression(AdamWBf16State, 300)[0]
    exact = regression(torch.optim.AdamW, 300)[0]
    assert ((ours - exact).norm() / exact.norm()).item() < 0.03
    state = optimizer.state[optimizer.param_groups[0]["params"][0]]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16


def test_state_dict_round_trip_keeps_bf16_and_continues_exactly():
    straight, _ = regression(AdamWBf16State, 20)
    halfway, optimizer = regression(AdamWBf16State, 10)
    w = torch.nn.Parameter(halfway.clone())
    resumed = AdamWBf16State([w], lr=1e-2, weight_decay=0.1)
    resumed.load_state_dict(optimizer.state_dict())
    assert resumed.state[w]["exp_avg_sq"].dtype == torch.bfloat16
    assert torch.equal(fit(w, resumed, 10, first=10), straight)
