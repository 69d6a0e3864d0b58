"""The trainer: every method learns, exact resume, SIGTERM, clear errors, non-finite loss, compile."""

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from urkle_fast import methods as methods_mod
from urkle_fast.methods import LossParams, Method, get_method
from urkle_fast.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from urkle_fast.data import as_tensors, load_dataset, MultiViewAugment
from urkle_fast.models import build_model
from urkle_fast.optim import LARS, param_groups
from urkle_fast.train import NonFiniteLossError, TrainConfig, compile_model, main, resolve_config, train

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
# a tiny but real run: 128 digits, batch 32 -> 4 steps per epoch, 2 PGD steps
TINY = dict(dataset="digits", train_subset=128, batch_size=32, epochs=2, pgd_steps=2, warmup_epochs=1,
            progress=False, log_every=1, threads=1, base_lr=1.0, trust_coef=0.02)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _cfg(method, **kw):
    c = resolve_config(TrainConfig(method=method, **{**TINY, **kw}))
    c.num_classes = 10
    return c


@pytest.mark.parametrize("method", sorted(methods_mod.METHODS))
def test_every_method_loss_falls_on_a_fixed_batch(method):
    cfg = _cfg(method, eps=0.1, pgd_steps=2, pgd_alpha=0.05, beta_robust=0.1 if method != "trades" else 6.0)
    torch.manual_seed(0)
    model = build_model(vars(cfg)).train()
    x, y = as_tensors(load_dataset("digits", split="train"), limit=64)
    crops = MultiViewAugment(get_method(method).crops_per_image, 8, cfg.augment)(x, torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        torch.manual_seed(1)  # same z samples and random starts each step: the objective is a fixed function
        loss, metrics = get_method(method).loss(model, crops, y, LossParams.of(cfg), cfg.beta_robust)
        assert loss.dtype == torch.float32 and loss.ndim == 0 and torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], f"{method}: {losses}"


def _params(path):
    return load_checkpoint(path)["model"]


