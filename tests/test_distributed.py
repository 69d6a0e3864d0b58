"""torch.distributed on real gloo process groups (CPU): the global NT-Xent against the
single-process op, the differentiable all-gather, DDP training under torchrun (weights equal on every
rank, exact resume, SIGTERM), sharded batches and clear errors."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from urkle_fast import nt_xent, use_backend
from urkle_fast.data import epoch_batches, load_dataset
from urkle_fast.distributed import all_gather_with_grad, init_distributed
from urkle_fast.ops.nt_xent import nt_xent_column_detached


def nt_xent_global(z, **kw):
    return nt_xent(z, gather_distributed=True, **kw)

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # --standalone: torchrun picks a free port itself


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, world: int, *args):
    """Run fn(rank, world, *args) in `world` processes joined in a gloo group through env://."""
    port = _free_port()
    mp.spawn(_worker, args=(world, port, fn, args), nprocs=world, join=True)


def _worker(rank, world, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.backend) == (rank, world, "gloo")
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# the global NT-Xent


def _check_global_nt_xent(rank, world, out_dir, views, denominator, dtype, backend, detach_columns=False):
    """nt_xent (or with detach_columns RoCL's nt_xent_column_detached) of this rank's rows against every rank's
    columns, against the same function of the concatenated batch in one process."""
    fn = nt_xent_column_detached if detach_columns else nt_xent
    g = torch.Generator().manual_seed(123)
    b, d = 5, 13  # odd sizes: no tile divides them
    z_all = torch.randn(views, world * b, d, generator=g).to(dtype)
    z = z_all[:, rank * b:(rank + 1) * b].clone().requires_grad_()
    with use_backend(backend):
        loss = fn(z, views=views, temperature=0.3, denominator=denominator, gather_distributed=True)
        (grad,) = torch.autograd.grad(loss * 1.7, z)  # an upstream gradient other than 1
        ref_z = z_all.clone().requires_grad_()
        ref = fn(ref_z, views=views, temperature=0.3, denominator=denominator)
        (ref_grad,) = torch.autograd.grad(ref * 1.7, ref_z)
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    torch.save({"loss": float(loss), "mean": float(mean) / world, "ref": float(ref),
                # DDP averages gradients over ranks: grad / world is this rank's share of the global one
                "grad": grad.float() / world, "ref_grad": ref_grad[:, rank * b:(rank + 1) * b].float()},
               Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("views,denominator", [(2, "all"), (4, "all"), (4, "negatives")])
def test_global_nt_xent_equals_single_process(tmp_path, world, views, denominator):
    _spawn(_check_global_nt_xent, world, str(tmp_path), views, denominator, torch.float32, "native")
    for r in range(world):
        res = torch.load(tmp_path / f"rank{r}.pt")
        assert res["mean"] == pytest.approx(res["ref"], rel=1e-5, abs=1e-6)
        torch.testing.assert_close(res["grad"], res["ref_grad"], atol=2e-6, rtol=1e-5)
    losses = [torch.load(tmp_path / f"rank{r}.pt")["loss"] for r in range(world)]
    assert len(set(losses)) == world  # each rank's rows are its own


@pytest.mark.parametrize("world,views,denominator,dtype,backend", [
    (2, 3, "all", torch.float32, "native"), (3, 3, "all", torch.float32, "native"),
    (2, 4, "negatives", torch.bfloat16, "native"), (2, 2, "all", torch.float32, "reference")])
def test_global_column_detached_nt_xent_equals_single_process(tmp_path, world, views, denominator, dtype, backend):
    """RoCL's similarity under torch.distributed: the columns gathered without a gradient; each rank's gradient
    (DDP-averaged) is its rows' share of the rows-only gradient of the concatenated batch."""
    _spawn(_check_global_nt_xent, world, str(tmp_path), views, denominator, dtype, backend, True)
    tol = dict(atol=2e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-2)
    for r in range(world):
        res = torch.load(tmp_path / f"rank{r}.pt")
        assert res["mean"] == pytest.approx(res["ref"], rel=tol["rtol"], abs=tol["atol"])
        torch.testing.assert_close(res["grad"], res["ref_grad"], **tol)


@pytest.mark.parametrize("backend,dtype", [("reference", torch.float32), ("triton", torch.float32),
                                           ("native", torch.bfloat16)])
def test_global_nt_xent_backends_and_dtypes(tmp_path, backend, dtype):
    _spawn(_check_global_nt_xent, 2, str(tmp_path), 4, "all", dtype, backend)
    tol = dict(atol=2e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-2)
    for r in range(2):
        res = torch.load(tmp_path / f"rank{r}.pt")
        assert res["mean"] == pytest.approx(res["ref"], rel=tol["rtol"], abs=tol["atol"])
        torch.testing.assert_close(res["grad"], res["ref_grad"], **tol)


def _check_all_gather(rank, world, out_dir):
    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    y = all_gather_with_grad(x)
    w = torch.arange(y.numel(), dtype=torch.float32).view_as(y)
    (g,) = torch.autograd.grad((y * w * (rank + 1)).sum(), x)
    torch.save({"y": y.detach(), "g": g, "w": w}, Path(out_dir) / f"rank{rank}.pt")


def test_all_gather_with_grad_sums_every_ranks_gradient(tmp_path):
    _spawn(_check_all_gather, 2, str(tmp_path))
    for r in range(2):
        res = torch.load(tmp_path / f"rank{r}.pt")
        assert torch.equal(res["y"], torch.cat([torch.full((2, 3), 1.0), torch.full((2, 3), 2.0)]))
        # d/dx_r of sum_r' (r'+1) <w, y> = (1 + 2) * w[rows of rank r]
        assert torch.equal(res["g"], 3 * res["w"][2 * r:2 * r + 2])


def _nan_on_one_rank(rank, world, out_dir, fn=nt_xent):
    from urkle_fast.ops._checks import NonFiniteInputError

    z = torch.randn(4, 3, 8)
    if rank == 1:
        z[2, 1, 5] = float("nan")
    t0 = time.time()
    try:
        fn(z, views=4, gather_distributed=True)
        outcome = "returned"
    except NonFiniteInputError as exc:
        outcome = str(exc)
    (Path(out_dir) / f"rank{rank}.txt").write_text(f"{time.time() - t0:.3f}\n{outcome}")


@pytest.mark.parametrize("fn", [nt_xent, nt_xent_column_detached])
def test_a_non_finite_rank_stops_every_rank_at_once(tmp_path, fn):
    """NaN in one rank's projections: every rank raises NonFiniteInputError naming that rank, at once. Raising on
    that rank alone would leave the others in the all-gather until the process group's timeout."""
    _spawn(_nan_on_one_rank, 2, str(tmp_path), fn)
    for r in (0, 1):
        seconds, msg = (tmp_path / f"rank{r}.txt").read_text().split("\n", 1)
        assert f"{fn.__name__}: z must be finite, got NaN or inf on rank(s) [1] of 2" in msg and float(seconds) < 5


def test_single_process_falls_back_to_the_local_op():
    z = torch.randn(4, 6, 8)
    assert torch.equal(nt_xent_global(z, views=4), nt_xent(z, views=4))
    assert all_gather_with_grad(z) is z


# ------------------------------------------------------------------------------------------------
# sharded batches


def test_shards_partition_every_global_batch():
    ds = load_dataset("digits", split="train")
    whole = [y for _, y in epoch_batches(ds, 96, seed=1, epoch=0)]
    parts = [[y for _, y in epoch_batches(ds, 96, seed=1, epoch=0, shard=(r, 3))] for r in range(3)]
    assert all(len(p) == len(whole) for p in parts)
    for i, y in enumerate(whole):
        assert torch.equal(torch.cat([p[i] for p in parts]), y)
    with pytest.raises(ValueError, match="divisible by the number of ranks 5"):
        next(epoch_batches(ds, 96, seed=1, epoch=0, shard=(0, 5)))
    with pytest.raises(ValueError, match="0 <= rank < world"):
        next(epoch_batches(ds, 96, seed=1, epoch=0, shard=(3, 3)))


# ------------------------------------------------------------------------------------------------
# DDP training


def _train_worker(rank, world, out_dir, micro_batch=None):
    from urkle_fast.train import TrainConfig, train

    cfg = TrainConfig(dataset="digits", device="cpu", batch_size=64, epochs=2, max_steps=3, log_every=1,
                      out_dir=str(Path(out_dir) / "run"), progress=False, threads=1, num_workers=0,
                      micro_batch=micro_batch)
    res = train(cfg)
    torch.save({k: v.clone() for k, v in res["model"].state_dict().items()}, Path(out_dir) / f"weights{rank}.pt")
    (Path(out_dir) / f"micro{rank}.txt").write_text(repr(res["micro"]))


@pytest.mark.parametrize("micro_batch", [None, 12, "auto"], ids=["ddp", "micro-batched", "auto"])
def test_ddp_keeps_every_rank_on_the_same_weights(tmp_path, micro_batch):
    """DDP, or (with --micro-batch) the gradient cache plus one flat all-reduce of the gradients; auto: every rank
    probes, they agree on the smallest chunk (here the whole share fits) and DDP is built after the probes."""
    _spawn(_train_worker, 2, str(tmp_path), micro_batch)
    w0, w1 = torch.load(tmp_path / "weights0.pt"), torch.load(tmp_path / "weights1.pt")
    params = [k for k in w0 if "running" not in k and "num_batches" not in k]
    assert all(torch.equal(w0[k], w1[k]) for k in params)
    chosen = {(tmp_path / f"micro{r}.txt").read_text() for r in (0, 1)}
    assert chosen == {"None" if micro_batch in (None, "auto") else "12"}  # auto: both ranks found the share fits
    if micro_batch == "auto":  # the whole share in one pass: exactly the DDP run (the probes left no trace)
        _spawn(_train_worker, 2, str(tmp_path / "ddp"), None)
        ddp = torch.load(tmp_path / "ddp" / "weights0.pt")
        assert all(torch.equal(ddp[k], w0[k]) for k in w0)
    if micro_batch not in (None, "auto"):  # rank 0's batch-norm statistics are broadcast after every step
        assert all(torch.equal(w0[k], w1[k]) for k in w0)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng_ranks"]) == 2 and ckpt["step"] == 3
    assert all(torch.equal(ckpt["model"][k], w0[k]) for k in params)
    # the weights moved: an untrained model differs
    from urkle_fast.models import build_model
    fresh = build_model(ckpt["config"]).state_dict()
    assert not all(torch.equal(fresh[k], w0[k]) for k in params)


def _torchrun(out_dir, *extra, nproc=2, timeout=300, check=True):
    cmd = TORCHRUN + ["--standalone", "--nproc-per-node", str(nproc), "-m", "urkle_fast.train",
                      "--dataset", "digits", "--device", "cpu", "--batch", "64", "--epochs", "2", "--log-every", "1",
                      "--threads", "1", "--num-workers", "0", "--no-progress", "--out-dir", str(out_dir), *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


@pytest.mark.slow
def test_torchrun_resume_continues_exactly(tmp_path):
    """Two gloo processes: 4 steps in one go == 2 steps, stop, --resume to 4 (bitwise)."""
    _torchrun(tmp_path / "full", "--max-steps", "4")
    _torchrun(tmp_path / "part", "--max-steps", "2")
    _torchrun(tmp_path / "part", "--max-steps", "4", "--resume")
    a, b = _weights(tmp_path / "full" / "checkpoint.pt"), _weights(tmp_path / "part" / "checkpoint.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    recs = [json.loads(ln) for ln in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)


@pytest.mark.slow
def test_sigterm_to_torchrun_leaves_a_checkpoint_that_resumes(tmp_path):
    out = tmp_path / "sig"
    cmd = TORCHRUN + ["--standalone", "--nproc-per-node", "2", "-m", "urkle_fast.train",
                      "--dataset", "digits", "--device", "cpu", "--batch", "64", "--epochs", "100", "--log-every", "1",
                      "--threads", "1", "--num-workers", "0", "--no-progress", "--out-dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert "received SIGTERM: saved" in err, err[-3000:]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] >= 2 and ckpt["world_size"] == 2
    _torchrun(out, "--epochs", "100", "--max-steps", str(ckpt["step"] + 1), "--resume")  # the run's own --epochs
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == ckpt["step"] + 1


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.slow
def test_a_killed_worker_recovers_by_relaunching_with_resume_if_exists(tmp_path):
    """The recovery recipe of the README: a worker is killed (kill -9) mid-run, torchrun gives up, the SAME
    command relaunched (with --resume if-exists) continues from the last checkpoint and ends bit for bit
    where an uninterrupted run ends."""
    args = ["--max-steps", "8", "--ckpt-every", "1", "--resume", "if-exists"]
    _torchrun(tmp_path / "full", *args)
    out = tmp_path / "killed"
    cmd = TORCHRUN + ["--standalone", "--nproc-per-node", "2", "-m", "urkle_fast.train", "--dataset", "digits",
                      "--device", "cpu", "--batch", "64", "--epochs", "2", "--log-every", "1", "--threads", "1",
                      "--num-workers", "0", "--no-progress", "--out-dir", str(out), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        ck = out / "checkpoint.pt"
        if ck.exists() and torch.load(ck, weights_only=True)["step"] >= 3:
            break
        time.sleep(0.2)
    workers = _children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)
    t0 = time.time()
    _, err = proc.communicate(timeout=180)
    assert proc.returncode != 0 and time.time() - t0 < 120, err[-2000:]
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert 3 <= step < 8
    _torchrun(out, *args)  # the same command again
    a, b = _weights(tmp_path / "full" / "checkpoint.pt"), _weights(out / "checkpoint.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_global_batch_must_divide_over_the_processes(tmp_path):
    proc = _torchrun(tmp_path / "bad", "--batch", "63", "--max-steps", "1", check=False)
    assert proc.returncode != 0
    assert "--batch-size 63 is the global batch and must be divisible by the number of processes (2)" in proc.stderr


def test_sync_bn_on_cpu_processes_is_a_clear_error(tmp_path):
    proc = _torchrun(tmp_path / "bad", "--sync-bn", "--max-steps", "1", check=False)
    assert proc.returncode != 0
    assert "--sync-bn needs CUDA devices" in proc.stderr


def test_a_second_torchrun_job_on_a_running_runs_out_dir_is_refused_on_every_rank_at_once(tmp_path):
    """Rank 0 takes the --out-dir lock and tells every rank its answer, so every rank stops with the reason. Before,
    only rank 0 said it; torchrun's agent then ended the others, but under a launcher that does not (srun starting
    each process) they waited --dist-timeout (300 s) in a collective that rank 0 never joined."""
    from urkle_fast.checkpoint import claim_folder, release_folder

    out = tmp_path / "run"
    out.mkdir()
    held = claim_folder(out)  # the running run
    try:
        t0 = time.monotonic()
        proc = _torchrun(out, "--max-steps", "1", "--resume", "if-exists", "--dist-timeout", "300", timeout=240,
                         check=False)
        took = time.monotonic() - t0
    finally:
        release_folder(held)
    assert proc.returncode != 0 and took < 120, (took, proc.stderr[-3000:])
    assert proc.stderr.count(f"--out-dir {str(out)!r} is in use by another run") == 2  # both ranks say why
    assert sorted(p.name for p in out.iterdir()) == [".run.lock"]


def test_rocl_with_its_official_similarity_trains_under_torchrun(tmp_path):
    _torchrun(tmp_path / "rocl", "--method", "rocl", "--detach-columns", "--max-steps", "2")
    ckpt = torch.load(tmp_path / "rocl" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["config"]["detach_columns"] is True


def test_init_distributed_errors(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed("cpu").world_size == 1
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu'"):
        init_distributed("tpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE must be an integer, got 'two'"):
        init_distributed("cpu")
    if not torch.cuda.is_available():
        monkeypatch.setenv("WORLD_SIZE", "1")
        with pytest.raises(ValueError, match="torch.cuda.is_available\\(\\) is False"):
            init_distributed("cuda")


# ------------------------------------------------------------------------------------------------
# micro-batches x ranks: the gradient of the global batch


def _deterministic_setup(method, patch=setattr, detach_columns=False):
    """A digits model without batch norm, a deterministic attack and z noise (as in test_microbatch)."""
    from urkle_fast import methods as methods_mod
    from urkle_fast.data import MultiViewAugment, as_tensors
    from urkle_fast.models import RepresentationModel, build_model
    from urkle_fast.train import TrainConfig, resolve_config

    def attack(objective, x, hp, model, eot=1):
        return (x + hp.eps * torch.sign(torch.sin(997.0 * x + 0.3))).clamp(0, 1)

    patch(methods_mod, "_attack", attack)
    patch(RepresentationModel, "sample",
          staticmethod(lambda mu, logvar: mu + torch.exp(0.5 * logvar) * torch.sin(131.0 * mu)))
    cfg = resolve_config(TrainConfig(method=method, dataset="digits", eps=0.1, beta_robust=0.5,
                                     detach_columns=detach_columns))
    torch.manual_seed(0)
    model = build_model(vars(cfg)).train()
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
                setattr(mod, name, torch.nn.Identity())
    x, y = as_tensors(load_dataset("digits", split="train"), limit=12)
    views = MultiViewAugment(2, 8, cfg.augment)(x, torch.Generator().manual_seed(0))
    return cfg, model, views, y


def _micro_worker(rank, world, out_dir, method, detach_columns):
    from urkle_fast.distributed import all_reduce_gradients
    from urkle_fast.methods import LossParams, get_method
    from urkle_fast.microbatch import micro_batched_step

    cfg, model, views, y = _deterministic_setup(method, detach_columns=detach_columns)
    b = views.shape[1] // world
    sl = slice(rank * b, (rank + 1) * b)
    loss, _ = micro_batched_step(model, get_method(method), views[:, sl], y[sl], LossParams.of(cfg), cfg.beta_robust,
                                 micro=4)  # 6 images: chunks 4 + 2
    all_reduce_gradients(model)
    torch.save({n: p.grad for n, p in model.named_parameters()}, Path(out_dir) / f"grad{rank}.pt")


@pytest.mark.parametrize("method,detach_columns", [("simclr_urkle", False), ("simclr", False), ("rocl", False),
                                                   ("rocl", True)])
def test_micro_batches_on_two_ranks_give_the_global_gradient(tmp_path, method, detach_columns, monkeypatch):
    """Each rank: its 6 images in chunks of 4 + 2 (gradient cache over the global NT-Xent), then the
    gradient all-reduce == autograd through the unchunked loss of all 12 images in one process."""
    from urkle_fast.methods import LossParams, get_method

    _spawn(_micro_worker, 2, str(tmp_path), method, detach_columns)
    cfg, model, views, y = _deterministic_setup(method, patch=monkeypatch.setattr, detach_columns=detach_columns)
    loss, _ = get_method(method).loss(model, views, y, LossParams.of(cfg), cfg.beta_robust)
    loss.backward()
    for r in range(2):
        grads = torch.load(tmp_path / f"grad{r}.pt")
        for n, p in model.named_parameters():
            torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"rank {r} {n}: {m}")


def _check_bad_input(rank, world, out_dir):
    errors = []
    for kwargs, z in [(dict(views=3), torch.randn(4, 5, 8)), (dict(views=4, temperature=0.0), torch.randn(4, 5, 8)),
                      (dict(views=4), torch.full((4, 5, 8), float("nan")))]:
        try:
            nt_xent_global(z, **kwargs)
        except (ValueError, TypeError) as exc:
            errors.append(str(exc))
    Path(out_dir, f"errors{rank}.json").write_text(json.dumps(errors))


def test_global_nt_xent_bad_input_is_a_clear_error_on_every_rank(tmp_path):
    _spawn(_check_bad_input, 2, str(tmp_path))
    for r in range(2):
        errs = json.loads((tmp_path / f"errors{r}.json").read_text())
        assert len(errs) == 3
        assert "must have V == views == 3" in errs[0]
        assert "temperature" in errs[1] and "nt_xent" in errs[1]
        assert "non-finite" in errs[2] or "finite" in errs[2]
