"""AdamW written out in float64, the independent reference the optimizer tests compare with."""


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
