"""Flax (linen) classifiers for the MNIST warm-up, wrapped as pure
``apply_fn(params, x) -> logits``.

Inputs are ``float32 (N, 28, 28, 1)`` pixels in [0, 1] (``ldjax.data.mnist.to_float``); outputs
are logits ``z = h_theta(x)`` of shape ``(N, 10)`` (the paper's ``V = 10`` classes).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["LeNet", "MLP", "make_model", "init_params", "apply_fn", "param_count", "INPUT_SHAPE"]

INPUT_SHAPE = (28, 28, 1)


class LeNet(nn.Module):
    """The paper's LeNet (Figure 1): 29,624 parameters for 28x28x1 inputs.

    conv 1->6 5x5 pad 2, tanh, avgpool 2  -> (N, 14, 14, 6)
    conv 6->16 5x5 VALID, tanh, avgpool 2 -> (N, 5, 5, 16) -> flatten 400
    Dense 60, tanh -> Dense 42, tanh -> Dense 10 (logits).

    Flattening is in NHWC order (PyTorch flattens NCHW); this only permutes the first Dense
    layer's rows and changes nothing else.
    """

    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(6, (5, 5), padding=((2, 2), (2, 2)), name="conv1")(x)
        x = nn.avg_pool(jnp.tanh(x), (2, 2), strides=(2, 2))
        x = nn.Conv(16, (5, 5), padding="VALID", name="conv2")(x)
        x = nn.avg_pool(jnp.tanh(x), (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = jnp.tanh(nn.Dense(60, name="fc1")(x))
        x = jnp.tanh(nn.Dense(42, name="fc2")(x))
        return nn.Dense(self.num_classes, name="fc3")(x)


class MLP(nn.Module):
    """Flatten -> (Dense h, tanh) for h in ``hidden`` -> Dense ``num_classes``."""

    hidden: Sequence[int] = (512, 512)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        for i, h in enumerate(self.hidden):
            x = jnp.tanh(nn.Dense(h, name=f"fc{i + 1}")(x))
        return nn.Dense(self.num_classes, name=f"fc{len(self.hidden) + 1}")(x)


def make_model(name: str = "lenet", **kwargs) -> nn.Module:
    """``"lenet"`` -> :class:`LeNet`, ``"mlp"`` -> :class:`MLP` (kwargs go to the module)."""
    models = {"lenet": LeNet, "mlp": MLP}
    if name not in models:
        raise ValueError(f"model must be one of {sorted(models)}, got {name!r}")
    if name == "mlp" and "hidden" in kwargs:
        kwargs["hidden"] = tuple(kwargs["hidden"])
    return models[name](**kwargs)


def _param_shapes(model: nn.Module, input_shape: tuple):
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]


def init_params(
    model: nn.Module, key: jax.Array, input_shape=INPUT_SHAPE, *, scheme: str = "torch"
):
    """The ``'params'`` collection of ``model`` for inputs ``(N, *input_shape)``.

    Schemes:
      ``"torch"`` (default): PyTorch's default for ``nn.Conv2d`` / ``nn.Linear`` (the paper's
        experiments are in PyTorch; its MNIST code is not public): every kernel and bias of a
        layer ~ ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` with ``fan_in = prod(kernel.shape[:-1])``
        (in_features, or kh*kw*in_channels). All values come from one ``jax.random.uniform`` draw of
        length ``param_count`` cut in ``tree_leaves`` order, so it compiles once and fast on CPU.
        Needs every layer to hold a ``kernel`` (true for :class:`LeNet` and :class:`MLP`).

      ``"flax"``: ``model.init`` (flax defaults: LeCun-normal kernels, zero biases).
    """
    shape = tuple(int(d) for d in input_shape)
    if scheme == "flax":
        return jax.jit(lambda k: model.init(k, jnp.zeros((1, *shape), jnp.float32)))(key)["params"]
    if scheme != "torch":
        raise ValueError(f"scheme must be 'torch' or 'flax', got {scheme!r}")
    shapes = _param_shapes(model, shape)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    bounds = []
    for path, leaf in leaves:
        layer = shapes
        for k in path[:-1]:
            layer = layer[k.key]
        if "kernel" not in layer:
            raise ValueError(
                f"scheme='torch' needs a 'kernel' in layer {jax.tree_util.keystr(path[:-1])}; "
                "use scheme='flax'"
            )
        fan_in = int(np.prod(layer["kernel"].shape[:-1]))
        bounds.append((tuple(leaf.shape), float(1.0 / np.sqrt(fan_in))))
    out = _uniform_pieces(key, tuple(bounds))
    return jax.tree_util.tree_unflatten(treedef, out)


@functools.partial(jax.jit, static_argnums=1)
def _uniform_pieces(key, spec):
    """One ``U(-1, 1)`` draw cut into pieces: ``spec = ((shape, bound), ...)``."""
    total = sum(int(np.prod(sh)) for sh, _ in spec)
    u = jax.random.uniform(key, (total,), jnp.float32, -1.0, 1.0)
    out, off = [], 0
    for sh, b in spec:
        n = int(np.prod(sh))
        out.append(u[off : off + n].reshape(sh) * jnp.float32(b))
        off += n
    return out


def apply_fn(model: nn.Module) -> Callable:
    """Pure ``f(params, x) -> logits``: ``x (N, 28, 28, 1) -> (N, 10)``; an unbatched
    ``x (28, 28, 1)`` gives ``(10,)`` (handy under ``jax.vmap``)."""

    def f(params, x):
        x = jnp.asarray(x)
        if x.ndim == 3:
            return model.apply({"params": params}, x[None])[0]
        if x.ndim != 4:
            raise ValueError(f"x must have shape (N, H, W, C) or (H, W, C), got {x.shape}")
        return model.apply({"params": params}, x)

    return f


def param_count(params) -> int:
    """Total number of scalars in a parameter pytree."""
    return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
