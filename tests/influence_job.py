"""A small influence job run as a subprocess by tests/test_influence.py: on N host devices, as one
of several processes (jax.distributed + gloo on 127.0.0.1), or to be killed and resumed.

    python tests/influence_job.py OUT [--devices 8] [--o-devices 2] [--n-u 37]
        [--process-id 0 --num-processes 2 --coordinator 127.0.0.1:PORT] [--method factored]

Writes the results into OUT (an influence store) and, with ``--npz``, the arrays to that file.
"""

import argparse
import sys

import jax

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--devices", type=int, default=1)
ap.add_argument("--o-devices", type=int, default=1)
ap.add_argument("--n-u", type=int, default=37)
ap.add_argument("--chunk", type=int, default=8)
ap.add_argument("--process-id", type=int, default=None)
ap.add_argument("--num-processes", type=int, default=1)
ap.add_argument("--coordinator", default=None)
ap.add_argument("--npz", default=None)
ap.add_argument("--model", choices=("mlp", "lenet"), default="mlp")
ap.add_argument("--method", default="auto", help="'factored': without kernel norms")
args = ap.parse_args()

jax.config.update("jax_num_cpu_devices", args.devices)
if args.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        args.coordinator, num_processes=args.num_processes, process_id=args.process_id
    )

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import ldjax  # noqa: E402
from ldjax import losses, zoo  # noqa: E402

rng = np.random.default_rng(0)
sizes = (20, 32, 10)
params = {
    f"dense_{k}": {
        "kernel": np.asarray(rng.normal(size=(a, b)) / np.sqrt(a), np.float32),
        "bias": np.asarray(0.1 * rng.normal(size=b), np.float32),
    }
    for k, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))
}
x_u = np.asarray(rng.normal(size=(args.n_u, 20)), np.float32)
y_u = rng.integers(0, 10, args.n_u)
x_o = np.asarray(rng.normal(size=(11, 20)), np.float32)
y_o = rng.integers(0, 10, 11)
apply_fn = zoo.mlp_apply
if args.model == "lenet":  # a conv net: per-example conv gradients on several devices
    from ldjax.data.mnist import load_default, to_float
    from ldjax.mnist.models import apply_fn as lenet_apply
    from ldjax.mnist.models import init_params, make_model

    model = make_model("lenet")
    apply_fn = lenet_apply(model)
    params = init_params(model, jax.random.PRNGKey(0))
    xi, yi = load_default("train")
    xi = to_float(xi)
    x_u, y_u = xi[: args.n_u], yi[: args.n_u]
    x_o, y_o = xi[500:511], yi[500:511]
mesh = ldjax.default_mesh(o_devices=args.o_devices)
inf = ldjax.influence(
    apply_fn,
    params,
    jnp.asarray(x_u),
    jnp.asarray(x_o),
    losses.sft,
    eta=0.05,
    loss_kwargs=dict(targets=y_u),
    targets_o=y_o,
    chunk_size=args.chunk,
    out=args.out,
    mesh=mesh,
    kernel_norms=args.method != "factored",
    method=args.method,
    audit_size=4,
)
# the job ran where it was asked to, and what it returns is whole: a failed check exits non-zero,
# which fails the calling test before it compares any number
assert jax.device_count() == args.devices * args.num_processes, jax.device_count()
want = {"u": args.devices * args.num_processes // args.o_devices}
want.update({"o": args.o_devices} if args.o_devices > 1 else {})
assert dict(mesh.shape) == want, (dict(mesh.shape), want)
assert inf.delta.shape == (args.n_u, x_o.shape[0], 10), inf.delta.shape
assert args.method == "auto" or inf.method == args.method, inf.method
if args.method != "factored":
    assert inf.kernel_fro.shape == (args.n_u, x_o.shape[0]), inf.kernel_fro.shape
assert np.isfinite(np.asarray(inf.delta)).all() and np.isfinite(inf.audit["rel_error"]).all()
if args.npz and jax.process_index() == 0:
    np.savez(
        args.npz,
        delta=np.asarray(inf.delta),
        delta_loss_o=np.asarray(inf.delta_loss_o),
        kernel_fro=np.asarray(inf.kernel_fro if inf.kernel_fro is not None else np.nan),
        audit=inf.audit["rel_error"],
    )
print("done", jax.process_index(), jax.device_count(), dict(mesh.shape), flush=True)
if args.num_processes > 1:
    jax.distributed.shutdown()
sys.exit(0)
