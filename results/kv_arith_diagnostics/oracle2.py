# closed-form linear oracles: m_A layer-L states -> what must be added to m_B (embedding / after block b)
import torch, json, sys
torch.set_num_threads(1)
from calm_fast.demo import load_base
from calm_fast.tasks.kv_arith import *
dA,dB=sys.argv[1],sys.argv[2]
task=KVArith(TaskConfig.from_dict(json.load(open(dA+'/task.json'))))
m_A=load_base(dA,'m_A'); m_B=load_base(dB,'m_B')
def pair(exs):
    t,m,_=collate(exs)
    num=[task.example('numeric_arithmetic',[task.tok.itos[e.prompt[1]],task.tok.itos[e.prompt[4]]],[task.tok.itos[e.prompt[3]]],e.value) for e in exs]
    return t,m,collate(num)[0]
def tf(tok,mask,**kw):
    with torch.no_grad(): lg=m_B(tok,validate=False,**kw)
    pred=lg[:,:-1].argmax(-1); return ((pred==tok[:,1:])|~mask[:,:-1]).all(1).float().mean().item()
t,m,tn=pair(task.sample('kv_arithmetic','held_in',4000,'a')); t2,m2,tn2=pair(task.sample('kv_arithmetic','held_out',300,'b'))
L=int(sys.argv[3])
with torch.no_grad():
    X=m_A(t,taps={L},validate=False)[1][L]; X=torch.cat([X,torch.ones(*X.shape[:2],1)],-1)
    X2=m_A(t2,taps={L},validate=False)[1][L]; X2=torch.cat([X2,torch.ones(*X2.shape[:2],1)],-1)
    for where in ['emb',0,1]:
        if where=='emb':
            Y=m_B.tok_emb(tn)-m_B.tok_emb(t)
        else:
            Y=m_B(tn,taps={where},validate=False)[1][where]-m_B(t,taps={where},validate=False)[1][where]
        W=torch.linalg.lstsq(X.reshape(-1,X.shape[-1]),Y.reshape(-1,Y.shape[-1])).solution
        P=X2@W
        if where=='emb':
            h=m_B.tok_emb.register_forward_hook(lambda mod,i,o:o+P); acc=tf(t2,m2); h.remove()
        else:
            acc=tf(t2,m2,after_block={where:lambda h:h+P})
        print(f'm_A layer {L} -> m_B {where}: held-out teacher-forced exact {acc:.3f}')
