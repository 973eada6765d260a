"""ldjax.influence: every (u, o) pair equals a per-u ldjax.decompose (float64 to 1e-10); the y⁺
and y⁻ terms, ‖K‖_F and tr K, the audit; the on-disk store resumes, refuses a changed job, and ends
bitwise equal after a crash; 8 host devices and 2 processes give the numbers of one device."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import precision, rel, small_model

import ldjax
from ldjax import losses, zoo
from ldjax._src import influence as influence_module

JOB = Path(__file__).with_name("influence_job.py")


def _seq_readout(d, y_o, m_o, per_token=False):
    lin = np.take_along_axis(np.asarray(d.delta_logp_linear), np.asarray(y_o)[..., None], -1)[
        ..., 0
    ]
    lin = lin * np.asarray(m_o)
    return lin if per_token else lin.sum(-1)


@pytest.mark.parametrize("method", ["gram", "jvp", "jvp-bounded"])
def test_classifier_pairs_equal_decompose_and_kernel_norms_equal_entk(method, monkeypatch):
    mapped = []
    budget = {}
    if method == "jvp-bounded":  # a budget for one direction at a time: lax.map over them
        method, budget = "jvp", dict(memory_budget=1)
        real_map = jax.lax.map
        monkeypatch.setattr(
            jax.lax, "map", lambda *a, **k: mapped.append(k["batch_size"]) or real_map(*a, **k)
        )
    with precision("float64"):
        f, p, x_o, x_u = small_model("mlp", "float64")
        x_u = jnp.concatenate([x_u, 0.5 * x_u[::-1] + 0.1])
        y_u = jnp.array([0, 3, 4, 1])
        y_o = jnp.array([2, 2, 0])
        inf = ldjax.influence(
            f,
            p,
            x_u,
            x_o,
            losses.sft,
            eta=0.01,
            loss_kwargs=dict(targets=y_u),
            targets_o=y_o,
            method=method,
            chunk_size=3,
            kernel_norms=method == "gram",
            **budget,
        )
        assert inf.delta.shape == (4, 3, 5) and inf.readout == "class"
        assert mapped == ([1] if budget else [])  # traced once: the chunk program
        for u in range(4):
            d = ldjax.decompose(
                f,
                p,
                x_o,
                x_u[u : u + 1],
                losses.sft,
                eta=0.01,
                loss_kwargs=dict(targets=y_u[u : u + 1]),
            )
            assert rel(inf.delta[u], d.delta_logp_linear) < 1e-10
        # the first-order change of each probe's own cross-entropy is −Δ log π(y_o)
        np.testing.assert_allclose(
            inf.delta_loss_o, -np.asarray(inf.delta)[:, np.arange(3), np.asarray(y_o)]
        )
        if method == "gram":
            K = np.asarray(ldjax.entk(f, p, x_o, x_u))  # (N_o, N_u, V, V)
            assert rel(inf.kernel_fro, np.linalg.norm(K, axis=(-2, -1)).T) < 1e-10
            assert rel(inf.kernel_trace, np.trace(K, axis1=-2, axis2=-1).T) < 1e-10


def test_float32_pairs_equal_decompose():
    f, p, x_o, x_u = small_model("mlp", "float32")
    y_u = jnp.array([1, 2])
    inf = ldjax.influence(f, p, x_u, x_o, losses.sft, eta=0.05, loss_kwargs=dict(targets=y_u))
    for u in range(2):
        d = ldjax.decompose(
            f,
            p,
            x_o,
            x_u[u : u + 1],
            losses.sft,
            eta=0.05,
            loss_kwargs=dict(targets=y_u[u : u + 1]),
        )
        assert rel(inf.delta[u], d.delta_logp_linear) < 1e-5


@pytest.mark.slow  # > 10 s on 2 cores
@pytest.mark.parametrize(
    "methods", [(("gram", "jvp"), "auto"), (("factored", "factored"), "factored")], ids=str
)
def test_sequences_sum_per_token_and_dpo_terms_equal_decompose(methods):
    (seq_method, token_method), dpo_method = methods
    with precision("float64"):
        f, p, x_o, x_u = small_model("transformer", "float64")
        n, t = x_u.shape
        rng = np.random.default_rng(1)
        y_u, m_u = jnp.asarray(rng.integers(0, 13, (n, t))), jnp.asarray(rng.random((n, t)) > 0.3)
        y_o, m_o = jnp.asarray(rng.integers(0, 13, (2, t))), jnp.asarray(rng.random((2, t)) > 0.4)
        kw = dict(targets=y_u, mask=m_u)
        for per_token, method in ((False, seq_method), (True, token_method)):
            inf = ldjax.influence(
                f,
                p,
                x_u,
                x_o,
                losses.sft,
                eta=1e-3,
                loss_kwargs=kw,
                targets_o=y_o,
                mask_o=m_o,
                per_token=per_token,
                method=method,
            )
            assert inf.delta.shape == ((n, 2, t) if per_token else (n, 2))
            for u in range(n):
                d = ldjax.decompose(
                    f,
                    p,
                    x_o,
                    x_u[u : u + 1],
                    losses.sft,
                    eta=1e-3,
                    loss_kwargs=dict(targets=y_u[u : u + 1], mask=m_u[u : u + 1]),
                )
                assert rel(inf.delta[u], _seq_readout(d, y_o, m_o, per_token)) < 1e-10
        # DPO: the y⁺ and y⁻ terms apart, each equal to decompose's
        x_neg = jnp.asarray(rng.integers(0, 13, (n, t)))
        kw = dict(
            targets_pos=y_u,
            targets_neg=y_u[::-1],
            mask_pos=m_u,
            mask_neg=m_u[::-1],
            ref_logp_pos=jnp.asarray(rng.normal(size=n)),
            ref_logp_neg=jnp.asarray(rng.normal(size=n)),
            beta=0.1,
        )
        inf = ldjax.influence(
            f,
            p,
            (x_u, x_neg),
            x_o,
            losses.dpo,
            eta=1e-3,
            loss_kwargs=kw,
            targets_o=y_o,
            mask_o=m_o,
            audit_size=2,
            method=dpo_method,
        )
        for u in range(n):
            kw1 = {k: (v[u : u + 1] if np.ndim(v) else v) for k, v in kw.items()}
            d = ldjax.decompose(
                f, p, x_o, (x_u[u : u + 1], x_neg[u : u + 1]), losses.dpo, eta=1e-3, loss_kwargs=kw1
            )
            pos, neg = (
                np.sum(
                    np.take_along_axis(np.asarray(t_), np.asarray(y_o)[..., None], -1)[..., 0]
                    * np.asarray(m_o),
                    -1,
                )
                for t_ in d.delta_logp_linear_terms
            )
            assert rel(inf.terms[0][u], pos) < 1e-10 and rel(inf.terms[1][u], neg) < 1e-10
            assert rel(inf.delta[u], pos + neg) < 1e-10
        # the audit: a real step on u against the prediction; small at this η, and it is measured
        assert inf.audit["indices"].shape == (2,) and np.all(inf.audit["rel_error"] < 0.05)
        assert inf.audit["median_rel_error"] == pytest.approx(np.median(inf.audit["rel_error"]))


def test_audit_error_grows_with_eta():
    f, p, x_o, x_u = small_model("mlp", "float32")
    y_u = jnp.array([1, 2])
    errs = []
    for eta in (1e-3, 1e-2, 1e-1):
        inf = ldjax.influence(
            f, p, x_u, x_o, losses.sft, eta=eta, loss_kwargs=dict(targets=y_u), audit_size=2
        )
        errs.append(inf.audit["median_rel_error"])
    # the relative error of a first-order prediction is O(η): about 10× per 10× η
    assert 5 < errs[1] / errs[0] < 20 and 5 < errs[2] / errs[1] < 20 and errs[0] < 0.005


def _job(tmp_path, out, **kw):
    f, p, x_o, x_u = small_model("mlp", "float32")
    rng = np.random.default_rng(3)
    x_u = jnp.asarray(rng.normal(size=(23, x_u.shape[1])), jnp.float32)
    y_u = rng.integers(0, 5, 23)
    args = dict(
        eta=0.05,
        loss_kwargs=dict(targets=y_u),
        targets_o=np.array([0, 1, 2]),
        chunk_size=4,
        out=None if out is None else str(tmp_path / out),
    )
    args.update(kw)
    return ldjax.influence(f, p, x_u, x_o, losses.sft, **args)


def test_store_resumes_after_a_crash_and_refuses_a_changed_job(tmp_path, monkeypatch):
    ref = _job(tmp_path, None)
    calls = []
    program = influence_module._chunk_fn

    def counting(spec):
        fn = program(spec)

        def run(*a):
            calls.append(1)
            if len(calls) == 3 and os.environ.get("CRASH") == "1":
                raise KeyboardInterrupt  # a crash in the middle of the job
            return fn(*a)

        return run

    monkeypatch.setattr(influence_module, "_chunk_fn", counting)
    monkeypatch.setenv("CRASH", "1")
    with pytest.raises(KeyboardInterrupt):
        _job(tmp_path, "store")
    assert len(list((tmp_path / "store" / "done").iterdir())) == 2
    assert not ldjax.load_influence(tmp_path / "store")["done"]
    monkeypatch.setenv("CRASH", "0")
    calls.clear()
    again = _job(tmp_path, "store")
    assert len(calls) == 4  # 6 chunks of 4 (the last one 3): the 2 done ones are skipped
    np.testing.assert_array_equal(np.asarray(again.delta), np.asarray(ref.delta))
    np.testing.assert_array_equal(np.asarray(again.delta_loss_o), np.asarray(ref.delta_loss_o))
    calls.clear()
    done = _job(tmp_path, "store")  # a finished job computes nothing
    assert calls == [] and np.array_equal(np.asarray(done.delta), np.asarray(ref.delta))
    assert done.delta[5:7].shape == (2, 3, 5)  # rows are read from disk lazily
    stored = ldjax.load_influence(tmp_path / "store")
    assert stored["done"] and np.array_equal(np.asarray(stored["delta"]), np.asarray(ref.delta))
    assert again.chunks_computed == 4 and done.chunks_computed == 0 and done.chunks == 6
    with pytest.raises(ValueError, match=r"another influence job.*eta"):
        _job(tmp_path, "store", eta=0.1)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        _job(tmp_path, "other")


def test_bad_arguments_are_named():
    f, p, x_o, x_u = small_model("mlp", "float32")
    kw = dict(targets=jnp.array([1, 2]))
    with pytest.raises(ValueError, match="method"):
        ldjax.influence(f, p, x_u, x_o, losses.sft, eta=0.1, loss_kwargs=kw, method="fast")
    with pytest.raises(ValueError, match="chunk_size"):
        ldjax.influence(f, p, x_u, x_o, losses.sft, eta=0.1, loss_kwargs=kw, chunk_size=0)
    with pytest.raises(ValueError, match=r"loss_kwargs\['targets'\].*N_u = 2"):
        ldjax.influence(
            f, p, x_u, x_o, losses.sft, eta=0.1, loss_kwargs=dict(targets=jnp.array([1, 2, 3]))
        )
    with pytest.raises(ValueError, match="per_token"):
        ldjax.influence(f, p, x_u, x_o, losses.sft, eta=0.1, loss_kwargs=kw, per_token=True)
    with pytest.raises(ValueError, match="eta"):
        ldjax.influence(f, p, x_u, x_o, losses.sft, eta=-1.0, loss_kwargs=kw)
    tf, tp, to, tu = small_model("transformer", "float32")
    with pytest.raises(ValueError, match="targets_o"):
        ldjax.influence(tf, tp, tu, to, losses.sft, eta=0.1, loss_kwargs=dict(targets=tu))


def _run(args, **popen):
    return subprocess.Popen(
        [sys.executable, str(JOB)] + [str(a) for a in args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


@pytest.mark.slow
def test_eight_host_devices_and_two_processes_equal_one_device(tmp_path):
    one = _run([tmp_path / "one", "--npz", tmp_path / "one.npz"])
    assert one.wait(300) == 0, one.stdout.read()
    eight = _run(
        [tmp_path / "eight", "--devices", 8, "--o-devices", 2, "--npz", tmp_path / "eight.npz"]
    )
    out = eight.communicate(timeout=300)[0]
    assert eight.returncode == 0, out
    assert "{'u': 4, 'o': 2}" in out
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        _run(
            [
                tmp_path / "two",
                "--devices",
                4,
                "--process-id",
                k,
                "--num-processes",
                2,
                "--coordinator",
                f"127.0.0.1:{port}",
                "--npz",
                tmp_path / "two.npz",
            ]
        )
        for k in (0, 1)
    ]
    for pr in procs:
        out = pr.communicate(timeout=300)[0]
        assert pr.returncode == 0, out
    a, b, c = (np.load(tmp_path / f"{n}.npz") for n in ("one", "eight", "two"))
    for k in ("delta", "delta_loss_o", "kernel_fro"):
        assert rel(b[k], a[k]) < 1e-5 and rel(c[k], a[k]) < 1e-5
    assert rel(c["delta"], b["delta"]) < 1e-6  # the same 8-way split, in 1 or 2 processes
    # a conv net (the MNIST LeNet): jaxlib 0.10.2 miscompiled its per-example gradients when the
    # SPMD partitioner split them over 8 host devices (0.12 relative); per device they are exact
    for name, extra in (("lenet1", []), ("lenet8", ["--devices", 8, "--o-devices", 2])):
        job = _run(
            [tmp_path / name, "--model", "lenet", "--n-u", 16, "--npz", tmp_path / f"{name}.npz"]
            + extra
        )
        out = job.communicate(timeout=300)[0]
        assert job.returncode == 0, out
    a, b = (np.load(tmp_path / f"{n}.npz") for n in ("lenet1", "lenet8"))
    for k in ("delta", "delta_loss_o", "kernel_fro"):
        assert rel(b[k], a[k]) < 1e-5


@pytest.mark.slow
def test_sigkill_then_rerun_is_bitwise_equal(tmp_path):
    n_u = "4000"
    ref = _run([tmp_path / "ref", "--n-u", n_u, "--npz", tmp_path / "ref.npz"])
    assert ref.wait(600) == 0, ref.stdout.read()
    job = _run([tmp_path / "killed", "--n-u", n_u], start_new_session=True)
    done = tmp_path / "killed" / "done"
    t0 = time.time()
    while not (done.is_dir() and len(list(done.iterdir())) >= 20):
        assert job.poll() is None, "the job finished before it could be killed"
        assert time.time() - t0 < 300
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    n_done = len(list(done.iterdir()))
    assert n_done < 500  # killed in the middle (500 chunks in all)
    again = _run([tmp_path / "killed", "--n-u", n_u, "--npz", tmp_path / "again.npz"])
    assert again.wait(600) == 0, again.stdout.read()
    a, b = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "again.npz")
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k])


def test_default_mesh_axes():
    mesh = ldjax.default_mesh()
    assert mesh.axis_names == ("u",) and mesh.shape["u"] == jax.device_count()
    with pytest.raises(ValueError, match="o_devices"):
        ldjax.default_mesh(o_devices=jax.device_count() + 1)
    assert zoo is not None


@pytest.mark.slow  # > 10 s on 2 cores
def test_optimizer_step_per_example_equals_decompose_with_the_optimizer():
    import optax

    with precision("float64"):
        f, p, x_o, x_u = small_model("mlp", "float64")
        y_u, y_o = jnp.array([0, 3]), jnp.array([2, 2, 0])
        tx = optax.adamw(1e-3, weight_decay=0.01)
        state = tx.init(p)
        g = jax.grad(lambda q: jnp.sum(losses.sft(f(q, x_u[::-1]), y_u)))(p)
        _, state = tx.update(g, state, p)  # a state with a first and second moment
        kw = dict(loss_kwargs=dict(targets=y_u), optimizer=tx, opt_state=state, targets_o=y_o)
        inf = ldjax.influence(f, p, x_u, x_o, losses.sft, audit_size=2, **kw)
        for u in range(2):
            d = ldjax.decompose(
                f,
                p,
                x_o,
                x_u[u : u + 1],
                losses.sft,
                optimizer=tx,
                opt_state=state,
                loss_kwargs=dict(targets=y_u[u : u + 1]),
            )
            own = ldjax.apply_A(d.logits, d.delta_logits - d.delta_logits_carry)  # u's part
            assert rel(inf.delta[u], own) < 1e-10
            assert rel(inf.delta_carry, ldjax.apply_A(d.logits, d.delta_logits_carry)) < 1e-10
        # the audit: u's part plus the carry-over against the real Adam step from that state
        assert np.all(inf.audit["rel_error"] < 0.05)
        with pytest.raises(ValueError, match="exactly one"):
            ldjax.influence(
                f, p, x_u, x_o, losses.sft, eta=0.1, optimizer=tx, loss_kwargs=dict(targets=y_u)
            )


def test_target_only_is_the_probe_class_of_the_full_readout():
    with precision("float64"):
        f, p, x_o, x_u = small_model("mlp", "float64")
        y_u, y_o = jnp.array([0, 3]), jnp.array([2, 2, 0])
        kw = dict(eta=0.01, loss_kwargs=dict(targets=y_u), targets_o=y_o)
        full = ldjax.influence(f, p, x_u, x_o, losses.sft, **kw)
        picked = np.asarray(full.delta)[:, np.arange(3), np.asarray(y_o)]
        t = ldjax.influence(f, p, x_u, x_o, losses.sft, target_only=True, audit_size=2, **kw)
        assert t.delta.shape == (2, 3) and t.readout == "target"
        assert rel(t.delta, picked) < 1e-12 and rel(t.delta_loss_o, -picked) < 1e-12
        # the audit reads the same entry of the real step as the full readout's audit would
        assert t.audit["actual"].shape == (2, 3) and np.all(t.audit["rel_error"] < 0.1)
        with pytest.raises(ValueError, match="target_only needs targets_o"):
            ldjax.influence(
                f,
                p,
                x_u,
                x_o,
                losses.sft,
                eta=0.01,
                loss_kwargs=kw["loss_kwargs"],
                target_only=True,
            )


@pytest.mark.slow  # ~10 s on 2 cores: every rebuilt optimizer compiles the chunk program again
def test_a_streamed_optimizer_job_resumes_with_the_optimizer_built_again(tmp_path):
    import optax

    f, p, x_o, x_u = small_model("mlp", "float32")
    y_u, y_o = jnp.array([0, 3]), jnp.array([2, 2, 0])

    def run(lr, momentum=0.9):
        tx = optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(lr, momentum=momentum))
        state = tx.init(p)
        g = jax.grad(lambda q: jnp.sum(losses.sft(f(q, x_u), y_u)))(p)
        _, state = tx.update(g, state, p)  # a state with momentum
        return ldjax.influence(
            f,
            p,
            x_u,
            x_o,
            losses.sft,
            optimizer=tx,
            opt_state=state,
            loss_kwargs=dict(targets=y_u),
            targets_o=y_o,
            chunk_size=1,
            audit_size=0,
            out=str(tmp_path / "job"),
        )

    first = run(0.1)
    again = run(0.1)  # a new optax object (new closures): the same job, nothing recomputed
    assert first.chunks_computed == 2 and again.chunks_computed == 0
    np.testing.assert_array_equal(np.asarray(again.delta), np.asarray(first.delta))
    with pytest.raises(ValueError, match=r"another influence job.*optimizer"):
        run(0.2)
    with pytest.raises(ValueError, match=r"another influence job.*optimizer"):
        run(0.1, momentum=0.5)


def test_optimizer_fingerprint_names_the_update_not_the_object():
    import optax

    _, p, _, _ = small_model("mlp", "float32")
    a = influence_module.optimizer_fingerprint(optax.adam(1e-3), optax.adam(1e-3).init(p), p)
    b = influence_module.optimizer_fingerprint(optax.adam(1e-3), optax.adam(1e-3).init(p), p)
    c = influence_module.optimizer_fingerprint(optax.adam(2e-3), optax.adam(2e-3).init(p), p)
    assert a == b != c
