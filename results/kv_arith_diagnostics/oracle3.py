import torch, json, sys
torch.set_num_threads(1)
from calm_fast.demo import load_base
from calm_fast.tasks.kv_arith import *
d=sys.argv[1]
task=KVArith(TaskConfig.from_dict(json.load(open(d+'/task.json'))))
m_A=load_base(d,'m_A'); m_B=load_base(d,'m_B')
def pair(exs):
    t,m,_=collate(exs)
    num=[task.example('numeric_arithmetic',[task.tok.itos[e.prompt[1]],task.tok.itos[e.prompt[4]]],[task.tok.itos[e.prompt[3]]],e.value) for e in exs]
    return t,m,collate(num)[0]
def tf(tok,mask,hook):
    h=m_B.tok_emb.register_forward_hook(hook)
    with torch.no_grad(): lg=m_B(tok,validate=False)
    h.remove(); pred=lg[:,:-1].argmax(-1); return ((pred==tok[:,1:])|~mask[:,:-1]).all(1).float().mean().item()
t,m,tn=pair(task.sample('kv_arithmetic','held_in',4000,'a')); t2,m2,tn2=pair(task.sample('kv_arithmetic','held_out',300,'b'))
sel=torch.zeros_like(t2,dtype=torch.bool); sel[:,[1,2,4,5]]=True
with torch.no_grad():
  for L in (0,3):
    X=m_A(t,taps={L},validate=False)[1][L]; X=torch.cat([X,torch.ones(*X.shape[:2],1)],-1)
    X2=m_A(t2,taps={L},validate=False)[1][L]; X2=torch.cat([X2,torch.ones(*X2.shape[:2],1)],-1)
    Y=m_B.tok_emb(tn); W=torch.linalg.lstsq(X.reshape(-1,X.shape[-1]),Y.reshape(-1,Y.shape[-1])).solution
    P=X2@W; Yt=m_B.tok_emb(tn2)
    print(L,'rel err of E[d] fit at operands',((P-Yt)[sel].norm()/Yt[sel].norm()).item())
    print(L,'replace operand embeddings by the linear fit', tf(t2,m2,lambda mod,i,o: torch.where(sel[...,None],P,o)))
    print(L,'keep key embedding, add the fit', tf(t2,m2,lambda mod,i,o: o+P*sel[...,None]))