def test_resume_continues_exactly(tmp_path):
    full = train(TrainConfig(method="simclr_urkle", out_dir=str(tmp_path / "full"), **TINY))
    part = train(TrainConfig(method="simclr_urkle", out_dir=str(tmp_path / "part"), max_steps=3, **TINY))
    assert part["step"] == 3
    # resume takes the computation-defining settings from the checkpoint (tests/test_reliability.py: what
    # happens to flags that differ from it)
    resumed = train(TrainConfig(method="simclr_urkle", out_dir=str(tmp_path / "part"), resume="auto", **TINY))
    assert resumed["step"] == full["step"] == 8
    assert resumed["loss"] == full["loss"]
    a, b = _params(full["checkpoint"]), _params(resumed["checkpoint"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    sa, sb = load_checkpoint(full["checkpoint"]), load_checkpoint(resumed["checkpoint"])
    assert sa["scheduler"] == sb["scheduler"]
    assert torch.equal(sa["rng"]["torch"], sb["rng"]["torch"])


def test_resume_if_exists_starts_then_continues(tmp_path):
    """The same command line, launched twice (a requeued job): first a fresh start, then a resume."""
    full = train(TrainConfig(method="simclr_urkle", out_dir=str(tmp_path / "full"), **TINY))
    argv = dict(method="simclr_urkle", out_dir=str(tmp_path / "job"), resume="if-exists", **TINY)
    first = train(TrainConfig(**{**argv, "max_steps": 5}))
    assert first["step"] == 5
    second = train(TrainConfig(**argv))
    assert second["step"] == 8 and second["loss"] == full["loss"]
    a, b = _params(full["checkpoint"]), _params(second["checkpoint"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(CheckpointError):  # plain --resume still insists on a checkpoint
        train(TrainConfig(**{**argv, "out_dir": str(tmp_path / "none"), "resume": "auto"}))


def test_sigterm_leaves_a_loadable_checkpoint_and_resume_matches(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "urkle_fast.train", "--method", "simclr_urkle", "--dataset", "digits",
           "--epochs", "8", "--batch-size", "32", "--train-subset", "128", "--pgd-steps", "2",
           "--warmup-epochs", "1", "--base-lr", "1.0", "--trust-coef", "0.02",
           "--log-every", "1", "--threads", "1", "--no-progress", "--out-dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not metrics.exists() or metrics.stat().st_size == 0):
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM" in err and "--resume" in err
    model, config = load_model(out / "checkpoint.pt")
    assert model.kind == "representation" and config["method"] == "simclr_urkle"
    stopped_at = load_checkpoint(out / "checkpoint.pt")["step"]
    assert 1 <= stopped_at < 32
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    # the killed run, resumed, ends exactly where an uninterrupted run ends
    resumed = train(TrainConfig(out_dir=str(out), resume="auto", progress=False, threads=1))
    full = train(TrainConfig(method="simclr_urkle", out_dir=str(tmp_path / "full"), **{**TINY, "epochs": 8}))
    assert resumed["step"] == full["step"] == 32
    a, b = _params(full["checkpoint"]), _params(resumed["checkpoint"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_signal_stops_inside_the_step(tmp_path):
    """A long micro-batched step: the first SIGINT asks to stop after the step (and says so), a duplicate within 2 s
    is ignored, a later one stops at once with exit 130, keeping the checkpoint on disk untouched: the one of step 1 (a periodic snapshot is written
    once the next step's loss is finite, so step 2's is still pending in step 3)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "urkle_fast.train", "--dataset", "digits", "--image-size", "32", "--batch", "256",
           "--micro-batch", "4", "--pgd-steps", "10", "--epochs", "4", "--ckpt-every", "1", "--log-every", "1",
           "--threads", "1", "--num-workers", "0", "--no-progress", "--out-dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    time.sleep(1)  # inside step 3 (64 chunks of 4 images)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)  # at once: a duplicate delivery (torchrun and Slurm both forward signals)
    time.sleep(2.5)
    assert proc.poll() is None  # the first signal waits for the step, the duplicate is ignored
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, err[-2000:]
    assert time.time() - t0 < 10 and "stopping after the step in progress" in err and "stopped inside the step" in err
    assert "Traceback" not in err
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 1 and f"the last checkpoint is {out}" in err


def test_clear_errors(tmp_path, capsys):
    assert main(["--dataset", "mnist", "--data-root", str(tmp_path / "missing"), "--out-dir", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "wrong").mkdir()
    (tmp_path / "wrong" / "images.bin").write_bytes(b"\0")
    assert main(["--dataset", "cifar10", "--data-root", str(tmp_path / "wrong"), "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "cifar-10-batches-py" in err and "ImageFolder" in err
    for flag, value in (("--method", "byol"), ("--dataset", "svhn")):
        with pytest.raises(SystemExit) as exc:
            main([flag, value])
        assert exc.value.code == 2
        assert "invalid choice" in capsys.readouterr().err
    bad = tmp_path / "bad" / "checkpoint.pt"
    bad.parent.mkdir()
    bad.write_bytes(b"not a checkpoint at all")
    assert main(["--out-dir", str(bad.parent), "--resume"]) == 2
    assert "corrupt or truncated" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "none.pt")
    save_checkpoint({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not an urkle_fast checkpoint"):
        load_model(tmp_path / "foreign.pt")


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    r = train(TrainConfig(method="standard", out_dir=str(tmp_path), **{**TINY, "epochs": 1}))
    data = Path(r["checkpoint"]).read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(tmp_path / "cut.pt")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = Method.loss
    calls = {"n": 0}

    def poisoned(self, *args):
        calls["n"] += 1
        loss, m = real(self, *args)
        return (loss * float("nan") if calls["n"] == 6 else loss), m

    monkeypatch.setattr(Method, "loss", poisoned)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="step 5") as exc:
        train(TrainConfig(method="simclr", out_dir=str(out), ckpt_every=2, **TINY))
    assert "last good checkpoint" in str(exc.value)
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    model, _ = load_model(out / "checkpoint.pt")
    assert model.kind == "representation"


def test_a_final_save_keeps_the_checkpoint_it_replaces(tmp_path, monkeypatch):
    """The final (or stop-time) save writes weights no forward pass has checked yet (a diverging last step can leave
    them huge but finite), so the checkpoint it replaces, which a finite loss has checked, stays as
    checkpoint.prev.pt; a resumed run that then meets a non-finite loss names it, and the files stay as they were."""
    out = tmp_path / "run"
    r = train(TrainConfig(method="simclr", out_dir=str(out), ckpt_every=2, max_steps=5, **TINY))
    assert r["step"] == 5
    # periodic checkpoints at steps 2 and 4 (step 4's written once step 5's loss was finite), the final one at 5
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 5
    prev = load_checkpoint(out / "checkpoint.prev.pt")  # weights_only, as every load
    assert prev["step"] == 4 and not list(out.glob(".*.tmp"))
    before = {p.name: p.read_bytes() for p in (out / "checkpoint.pt", out / "checkpoint.prev.pt")}

    real = Method.loss
    monkeypatch.setattr(Method, "loss", lambda self, *a: (lambda l, m: (l * float("nan"), m))(*real(self, *a)))
    with pytest.raises(NonFiniteLossError, match="step 5") as exc:
        train(TrainConfig(method="simclr", out_dir=str(out), resume="auto", ckpt_every=2, **TINY))
    assert f"--resume {out / 'checkpoint.prev.pt'} --out-dir <new folder>" in str(exc.value)
    assert {p.name: p.read_bytes() for p in (out / "checkpoint.pt", out / "checkpoint.prev.pt")} == before

    # the kept checkpoint continues in a new folder
    monkeypatch.setattr(Method, "loss", real)
    r = train(TrainConfig(method="simclr", out_dir=str(tmp_path / "again"), resume=str(out / "checkpoint.prev.pt"),
                          ckpt_every=0, **TINY))
    assert r["step"] == 8 and load_checkpoint(tmp_path / "again" / "checkpoint.pt")["step"] == 8
    assert not (tmp_path / "again" / "checkpoint.prev.pt").exists()  # nothing was on disk there to keep


def test_an_error_inside_a_step_saves_the_last_completed_step_and_resumes_exactly(tmp_path, monkeypatch, capsys):
    """An error after a step's forward (which drew z samples and random starts and updated batch-norm statistics)
    but before its optimiser step: the error-time checkpoint is the last completed step with those rolled back,
    so the resumed run ends bit for bit where an uninterrupted one does. SimCLR+Urkle on digits: random draws and
    batch norm in every step."""
    import urkle_fast.train as train_mod

    kw = dict(TINY, method="simclr_urkle", max_steps=4, ckpt_every=0)
    full = train(TrainConfig(out_dir=str(tmp_path / "full"), **kw))
    assert any(k.endswith("running_mean") for k in full["model"].state_dict())

    real, calls = train_mod.forward_backward, {"n": 0}

    def failing(*args):
        out = real(*args)
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("the disk caught fire")
        return out

    monkeypatch.setattr(train_mod, "forward_backward", failing)
    with pytest.raises(RuntimeError, match="caught fire"):
        train(TrainConfig(out_dir=str(tmp_path / "cut"), **kw))
    assert "error at step 2: saved the last completed step" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["step"] == 2
    monkeypatch.setattr(train_mod, "forward_backward", real)
    r = train(TrainConfig(out_dir=str(tmp_path / "cut"), resume="auto", **kw))
    a, b = _params(full["checkpoint"]), _params(r["checkpoint"])
    assert r["step"] == 4 and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_load_model_rebuilds_every_family(tmp_path):
    for method in ("simclr_urkle", "vae_urkle", "ae_trades", "trades"):
        r = train(TrainConfig(method=method, out_dir=str(tmp_path / method), max_steps=1, **TINY))
        model, config = load_model(r["checkpoint"])
        assert not model.training and config["method"] == method
        ref = load_checkpoint(r["checkpoint"])["model"]
        assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
        x = torch.rand(2, 1, 8, 8)
        if model.kind == "supervised":
            assert model.logits(x).shape == (2, 10)
        else:
            assert model.encode(x)[0].shape == (2, model.d_z)
    assert json.loads((tmp_path / "trades" / "config.json").read_text())["beta_robust"] == 6.0


def test_lars_excludes_bias_and_norm():
    model = build_model(vars(_cfg("simclr")))
    groups = param_groups(model)
    assert all(p.ndim > 1 for p in groups[0]["params"]) and all(p.ndim <= 1 for p in groups[1]["params"])
    assert groups[1]["exclude"] and groups[1]["weight_decay"] == 0.0
    opt = LARS(groups, lr=0.1, weight_decay=1e-4)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in groups[1]["params"]]
    opt.step()
    for b, p in zip(before, groups[1]["params"]):  # plain SGD: step lr * grad, no trust ratio, no decay
        torch.testing.assert_close(p, b - 0.1)


def test_dist_timeout_reaches_the_process_group(monkeypatch):
    # a torchrun worker's environment; init_process_group stops the run once it has been handed its arguments
    import datetime

    import torch.distributed as dist

    seen = []

    def record(**kwargs):
        seen.append(kwargs)
        raise RuntimeError("recorded")

    for k, v in dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(dist, "init_process_group", record)
    for extra, seconds in (([], 300), (["--dist-timeout", "42.5"], 42.5)):
        with pytest.raises(RuntimeError, match="recorded"):
            main(["--dataset", "digits", "--device", "cpu", "--no-progress", *extra])
        assert seen.pop() == {"backend": "gloo", "timeout": datetime.timedelta(seconds=seconds)}
    assert main(["--dataset", "digits", "--dist-timeout", "0"]) == 2 and not seen  # refused before the group


def test_tensorboard_flag(tmp_path, capsys):
    try:
        import tensorboard  # noqa: F401 - optional, not in requirements.txt
    except ImportError:
        tensorboard = None
    train(TrainConfig(method="simclr", out_dir=str(tmp_path), max_steps=2, tensorboard=True, **TINY))
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(rows) >= 2  # metrics.jsonl is written either way
    if tensorboard is None:  # the README's promise without the package: a note, and the run goes on
        assert "tensorboard is not installed; metrics go to metrics.jsonl only" in capsys.readouterr().err
        assert not (tmp_path / "tb").exists()
    else:
        assert any(f.name.startswith("events.out.tfevents") for f in (tmp_path / "tb").iterdir())


def test_lars_trust_ratio_on_decayed_weights():
    # by hand: w = [3, 4] (norm 5), weight decay 0.1 adds [0.3, 0.4] to the gradient [0.3, -0.4], giving
    # [0.6, 0] (norm 0.6); the trust ratio 0.012 * 5 / 0.6 = 0.1 scales it to [0.06, 0]; lr 0.5 moves w by 0.03
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=torch.float64))
    opt = LARS([{"params": [w], "exclude": False}], lr=0.5, momentum=0.9, weight_decay=0.1, trust_coef=0.012)
    w.grad = torch.tensor([[0.3, -0.4]], dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([[2.97, 4.0]], dtype=torch.float64))
    # the second step adds the momentum of the first (0.9 x [0.06, 0]) to the newly scaled gradient
    opt.step()
    g = [0.3 + 0.1 * 2.97, -0.4 + 0.1 * 4.0]
    trust = 0.012 * math.hypot(2.97, 4.0) / math.hypot(*g)
    expect = [2.97 - 0.5 * (0.9 * 0.06 + trust * g[0]), 4.0 - 0.5 * trust * g[1]]
    torch.testing.assert_close(w.detach(), torch.tensor([expect], dtype=torch.float64))


def test_the_logged_lr_follows_scaling_warmup_and_cosine(tmp_path):
    # lr = base_lr * batch / 256 = 0.8 * 32 / 256 = 0.1; 2 steps an epoch, 4 warm-up steps of 8: the factor is
    # (s + 1) / 4 while s < 4, then 0.5 (1 + cos(pi (s - 4) / 4)); the log holds the lr after step s's update
    train(TrainConfig(method="simclr", dataset="digits", train_subset=64, batch_size=32, epochs=4,
                      warmup_epochs=2, base_lr=0.8, optimizer="sgd", progress=False, log_every=1, threads=1,
                      out_dir=str(tmp_path)))
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in rows if "lr" in r}
    expect = {1: 0.05, 2: 0.075, 3: 0.1, 4: 0.1, 5: 0.1 * (0.5 + 0.5 * math.sqrt(0.5)), 6: 0.05,
              7: 0.1 * (0.5 - 0.5 * math.sqrt(0.5)), 8: 0.0}
    assert lrs.keys() == expect.keys()
    for step, lr in expect.items():
        assert lrs[step] == pytest.approx(lr, abs=1e-12), step
    # the same scaling at the design card's scale, from the optimiser itself
    from urkle_fast.optim import make_optimizer
    from urkle_fast.train import parse_args

    card = resolve_config(parse_args(["--dataset", "imagenet", "--batch", "4096"]))
    opt = make_optimizer(card, torch.nn.Linear(3, 2))
    assert isinstance(opt, LARS) and [g["lr"] for g in opt.param_groups] == pytest.approx([4.8, 4.8])


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_trained_model_runs_compiled_with_the_same_loss(tmp_path, backend):
    r = train(TrainConfig(method="simclr_urkle", out_dir=str(tmp_path), max_steps=2, **TINY))
    model, config = load_model(r["checkpoint"])
    cfg = TrainConfig(**config)
    x, y = as_tensors(load_dataset("digits", split="test"), limit=32)
    crops = MultiViewAugment(2, 8, cfg.augment)(x, torch.Generator().manual_seed(0))
    model.train()
    urkle, hp = get_method("simclr_urkle"), LossParams.of(cfg)
    torch.manual_seed(0)
    eager, _ = urkle.loss(model, crops, y, hp, cfg.beta_robust)
    eager.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    compile_model(model, backend)
    torch.manual_seed(0)
    compiled, _ = urkle.loss(model, crops, y, hp, cfg.beta_robust)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():  # the compiled step trains the same way, not only scores the same
        torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")


needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data not found at {DATA}")


@needs_data
def test_mnist_vae_urkle_run(tmp_path):
    r = train(TrainConfig(method="vae_urkle", data_root=str(DATA), out_dir=str(tmp_path),
                          **{**TINY, "dataset": "mnist", "train_subset": 64, "max_steps": 3}))
    model, config = load_model(r["checkpoint"])
    assert config["arch"] == "mnist_conv" and model.d_z == 128 and math.isfinite(r["loss"])
    assert model.decode(torch.zeros(1, 128)).shape == (1, 1, 28, 28)


@needs_data
def test_cifar10_jpeg_folder_run(tmp_path):
    # ImageFolder JPEG tree, DataLoader workers, ResNet-18 with the CIFAR stem, light augmentation
    r = train(TrainConfig(method="at", out_dir=str(tmp_path),
                          **{**TINY, "dataset": "cifar10", "train_subset": 32, "batch_size": 16, "max_steps": 1,
                             "pgd_steps": 1, "num_workers": 1}))
    model, config = load_model(r["checkpoint"])
    assert config["arch"] == "resnet18" and config["augment"] == "light" and model.kind == "supervised"
    assert abs(config["eps"] - 8 / 255) < 1e-9 and math.isfinite(r["loss"])


def test_compile_flag_in_the_trainer(tmp_path):
    kw = {**TINY, "max_steps": 2}
    eager = train(TrainConfig(method="simclr_urkle", out_dir=str(tmp_path / "eager"), **kw))
    compiled = train(TrainConfig(method="simclr_urkle", out_dir=str(tmp_path / "compiled"), compile=True,
                                 compile_backend="aot_eager", **kw))
    assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-5, abs=1e-6)
    a, b = _params(eager["checkpoint"]), _params(compiled["checkpoint"])
    assert set(a) == set(b)  # no _orig_mod. prefixes
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)


def test_design_card_command_line_parses():
    # python -m urkle_fast.train --dataset imagenet --batch 4096
    from urkle_fast.train import parse_args

    cfg = parse_args(["--dataset", "imagenet", "--batch", "4096"])
    assert cfg.dataset == "imagenet" and cfg.batch_size == 4096
    # docs/PROTOCOL.md sec 6 defaults for the paper's datasets
    c = resolve_config(parse_args(["--dataset", "imagenet"]))
    assert (c.arch, c.stem, c.image_size, c.batch_size, c.epochs) == ("resnet50", "imagenet", 224, 4096, 200)
    assert c.eps == pytest.approx(2 / 255) and c.base_lr * c.batch_size / 256 == pytest.approx(4.8)
    c = resolve_config(parse_args(["--dataset", "cifar10"]))
    assert (c.arch, c.stem, c.batch_size, c.epochs) == ("resnet18", "cifar", 1024, 2000)
    assert c.base_lr * c.batch_size / 256 == pytest.approx(1.2) and c.eps == pytest.approx(8 / 255)
    with pytest.raises(ValueError, match="must be positive"):
        resolve_config(parse_args(["--dataset", "digits", "--epochs", "0"]))


def test_design_card_command_runs_a_step_of_4096_real_images(tmp_path, data_root, capsys):
    """The card's command as given (--dataset imagenet, --batch 4096, no --micro-batch) on the real Tiny ImageNet
    tree, shrunk only in what a CI core can afford (16 pixels, a quarter-width ResNet-18, one PGD step): its first
    step decodes and augments 4096 JPEGs through the ImageNet path, --micro-batch auto says what it chose, and the
    step finishes with a finite loss. (At 64 pixels: BENCHMARKS.md, bench/results/cpu_card_command_64px.txt.)"""
    import json
    import math

    card = ["--dataset", "imagenet", "--data-root", str(data_root / "tiny-imagenet-100"), "--batch", "4096"]
    small = ["--image-size", "16", "--arch", "resnet18_w16", "--pgd-steps", "1", "--max-steps", "1", "--threads", "1",
             "--num-workers", "0", "--no-progress", "--log-every", "1"]
    assert main([*card, *small, "--out-dir", str(tmp_path / "card")]) == 0
    err = capsys.readouterr().err
    assert "--micro-batch auto: the whole batch (4096 images per process)" in err or \
        "images per chunk (" in err and "of the 4096 per process)" in err, err[-2000:]
    (m,) = [json.loads(ln) for ln in (tmp_path / "card" / "metrics.jsonl").read_text().splitlines()]
    assert m["step"] == 1 and math.isfinite(m["loss"])
    assert json.loads((tmp_path / "card" / "config.json").read_text())["batch_size"] == 4096


def test_out_of_memory_in_a_step_says_how_to_fit(tmp_path, monkeypatch, capsys):
    def oom(self, *args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(Method, "loss", oom)
    rc = main(["--dataset", "digits", "--batch", "32", "--micro-batch", "32", "--max-steps", "1", "--no-progress",
               "--out-dir", str(tmp_path / "oom")])
    err = capsys.readouterr().err
    assert rc == 4
    assert "out of memory in the step at 32 images x 4 encoder rows each per process" in err and "--micro-batch M" in err


def test_run_writes_training_curves(tmp_path):
    """Every run ends with <out-dir>/curves.png drawn from its metrics.jsonl; bad metrics files are clear errors."""
    from urkle_fast.evaluation.plots import plot_training_curves, read_metrics

    res = train(TrainConfig(method="simclr_urkle", out_dir=str(tmp_path / "a"), max_steps=3, **TINY))
    png = Path(res["checkpoint"]).parent / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    recs = read_metrics(tmp_path / "a" / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3] and {"loss", "nt_xent", "urkle_kl", "lr"} <= recs[-1].keys()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_metrics(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="holds no records yet"):
        plot_training_curves({"x": str(tmp_path / "empty.jsonl")}, str(tmp_path / "x.png"))
    (tmp_path / "bad.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_metrics(tmp_path / "bad.jsonl")


@pytest.mark.slow
def test_default_command_runs_end_to_end(tmp_path):
    """The README's main job (`python -m urkle_fast.train`, here with --out-dir): trains both models,
    evaluates them and prints the table, in which SimCLR+Urkle keeps far more accuracy under the
    worst case of every attack (PGD, APGD-CE, APGD-T / APGD-DLR with EOT, Square, the transfer from z = mu)
    than plain SimCLR, with 95% intervals that do not overlap."""
    proc = subprocess.run([sys.executable, "-m", "urkle_fast.train", "--demo", "--no-progress", "--out-dir",
                           str(tmp_path / "demo")], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| simclr_urkle |" in proc.stdout and "| simclr |" in proc.stdout and "worst 0.1" in proc.stdout
    assert "worst case over every attack" in proc.stdout and "transfer from z=mu" in proc.stdout
    res = json.loads((tmp_path / "demo" / "eval" / "results.json").read_text())["models"]
    for path in ("samples", "mu"):
        urkle = res["simclr_urkle"]["budgets"]["all"]["paths"][path]
        plain = res["simclr"]["budgets"]["all"]["paths"][path]  # deterministic: one prediction
        assert urkle["worst"]["0.1"] > plain["worst"]["0.1"] + 0.3, (path, urkle["worst"], plain["worst"])
        assert urkle["worst_ci"]["0.1"][0] > plain["worst_ci"]["0.1"][1]
        assert plain["clean"] > 0.8 and urkle["clean"] > 0.8
    s = res["simclr_urkle"]["budgets"]["all"]["paths"]["samples"]
    assert {"pgd", "apgd", "apgd-dlr", "square"} <= set(s["attacks"]) and "transfer" in s
    assert s["worst"]["0.1"] <= min([s[a]["0.1"] for a in s["attacks"]] + [s["transfer"]["0.1"]]) + 1e-9
    for f in ("training_curves.png", "accuracy_vs_eps.png", "table.md"):
        assert (tmp_path / "demo" / "eval" / f).is_file()
