"""Upstream gpt-neox's optimizer updates written out in float64 (megatron/optimizers.py and the classes its
get_optimizer builds, at commit ea7aefd8), the independent references the optimizer tests compare with.

Each takes the parameter's start value, its gradient at each step and the weight decay it gets (0 for norms and
biases: upstream's no-decay group), and returns the weights after those steps."""

import math

import torch


def sgd_float64(start, grads, *, lr, weight_decay, momentum=0.0, dampening=0.0, nesterov=False):
    """Upstream's sgd: mup's MuSGD, at width multiplier 1 torch's SGD: the decay added to the gradient (L2)."""
    w, buf = start.double(), None
    for g in grads:
        g = g.double() + weight_decay * w
        if momentum:
            buf = g.clone() if buf is None else momentum * buf + (1 - dampening) * g
            g = g + momentum * buf if nesterov else buf
        w = w - lr * g
    return w


def lion_float64(start, grads, *, lr, betas, weight_decay):
    """Upstream's Lion (megatron/optimizers.py): decoupled decay, then the sign of the interpolated momentum."""
    b1, b2 = betas
    w, m = start.double(), torch.zeros_like(start, dtype=torch.float64)
    for g in grads:
        g = g.double()
        w = w * (1 - lr * weight_decay)
        w = w - lr * torch.sign(b1 * m + (1 - b1) * g)
        m = b2 * m + (1 - b2) * g
    return w


def madgrad_wd_float64(start, grads, *, lr, momentum, eps, weight_decay):
    """Upstream's madgrad_wd (megatron/optimizers.py): p x (1 - lr x wd) first, then MADGRAD's dual-averaged
    step (lr + eps throughout, the step counter k from 0)."""
    w = start.double()
    x0 = w.clone()
    grad_sum_sq, s = torch.zeros_like(w), torch.zeros_like(w)
    lr = lr + eps
    for k, g in enumerate(grads):
        g = g.double()
        lamb = lr * math.sqrt(k + 1)
        w = w * (1 - lr * weight_decay)
        if momentum == 0:
            x0 = w + s / (grad_sum_sq.pow(1 / 3) + eps)
        grad_sum_sq = grad_sum_sq + lamb * g * g
        s = s + lamb * g
        z = x0 - s / (grad_sum_sq.pow(1 / 3) + eps)
        w = z if momentum == 0 else momentum * w + (1 - momentum) * z
    return w


def sm3_float64(start, grads, *, lr, momentum=0.0, beta=0.0, eps=1e-30):
    """Upstream's SM3 (megatron/optimizers.py), dense: one accumulator per dimension (a row and a column cover
    for a matrix), the update g / sqrt(min of the covers + g^2); no weight decay."""
    w = start.double()
    shape = w.shape
    accs = [torch.zeros([1] * i + [n] + [1] * (len(shape) - 1 - i), dtype=torch.float64) for i, n in enumerate(shape)]
    m = 0.0
    for g in grads:
        g = g.double()
        nu = accs[0].clone()
        for acc in accs[1:]:
            nu = torch.minimum(nu, acc)
        nu = (beta * nu if beta > 0 else nu) + (1 - beta) * g * g
        for i in range(len(accs)):
            reduced = nu
            for d in range(len(shape)):
                if d != i:
                    reduced = reduced.amax(dim=d, keepdim=True)
            accs[i] = torch.maximum(accs[i], reduced) if beta > 0 else reduced
        update = g / (nu + eps).sqrt()
        if momentum > 0:
            update = (1 - momentum) * update + momentum * m
            m = update
        w = w - lr * update
    return w
