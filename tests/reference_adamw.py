"""AdamW written out in float64, the independent reference the optimizer tests compare with, and the three random
steps every optimizer test takes with the optimizer under test."""

import torch


def adamw_float64(start, grads, name, *, lr, betas, eps, weight_decay):
    """The weights of parameter `name` after one AdamW step per entry of `grads` (decoupled decay, bias
    correction), from `start[name]`; `weight_decay` is the decay this parameter gets (0 for norms/biases)."""
    b1, b2 = betas
    w, m, v = start[name].double(), 0.0, 0.0
    for t, step in enumerate(grads, 1):
        grad = step[name].double()
        w = w * (1 - lr * weight_decay)
        m, v = b1 * m + (1 - b1) * grad, b2 * v + (1 - b2) * grad**2
        w = w - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
    return w


def three_random_steps(config, steps: int = 3):
    """(model, its starting weights, the gradients fed, the optimizer) after `steps` steps of build_optimizer's
    optimizer on seeded random gradients (the model seeded with 0, the gradients with 1)."""
    from neox_fork.model.transformer import build_model
    from neox_fork.training.optim import build_optimizer

    torch.manual_seed(0)
    model = build_model(config)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(config, model)
    g = torch.Generator().manual_seed(1)
    grads = [{n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()} for _ in range(steps)]
    for step in grads:
        for n, p in model.named_parameters():
            p.grad = step[n].clone()
        opt.step()
    return model, start, grads, opt
