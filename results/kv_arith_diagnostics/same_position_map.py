# Diagnostic only: inject a map of m_A's state at the SAME position into m_B (no attention),
# trained with Adam on held-in keys; prints teacher-forced exact match on held-out keys.
#   same_position_map.py LA LB LR STEPS DIR [linear|mlp] [block|embedding]
# LA: m_A layer tapped; LB: m_B block after which the map is added ("block"), ignored with
# "embedding" (added to m_B's token embeddings). DIR: a bases directory (task.json, m_A, m_B).
import json
import sys

import torch

from calm_fast.demo import load_base
from calm_fast.tasks.kv_arith import KVArith, TaskConfig, collate
from calm_fast.train import answer_loss

torch.set_num_threads(1)
torch.manual_seed(0)
la, lb, lr, steps, d = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
kind = sys.argv[6] if len(sys.argv) > 6 else "linear"
at = sys.argv[7] if len(sys.argv) > 7 else "block"
task = KVArith(TaskConfig.from_dict(json.load(open(d + "/task.json"))))
m_A, m_B = load_base(d, "m_A"), load_base(d, "m_B")
if kind == "linear":
    P = torch.nn.Linear(m_A.cfg.dim, m_B.cfg.dim)
    torch.nn.init.zeros_(P.weight)
    torch.nn.init.zeros_(P.bias)
else:
    P = torch.nn.Sequential(torch.nn.Linear(m_A.cfg.dim, 256), torch.nn.GELU(), torch.nn.Linear(256, m_B.cfg.dim))
    torch.nn.init.zeros_(P[2].weight)
opt = torch.optim.Adam(P.parameters(), lr=lr)


def fwd(tok):
    with torch.no_grad():
        _, tap = m_A(tok, taps={la}, validate=False)
    if at == "block":
        return m_B(tok, after_block={lb: lambda h: h + P(tap[la])}, validate=False)
    hook = m_B.tok_emb.register_forward_hook(lambda m, i, o: o + P(tap[la]))
    try:
        return m_B(tok, validate=False)
    finally:
        hook.remove()


for step in range(steps):
    ex = task.sample("kv_arithmetic", "held_in", 32, f"s{step}")
    tok, mask, _ = collate(ex, task.tok.pad_id)
    loss = answer_loss(fwd(tok), tok, mask)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 100 == 99:
        print(step, loss.item(), flush=True)
ex = task.sample("kv_arithmetic", "held_out", 200, "ev")
tok, mask, _ = collate(ex, task.tok.pad_id)
with torch.no_grad():
    lg = fwd(tok)
pred = lg[:, :-1].argmax(-1)
ok = ((pred == tok[:, 1:]) | ~mask[:, :-1]).all(1).float().mean()
print("teacher-forced held-out exact", ok.item())
