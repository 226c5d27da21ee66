"""python3 check.py: import onnxruntime, run a small graph on the CUDA EP (ops whose kernels live in
the fatbin) and compare it with the CPU EP. Prints ORTGPU CHECK OK on success."""
import numpy as np
import onnx  # noqa: F401  (onnx.helper below)
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper as h

print(ort.__file__, ort.__version__, ort.get_device(), ort.get_available_providers())
assert 'CUDAExecutionProvider' in ort.get_available_providers()
X = h.make_tensor_value_info('x', T.FLOAT, [64, 256])
Y = h.make_tensor_value_info('y', T.FLOAT, None)
W = h.make_tensor('w', T.FLOAT, [256, 256], np.random.RandomState(0).randn(256 * 256).astype(np.float32) * .05)
G = h.make_tensor('g', T.FLOAT, [256], np.ones(256, np.float32))
B = h.make_tensor('b', T.FLOAT, [256], np.zeros(256, np.float32))
nodes = [h.make_node('MatMul', ['x', 'w'], ['m']),
         h.make_node('Relu', ['m'], ['r']),
         h.make_node('Add', ['r', 'x'], ['a']),
         h.make_node('LayerNormalization', ['a', 'g', 'b'], ['l'], axis=-1),
         h.make_node('Softmax', ['l'], ['s'], axis=-1),
         h.make_node('Transpose', ['s'], ['t']),
         h.make_node('ReduceSum', ['t'], ['y'], keepdims=0)]
model = h.make_model(h.make_graph(nodes, 'g', [X], [Y], [W, G, B]), opset_imports=[h.make_opsetid('', 17)])
model.ir_version = 8
x = np.random.RandomState(1).randn(64, 256).astype(np.float32)
options = ort.SessionOptions()
options.log_severity_level = 2
gpu = ort.InferenceSession(model.SerializeToString(), options, providers=['CUDAExecutionProvider', 'CPUExecutionProvider'])
cpu = ort.InferenceSession(model.SerializeToString(), providers=['CPUExecutionProvider'])
print('session providers:', gpu.get_providers())
assert gpu.get_providers()[0] == 'CUDAExecutionProvider'
y_gpu = gpu.run(None, {'x': x})[0]
y_cpu = cpu.run(None, {'x': x})[0]
err = float(np.abs(y_gpu - y_cpu).max())
print('max |gpu-cpu| =', err)
assert err < 1e-3
print('ORTGPU CHECK OK')
