import torch, json, sys
torch.set_num_threads(2)
from calm_fast.demo import load_base
from calm_fast.tasks.kv_arith import *
d='/tmp/nb'
task=KVArith(TaskConfig.from_dict(json.load(open(d+'/task.json'))))
m_A=load_base(d,'m_A'); m_B=load_base(d,'m_B')
def tf(tok,mask,hook=None):
    h=m_B.tok_emb.register_forward_hook(hook) if hook else None
    with torch.no_grad(): lg=m_B(tok,validate=False)
    if h: h.remove()
    pred=lg[:,:-1].argmax(-1); return ((pred==tok[:,1:])|~mask[:,:-1]).all(1).float().mean().item()
ex=task.sample('numeric_arithmetic','all',300,'x'); tok,mask,_=collate(ex)
print('m_B numeric TF exact', tf(tok,mask))
# closed form: embeddings at pos 1,2,4,5 of the numeric version
tr=task.sample('kv_arithmetic','held_in',3000,'a'); te=task.sample('kv_arithmetic',sys.argv[2],300,'b')
def pair(exs):
    t,m,_=collate(exs)
    num=[task.example('numeric_arithmetic',[task.tok.itos[e.prompt[1]],task.tok.itos[e.prompt[4]]],[task.tok.itos[e.prompt[3]]],e.value) for e in exs]
    tn,_,_=collate(num)
    return t,m,tn
import sys
LS=[int(x) for x in sys.argv[1].split(',')]
NORM=(lambda h: m_A.norm(h)) if len(sys.argv)>3 else (lambda h:h)
t,m,tn=pair(tr)
with torch.no_grad():
    _,ta=m_A(t,taps={0,1,2,3},validate=False)
    X=torch.cat([*[NORM(ta[l]) for l in LS],torch.ones(*ta[3].shape[:2],1)],-1); X=X.reshape(-1,X.shape[-1])
    Y=(m_B.tok_emb(tn)-m_B.tok_emb(t)).reshape(-1,m_B.cfg.dim)  # what must be added to the embedding
    W=torch.linalg.lstsq(X,Y).solution
t2,m2,tn2=pair(te)
with torch.no_grad(): _,ta2=m_A(t2,taps={0,1,2,3},validate=False)
X2=torch.cat([*[NORM(ta2[l]) for l in LS],torch.ones(*ta2[3].shape[:2],1)],-1)
print('numeric version of held-out TF', tf(tn2,m2))
print('closed-form linear oracle, held-out TF exact', tf(t2,m2,lambda mod,i,o:o+X2@W))
P=(X2@W)
Yt=(m_B.tok_emb(tn2)-m_B.tok_emb(t2)).detach()
sel=torch.zeros_like(t2,dtype=torch.bool); sel[:,[1,2,4,5]]=True
print('rel err at operand positions', ((P-Yt)[sel].norm()/Yt[sel].norm()).item(), 'elsewhere abs', (P-Yt)[~sel].norm(dim=-1).mean().item(), 'digit emb norm', m_B.tok_emb.weight[3:13].norm(dim=-1).mean().item())
for s in (0.0,0.1,0.2,0.4):
    n=torch.randn_like(Yt)*s*Yt[sel].norm(dim=-1).mean()/Yt.shape[-1]**0.5
    print('exact + noise',s, tf(t2,m2,lambda mod,i,o:o+Yt+n*sel[...,None]))
print('oracle only at operand positions', tf(t2,m2,lambda mod,i,o:o+P*sel[...,None]))
