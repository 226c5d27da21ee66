"""torch.compile(fullgraph=True) traces the composed model: forward and training step equal eager."""
import torch

import calm_fast as cf
from test_calm import make_calm, rand_tokens, V


def test_compiled_forward_and_training_step_match_eager():
    torch._dynamo.reset()
    calm = make_calm("aligned", n_aug=1)
    x = rand_tokens(2, 12)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, :3] = False

    def loss_fn(tokens, m):
        logits = calm(tokens[:, :-1], m)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, V), tokens[:, 1:].reshape(-1))

    eager = loss_fn(x, mask)
    eager.backward()
    eager_grads = [p.grad.clone() for p in calm.trainable_parameters()]
    calm.zero_grad(set_to_none=True)
    compiled = torch.compile(loss_fn, fullgraph=True)(x, mask)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for g, e in zip((p.grad for p in calm.trainable_parameters()), eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
