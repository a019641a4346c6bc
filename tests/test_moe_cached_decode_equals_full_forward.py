"""Generation with an MoE model: decoding token by token with the KV cache gives the logits of the full forward
(evaluation routes by top-k for both routers, so the route of a token does not depend on the others in its batch).
fp32: the two paths differ only in summation order, far below 1e-4 on logits of size about 1."""

import pytest
import torch

from conftest import tiny_keys
from neox_fork.config.loading import from_dict
from neox_fork.model.transformer import build_model


@pytest.mark.parametrize("router", ["sinkhorn", "topk"])
def test_cached_decode_equals_full_forward(one_process, router):
    c = from_dict(tiny_keys(moe_num_experts=4, moe_top_k=2, moe_router_type=router))
    torch.manual_seed(0)
    model = build_model(c).eval()
    tokens = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_kv_cache()
        steps = [model(tokens[:, :4], kv_cache=cache)]
        steps += [model(tokens[:, i:i + 1], kv_cache=cache) for i in range(4, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)
