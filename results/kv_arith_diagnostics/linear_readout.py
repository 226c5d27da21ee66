# Closed-form least squares from m_A's layer-L state to the change of m_B's input embedding that
# turns a key prompt into its numeric twin ('ab _ + cd _ =' -> '21 + 73 ='), fitted on held-in
# prompts, applied to held-out ones at the SAME position; teacher-forced exact match of m_B,
# relative error and nearest-digit accuracy at key (ones digit) and slot (tens digit) positions.
# Usage: PYTHONPATH=. .venv/bin/python results/kv_arith_diagnostics/linear_readout.py DIR_A DIR_B
import json, sys
import torch
torch.set_num_threads(1)
from calm_fast.demo import load_base
from calm_fast.tasks.kv_arith import KVArith, TaskConfig, collate

dA, dB = sys.argv[1], sys.argv[2]
task = KVArith(TaskConfig.from_dict(json.load(open(dA + '/task.json'))))
m_A, m_B = load_base(dA, 'm_A'), load_base(dB, 'm_B')


def pair(exs):
    t, m, _ = collate(exs)
    num = [task.example('numeric_arithmetic', [task.tok.itos[e.prompt[1]], task.tok.itos[e.prompt[4]]],
                        [task.tok.itos[e.prompt[3]]], e.value) for e in exs]
    return t, m, collate(num)[0]


def teacher_forced_exact(tok, mask, hook):
    h = m_B.tok_emb.register_forward_hook(hook)
    with torch.no_grad():
        pred = m_B(tok, validate=False)[:, :-1].argmax(-1)
    h.remove()
    return ((pred == tok[:, 1:]) | ~mask[:, :-1]).all(1).float().mean().item()


t, m, tn = pair(task.sample('kv_arithmetic', 'held_in', 4000, 'a'))
t2, m2, tn2 = pair(task.sample('kv_arithmetic', 'held_out', 300, 'b'))
digits = m_B.tok_emb.weight[task.tok.stoi['0']:task.tok.stoi['9'] + 1]
with torch.no_grad():
    for L in (1, 3):
        f = lambda tok: torch.cat([m_A(tok, taps={L}, validate=False)[1][L], torch.ones(*tok.shape, 1)], -1)
        X, X2 = f(t), f(t2)
        Y = m_B.tok_emb(tn) - m_B.tok_emb(t)
        W = torch.linalg.lstsq(X.reshape(-1, X.shape[-1]), Y.reshape(-1, Y.shape[-1])).solution
        P, Yt = X2 @ W, m_B.tok_emb(tn2) - m_B.tok_emb(t2)
        print(f'm_A layer {L}: m_B teacher-forced exact with the fit added {teacher_forced_exact(t2, m2, lambda mod, i, o: o + P):.3f}')
        for name, cols in (('key (ones digit)', [1, 4]), ('slot (tens digit)', [2, 5])):
            sel = torch.zeros_like(t2, dtype=torch.bool)
            sel[:, cols] = True
            rel = ((P - Yt)[sel].norm() / Yt[sel].norm()).item()
            got = (P + m_B.tok_emb(t2))[sel]
            nearest = (got[:, None, :] - digits[None]).norm(dim=-1).argmin(-1) + task.tok.stoi['0']
            print(f'  {name}: relative error {rel:.3f}, nearest digit embedding right {(nearest == tn2[sel]).float().mean().item():.3f}')
