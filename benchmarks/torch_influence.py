"""What a PyTorch user writes for TracIn at one checkpoint: per-example gradients with
``torch.func.vmap(grad)`` and one matmul, ``M[u, o] = −η g_oᵀ g_u`` (the first-order change of
probe o's loss after one SGD step on u). Run by ``benchmarks/bench_influence.py`` in a separate
venv that has torch (``python3 -m venv /work/wt/torchvenv && /work/wt/torchvenv/bin/pip install
torch==2.13.0 numpy``)::

    torchvenv/bin/python benchmarks/torch_influence.py IN.npz OUT.npz [--repeats 3] [--chunk 64]

``IN.npz`` holds the MLP's weights (``w0, b0, w1, b1, ...``: ``x @ w + b``, tanh between layers,
the layout of ``ldjax.zoo.mlp_apply`` / flax ``Dense``), ``x_u, y_u, x_o, y_o`` and ``eta``.
``OUT.npz`` gets ``M (N_u, N_o)`` and the wall times; a JSON line with the times goes to stdout.
U goes through in chunks of ``--chunk`` (its per-example gradients would not fit at once), the
probes' gradients are computed once.
"""

import argparse
import json
import time

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

ap = argparse.ArgumentParser()
ap.add_argument("inp")
ap.add_argument("out")
ap.add_argument("--repeats", type=int, default=3)
ap.add_argument("--chunk", type=int, default=64)
args = ap.parse_args()

z = np.load(args.inp)
n_layers = sum(1 for k in z.files if k.startswith("w"))


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(
            torch.nn.Linear(*z[f"w{i}"].shape) for i in range(n_layers)
        )

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.tanh(x)
        return x


model = MLP()
with torch.no_grad():
    for i, layer in enumerate(model.layers):
        layer.weight.copy_(torch.from_numpy(z[f"w{i}"].T.copy()))
        layer.bias.copy_(torch.from_numpy(z[f"b{i}"]))
params = {k: v.detach() for k, v in model.named_parameters()}
x_u, y_u = torch.from_numpy(z["x_u"]), torch.from_numpy(z["y_u"]).long()
x_o, y_o = torch.from_numpy(z["x_o"]), torch.from_numpy(z["y_o"]).long()
eta = float(z["eta"])


def loss(p, x, y):
    logits = functional_call(model, p, (x[None],))
    return torch.nn.functional.cross_entropy(logits, y[None])


per_example = vmap(grad(loss), in_dims=(None, 0, 0))


def flat(g):
    return torch.cat([g[k].reshape(g[k].shape[0], -1) for k in params], dim=1)


def tracin():
    g_o = flat(per_example(params, x_o, y_o))  # (N_o, P)
    out = torch.empty(x_u.shape[0], x_o.shape[0])
    for a in range(0, x_u.shape[0], args.chunk):
        g_u = flat(per_example(params, x_u[a : a + args.chunk], y_u[a : a + args.chunk]))
        out[a : a + args.chunk] = -eta * g_u @ g_o.T
    return out


with torch.no_grad():
    t = time.perf_counter()
    m = tracin()  # the first call (nothing to compile: eager)
    first = time.perf_counter() - t
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        m = tracin()
        times.append(time.perf_counter() - t)
np.savez(args.out, M=m.numpy(), times=np.asarray(times), first=first)
print(
    json.dumps(
        dict(
            torch=torch.__version__,
            threads=torch.get_num_threads(),
            first=first,
            times=times,
            median=float(np.median(times)),
        )
    )
)
