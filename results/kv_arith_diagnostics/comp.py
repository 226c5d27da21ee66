import torch, sys, json, time
torch.set_num_threads(int(sys.argv[5]) if len(sys.argv)>5 else 1)
from calm_fast.demo import *
from calm_fast.tasks.kv_arith import *
dA, dB = sys.argv[1].split(',')
task=KVArith(TaskConfig.from_dict(json.load(open(dA+'/task.json'))))
m_A=load_base(dA,'m_A'); m_B=load_base(dB,'m_B')
mapping=json.loads(sys.argv[2]); steps=int(sys.argv[3]); lr=float(sys.argv[4])
tcfg=TrainConfig(steps=steps,batch_size=32,lr=lr,warmup=100,eval_every=max(steps//4,1),eval_samples=100,progress=False,log_every=50)
out=f"/tmp/comp_{sys.argv[6]}_{sys.argv[2].replace(' ','')}_{steps}_{lr}"
t0=time.time()
v=train_composition(task,m_A,m_B,"calm","kv_arithmetic",tcfg,[tuple(p) for p in mapping],out,"cpu",literal_fraction=float(sys.argv[7]) if len(sys.argv)>7 else 0.0)
for l in open(out+'/metrics.jsonl'):
    r=json.loads(l)
    if 'eval' in r or r['step']%200==0: print(r)
print(evaluate_row(v.model,task,200), time.time()-t0)
