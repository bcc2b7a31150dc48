"""AdamW with its two moments stored in bf16: what `--adamw-state bf16` uses.

Full fine-tuning with float32 master weights keeps 16 bytes a parameter: the weight 4, its
gradient 4, AdamW's two moments 8. Stored in bf16, the moments take 4: 12 bytes a parameter, and
Llama-3.2-1B's 1.24B parameters need 4.6 GiB less. The arithmetic stays float32; only what is
stored between steps is rounded.

How it is rounded matters. The second moment moves by (1 − β₂) = 0.1% a step, and neighbouring
bf16 numbers are up to 0.8% apart: rounded to the nearest, v would stop moving. So the moments are
rounded stochastically: a value between two bf16 numbers goes up with probability equal to its
distance from the lower one, in units of their gap, and on average nothing is lost.

    bf16 = the top 16 bits of a float32:   bits(x) + r, r uniform in [0, 2¹⁶), low bits cleared

r is a hash of (step, parameter, position), not a draw from a random generator, so a resumed run
rounds exactly as an uninterrupted one. On a GPU the update is one compiled kernel per parameter.
"""
import torch

# a 32-bit integer hash (two multiply-xorshift rounds): uniform enough for rounding noise
HASH_MULTIPLIER = 0x45D9F3B
SEED_MULTIPLIER = 0x2545F491  # spreads the seeds apart (< 2³⁰: an int64 product cannot overflow)
MASK32 = 0xFFFFFFFF


def hash32(x: torch.Tensor) -> torch.Tensor:
    """int64 tensor → pseudo-random 32-bit values (in int64, so no product overflows)."""
    x = x & MASK32
    x = ((x >> 16) ^ x) * HASH_MULTIPLIER & MASK32
    x = ((x >> 16) ^ x) * HASH_MULTIPLIER & MASK32
    return (x >> 16) ^ x


def round_to_bf16(x: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """float32 → bf16, stochastically: up with probability (x − down) / (up − down).
    `seed`: an int64 scalar tensor, a different one for every tensor and step."""
    position = torch.arange(x.numel(), device=x.device).view(x.shape)
    r = (hash32(position + (seed & MASK32) * SEED_MULTIPLIER) & 0xFFFF).to(torch.int32)
    bits = (x.view(torch.int32) + r) & -0x10000  # (-0x10000: the high 16 bits set)
    return bits.view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are 0


@torch.no_grad()
def adamw_update_(p, grad, exp_avg, exp_avg_sq, hyper, index: int):
    """One AdamW step of one parameter, as torch.optim.AdamW computes it, with the moments read
    from bf16 and written back rounded (round_to_bf16). `hyper` holds lr, β₁, β₂, eps, weight
    decay, the two bias corrections and the step, as a tensor on the parameter's device: a new
    learning rate every step must not make torch.compile compile again."""
    lr, beta1, beta2, eps, weight_decay, bias1, bias2, step = hyper
    g = grad.float()
    m = exp_avg.float() * beta1 + g * (1 - beta1)
    v = exp_avg_sq.float() * beta2 + g * g * (1 - beta2)
    p.mul_(1 - lr * weight_decay)
    p.sub_(lr / bias1 * m / ((v / bias2).sqrt() + eps))
    seed = step.long() * 1000003 + index * 2
    exp_avg.copy_(round_to_bf16(m, seed))
    exp_avg_sq.copy_(round_to_bf16(v, seed + 1))


class AdamWBf16State(torch.optim.Optimizer):
    """torch.optim.AdamW's update (decoupled weight decay, bias correction) with exp_avg and
    exp_avg_sq kept in bf16. The weights keep their own dtype (float32 master weights)."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.update = adamw_update_
        if any(p.is_cuda for group in self.param_groups for p in group["params"]):
            self.update = torch.compile(adamw_update_, dynamic=True)  # no copy of the moments

    @torch.no_grad()
    def step(self):
        index = 0  # the parameter's place: its own rounding noise
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            hypers = {}  # by step count (the same for all, in practice): one copy to the device
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                state["step"] += 1
                t = int(state["step"])
                if t not in hypers:
                    hypers[t] = torch.tensor([group["lr"], beta1, beta2, group["eps"],
                                              group["weight_decay"], 1 - beta1 ** t,
                                              1 - beta2 ** t, t], dtype=torch.float64).to(p.device)
                # flat views: one compiled kernel serves every shape
                self.update(p.view(-1), p.grad.view(-1), state["exp_avg"].view(-1),
                            state["exp_avg_sq"].view(-1), hypers[t], index)

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)  # (torch casts the moments to the weights' dtype)
        for state in self.state.values():  # back to bf16: exact, they were bf16 numbers
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = state[key].to(torch.bfloat16)
