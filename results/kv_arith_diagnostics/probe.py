import torch, sys
torch.set_num_threads(1)
from calm_fast.demo import load_base
from calm_fast.tasks.kv_arith import *
d=sys.argv[1]
task=KVArith(TaskConfig.from_dict(__import__('json').load(open(d+'/task.json'))))
m_A=load_base(d,'m_A')
def feats(split,n,seed):
    ex=task.sample('kv_arithmetic',split,n,seed)
    toks=torch.tensor([e.prompt for e in ex])
    _,tap=m_A(toks,taps={0,1,2,3},validate=False)
    v1=torch.tensor([task.value[task.tok.itos[e.prompt[1]]] for e in ex])
    return tap,v1
tr,vtr=feats('held_in',3000,0); te,vte=feats('held_out',1000,1)
for L in range(4):
  for pos in (1,2):
    for name,tgt in (('d0',lambda v:v%10),('d1',lambda v:v//10),('v',lambda v:v)):
        X=torch.cat([tr[L][:,pos],torch.ones(len(vtr),1)],1); Xt=torch.cat([te[L][:,pos],torch.ones(len(vte),1)],1)
        k=int(tgt(vtr).max())+1
        Y=torch.nn.functional.one_hot(tgt(vtr),max(k,100)).float()
        W=torch.linalg.lstsq(X,Y).solution
        acc=((Xt@W).argmax(1)==tgt(vte)).float().mean().item()
        print(f"layer {L} pos {pos} {name}: held-out acc {acc:.2f}")
