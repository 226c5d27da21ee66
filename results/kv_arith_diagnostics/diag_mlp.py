# Diagnostic only: inject a LINEAR map of m_A's state at the SAME position (no attention).
import torch, sys, json
torch.set_num_threads(1); torch.manual_seed(0)
from calm_fast.demo import *
from calm_fast.tasks.kv_arith import *
from calm_fast.train import answer_loss
d=sys.argv[5]
task=KVArith(TaskConfig.from_dict(json.load(open(d+'/task.json'))))
m_A=load_base(d,'m_A'); m_B=load_base(d,'m_B')
la,lb=int(sys.argv[1]),int(sys.argv[2])
P=torch.nn.Sequential(torch.nn.Linear(m_A.cfg.dim,256),torch.nn.GELU(),torch.nn.Linear(256,m_B.cfg.dim)); torch.nn.init.zeros_(P[2].weight)
opt=torch.optim.Adam(P.parameters(),lr=float(sys.argv[3]))
def fwd(tok):
    with torch.no_grad(): _,tap=m_A(tok,taps={la},validate=False)
    return m_B(tok,after_block={lb:lambda h:h+P(tap[la])},validate=False)
for step in range(int(sys.argv[4])):
    ex=task.sample('kv_arithmetic','held_in',32,f's{step}')
    tok,mask,_=collate(ex,task.tok.pad_id)
    loss=answer_loss(fwd(tok),tok,mask); opt.zero_grad(); loss.backward(); opt.step()
    if step%100==99: print(step,loss.item(),flush=True)
ex=task.sample('kv_arithmetic','held_out',200,'ev')
tok,mask,_=collate(ex,task.tok.pad_id)
with torch.no_grad(): lg=fwd(tok)
pred=lg[:,:-1].argmax(-1); ok=((pred==tok[:,1:])|~mask[:,:-1]).all(1).float().mean()
print('teacher-forced held-out exact',ok.item())
