"""Nothing lost, nothing executed: checkpoints that run code are refused, runs never destroy each other,
resume says what it applies and refuses the rest, finished runs are no-ops, divergence keeps a good
checkpoint, bad images are named (or skipped), every flag is checked before any work."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from urkle_fast.checkpoint import CheckpointError, load_checkpoint, load_model
from urkle_fast.eval import cli as eval_cli
from urkle_fast.train import TrainConfig, main, train

REPO = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "digits", "--train-subset", "64", "--batch", "32", "--epochs", "2", "--pgd-steps", "1",
        "--threads", "1", "--no-progress", "--log-every", "1", "--num-workers", "0"]

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _run(tmp_path, *extra, out="run"):
    return main([*TINY, "--out-dir", str(tmp_path / out), *extra])


class _Payload:
    """What an attacker would pickle: unpickling it runs a command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_runs_code_is_refused_on_resume_and_in_eval(tmp_path, capsys):
    assert _run(tmp_path, "--max-steps", "1") == 0
    marker = tmp_path / "PWNED"
    ckpt = tmp_path / "run" / "checkpoint.pt"
    state = load_checkpoint(ckpt)
    torch.save({**state, "rng": _Payload(marker)}, ckpt)
    capsys.readouterr()
    assert _run(tmp_path, "--resume") == 2
    err = capsys.readouterr().err
    assert "refusing to load checkpoint" in err and "posix.system" in err
    assert eval_cli(["--checkpoint", str(ckpt), "--out", str(tmp_path / "ev")]) == 2
    assert "refusing to load checkpoint" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="could run code"):
        load_model(ckpt)
    assert not marker.exists()


def test_an_out_dir_holding_a_run_is_refused_and_overwrite_starts_afresh(tmp_path, capsys):
    assert _run(tmp_path, "--max-steps", "2", "--ckpt-every", "1") == 0
    assert load_checkpoint(tmp_path / "run" / "checkpoint.prev.pt")["step"] == 1  # the final save kept it
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert _run(tmp_path, "--max-steps", "1") == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before
    assert _run(tmp_path, "--max-steps", "1", "--overwrite") == 0
    recs = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1]  # not appended to the old run's records
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 1
    assert not (tmp_path / "run" / "checkpoint.prev.pt").exists()  # the old run's, deleted with it


def test_resume_applies_runtime_flags_and_refuses_the_rest(tmp_path, capsys):
    assert _run(tmp_path, "--max-steps", "1") == 0
    capsys.readouterr()
    assert _run(tmp_path, "--resume", "--eps", "0.3", "--method", "simclr", "--max-steps", "2") == 2
    err = capsys.readouterr().err
    assert "--eps 0.3 (checkpoint: 0.15)" in err and "--method 'simclr' (checkpoint: 'simclr_urkle')" in err
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 1  # nothing ran
    # the default value given explicitly is still a difference from the checkpoint's
    assert main([*TINY, "--out-dir", str(tmp_path / "run"), "--resume", "--method", "simclr_urkle",
                 "--pgd-steps", "7"]) == 2
    assert "--pgd-steps 7 (checkpoint: 1)" in capsys.readouterr().err
    assert _run(tmp_path, "--resume", "--base-lr", "0.05", "--micro-batch", "16", "--max-steps", "2") == 0
    err = capsys.readouterr().err
    assert "applying --base-lr 0.05 (checkpoint: 0.3)" in err and "applying --micro-batch 16" in err
    cfg = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["config"]
    assert cfg["base_lr"] == 0.05 and cfg["micro_batch"] == 16 and cfg["eps"] == 0.15


def test_a_finished_run_rerun_is_a_no_op(tmp_path, capsys):
    assert _run(tmp_path, "--max-steps", "2") == 0
    ckpt = tmp_path / "run" / "checkpoint.pt"
    before, mtime = ckpt.read_bytes(), ckpt.stat().st_mtime_ns
    capsys.readouterr()
    assert _run(tmp_path, "--max-steps", "2", "--resume", "if-exists") == 0
    assert "nothing to do" in capsys.readouterr().err
    assert ckpt.read_bytes() == before and ckpt.stat().st_mtime_ns == mtime
    res = train(TrainConfig(out_dir=str(tmp_path / "run"), resume="auto", max_steps=2, progress=False))
    assert res["finished"] and res["step"] == 2 and res["model"].kind == "representation"


def test_a_diverging_run_exits_3_and_keeps_a_good_checkpoint(tmp_path, capsys):
    """Two healthy steps, then --base-lr 1e6: exit 3, the checkpoint on disk is the last one whose weights
    gave a finite loss (a periodic checkpoint is written only after that), and it resumes at a sane lr."""
    common = ["--ckpt-every", "1", "--optimizer", "sgd", "--warmup-epochs", "0", "--epochs", "8"]
    assert _run(tmp_path, *common, "--max-steps", "2") == 0
    capsys.readouterr()
    assert _run(tmp_path, *common, "--resume", "--base-lr", "1e6") == 3
    err = capsys.readouterr().err
    assert "diverged" in err or "loss is" in err or "NaN" in err
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    weights = [v for v in state["model"].values() if v.is_floating_point()]
    assert all(torch.isfinite(v).all() for v in weights) and max(v.abs().max().item() for v in weights) < 100
    assert _run(tmp_path, *common, "--resume", "--base-lr", "0.1") == 0
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 16


def _tamper_step(monkeypatch, at: int, change):
    """The trainer's real forward_backward, with ``change(run, loss)`` giving the loss of call ``at``."""
    import urkle_fast.train as T

    real, calls = T.forward_backward, []

    def wrapped(run, crops, labels, hp, beta):
        loss, metrics = real(run, crops, labels, hp, beta)
        calls.append(run.step)
        return (change(run, loss) if len(calls) - 1 == at else loss), metrics

    monkeypatch.setattr(T, "forward_backward", wrapped)
    return calls


def test_a_finite_loss_diverge_factor_times_the_first_stops_the_run(tmp_path, capsys, monkeypatch):
    # the third trigger of exit 3: finite, but 1e7 times the first step's loss (--diverge-factor 1e6)
    calls = _tamper_step(monkeypatch, 1, lambda run, loss: loss * 1e7)
    assert _run(tmp_path, "--max-steps", "3") == 3
    err = capsys.readouterr().err
    assert "at step 1" in err and "(the first step's: " in err and "stopped before the optimiser step" in err
    assert calls == [0, 1] and not (tmp_path / "run" / "checkpoint.pt").exists()
    # the same loss with the check off (--diverge-factor 0) trains on: the factor is what stopped it
    calls = _tamper_step(monkeypatch, 1, lambda run, loss: loss * 1e7)
    assert _run(tmp_path, "--max-steps", "3", "--diverge-factor", "0", out="off") == 0
    assert calls == [0, 1, 2]


def test_a_non_finite_value_inside_an_op_stops_the_run_with_exit_3(tmp_path, capsys, monkeypatch):
    import urkle_fast.train as T
    from urkle_fast.ops._checks import NonFiniteInputError

    def nan_inside(run, *args):
        raise NonFiniteInputError("gaussian_kl: mu_q holds NaN / inf")

    monkeypatch.setattr(T, "_forward_backward", nan_inside)
    assert _run(tmp_path, "--max-steps", "2") == 3
    err = capsys.readouterr().err
    assert "non-finite values inside step 0 of simclr_urkle (gaussian_kl: mu_q holds NaN / inf)" in err
    assert "none was written yet" in err and not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_model_holding_nan_is_never_written(tmp_path, capsys, monkeypatch):
    # a finite loss, then NaN in one weight (as a bad optimiser step would leave it): the final save refuses
    def poison(run, loss):
        with torch.no_grad():
            next(p for p in run.model.parameters() if p.dim() > 1).view(-1)[0] = float("nan")
        return loss

    _tamper_step(monkeypatch, 1, poison)
    assert _run(tmp_path, "--max-steps", "2") == 3
    err = capsys.readouterr().err
    assert "the model holds NaN / inf at step 2" in err and "the checkpoint was not written" in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_under_torchrun_an_error_never_writes_the_unchecked_periodic_snapshot(tmp_path, capsys):
    """A periodic snapshot is written only once the next step's loss is finite. An error in that step under
    torchrun may be a peer that stopped on NaN / inf (its checks are its own), so rank 0 writes nothing; a single
    process (where NaN is a NonFiniteLossError, not this path) writes the snapshot of the step it was taken at."""
    from types import SimpleNamespace

    from urkle_fast.train import _save_on_error

    for world, written in ((2, False), (1, True)):
        path = tmp_path / f"world{world}" / "checkpoint.pt"
        path.parent.mkdir()
        run = SimpleNamespace(ctx=SimpleNamespace(world_size=world, is_main=True), step=5, saved_step=3,
                              pending=(5, b"the snapshot of step 5"), ckpt_path=path)
        _save_on_error(run, 1.0)
        assert path.exists() == written, world
        if written:
            assert path.read_bytes() == b"the snapshot of step 5" and run.saved_step == 5 and run.pending is None
        else:
            assert run.pending is not None
    assert "saved the checkpoint of that step" in capsys.readouterr().err
    # the error-time write of an unchecked snapshot keeps the checkpoint it replaces; a checked one (the loop's, once
    # the next step's loss was finite) makes that backup obsolete and removes it
    from urkle_fast.train import write_pending

    path = tmp_path / "world1" / "checkpoint.pt"
    prev = tmp_path / "world1" / "checkpoint.prev.pt"
    run = SimpleNamespace(ckpt_path=path, pending=(7, b"the snapshot of step 7"), saved_step=5)
    write_pending(run, checked=False)
    assert prev.read_bytes() == b"the snapshot of step 5" and path.read_bytes() == b"the snapshot of step 7"
    run.pending = (9, b"the snapshot of step 9")
    write_pending(run)
    assert not prev.exists() and path.read_bytes() == b"the snapshot of step 9" and run.saved_step == 9


def test_an_error_inside_a_step_that_cannot_be_rolled_back_keeps_the_last_checkpoint(tmp_path, capsys):
    """A single process's error-time save rolls the failed step back (tests/test_train.py); where it cannot, it
    writes nothing: DALI's loader has already moved past the step's batch, and an error inside the optimiser step
    may leave the weights half updated."""
    from types import SimpleNamespace

    from urkle_fast.data.loader import TorchMultiView
    from urkle_fast.train import _save_on_error, _StepStart

    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"step 3")
    for loader, updating, said in ((object(), False, "DALI's loader cannot be rewound"),
                                   (TorchMultiView.__new__(TorchMultiView), True, "the weights may be half updated")):
        run = SimpleNamespace(ctx=SimpleNamespace(world_size=1, is_main=True), step=5, saved_step=3, pending=None,
                              ckpt_path=path, loader=loader)
        _save_on_error(run, 1.0, _StepStart(step=5, rng={}, buffers={}, updating=updating))
        assert path.read_bytes() == b"step 3" and said in capsys.readouterr().err


def test_a_second_run_on_a_running_runs_out_dir_is_refused(tmp_path, capsys):
    """A run's --out-dir is locked while it runs: another run started there (the same command twice, a requeue
    while the first still runs, --resume if-exists before the first checkpoint) is refused and touches nothing;
    once the first ends, the folder is free again."""
    from urkle_fast.checkpoint import claim_folder, release_folder

    run = tmp_path / "run"
    run.mkdir()
    first = claim_folder(run)  # the running run (the lock is per open file: the same process shows it too)
    (run / "metrics.jsonl").write_text("")  # a fresh run's log before its first record
    for extra in ([], ["--resume", "if-exists"], ["--overwrite"]):
        assert _run(tmp_path, "--max-steps", "1", *extra) == 2
        err = capsys.readouterr().err
        assert f"--out-dir {str(run)!r} is in use by another run (pid {os.getpid()} on " in err, extra
        assert sorted(p.name for p in run.iterdir()) == [".run.lock", "metrics.jsonl"]
    release_folder(first)
    (run / ".run.lock").unlink()
    (run / ".run.lock").mkdir()  # a lock file that cannot be opened: refused with the reason, nothing touched
    assert _run(tmp_path, "--max-steps", "1") == 2
    assert f"--out-dir {str(run)!r}: cannot lock it (IsADirectoryError" in capsys.readouterr().err
    (run / ".run.lock").rmdir()
    assert _run(tmp_path, "--max-steps", "1", "--resume", "if-exists") == 0
    assert _run(tmp_path, "--max-steps", "2", "--resume") == 0  # train() let go of it at the end


def test_a_torn_metrics_line_and_stale_temp_files_are_cleaned_on_resume(tmp_path, capsys):
    assert _run(tmp_path, "--max-steps", "1") == 0
    run = tmp_path / "run"
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "epoch": 0, "lo')  # kill -9 mid-write
    (run / ".checkpoint.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    assert _run(tmp_path, "--resume", "--max-steps", "2") == 0
    assert "dropped 1 torn line" in capsys.readouterr().err
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]
    assert not list(run.glob(".*.tmp"))


@pytest.mark.parametrize("flag,value,message", [
    ("--eps", "1.5", "--eps must be a number in [0, 1]"), ("--eps", "nan", "--eps must be a number in [0, 1]"),
    ("--base-lr", "0", "--base-lr must be a positive number"), ("--log-every", "0", "--log-every must be"),
    ("--threads", "0", "--threads must be an integer >= 1"), ("--ckpt-every", "-1", "--ckpt-every must be"),
    ("--train-subset", "0", "--train-subset must be"), ("--max-steps", "0", "--max-steps must be an integer >= 1"),
    ("--max-steps", "-3", "--max-steps must be"), ("--micro-batch", "0", "--micro-batch must be"),
    ("--temperature", "-1", "--temperature must be a positive number"), ("--pgd-steps", "-1", "--pgd-steps must be"),
])
def test_every_bad_flag_is_named_before_any_work(tmp_path, capsys, flag, value, message):
    assert main(["--dataset", "digits", "--out-dir", str(tmp_path / "bad"), flag, value]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bad" / "checkpoint.pt").exists()


@pytest.mark.parametrize("args,message", [
    (["--train-subset", "64", "--batch", "256"],
     "--batch-size 256 is larger than the training set (--train-subset 64): 64 images"),
    (["--method", "standard", "--label-budget", "100", "--batch", "128"],
     "--batch-size 128 is larger than the training set (--label-budget 100): 100 images"),
    (["--method", "standard", "--label-budget", "5000"], "--label-budget 5000: label budget 5000 exceeds the"),
    (["--device", "tpu"], "--device 'tpu': device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    (["--device", "cpu", "--dist-backend", "nccl"], "--dist-backend nccl needs CUDA devices, and --device 'cpu'"),
    (["--device", "cuda:x"], "--device 'cuda:x': device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    (["--compile-backend", "fast"], "--compile-backend must be one of torch.compile's backends (aot_eager, eager, "),
])
def test_flags_that_clash_with_the_data_or_the_machine_are_named(tmp_path, capsys, args, message):
    assert main(["--dataset", "digits", "--out-dir", str(tmp_path / "bad"), "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "bad" / "checkpoint.pt").exists()


def test_sync_bn_on_cpu_processes_under_torchrun_is_refused_before_the_group(tmp_path, capsys, monkeypatch):
    import torch.distributed as dist

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: pytest.fail("the group was started"))
    assert main(["--dataset", "digits", "--out-dir", str(tmp_path / "r"), "--device", "cpu", "--sync-bn"]) == 2
    assert "--sync-bn needs CUDA devices" in capsys.readouterr().err


def test_a_resume_on_a_changed_training_set_is_refused(tmp_path, data_root, capsys):
    """--data-root may change on resume (the data moved), but not what it holds: another number of images would
    change the steps per epoch, the schedule and the data order."""
    src = data_root / "tiny-imagenet-100" / "train"
    classes = sorted(p.name for p in src.iterdir())[:2]
    for c in classes:
        (tmp_path / "tree" / "train" / c).mkdir(parents=True)
        for f in sorted((src / c).iterdir())[:8]:
            os.symlink(f, tmp_path / "tree" / "train" / c / f.name)
    args = ["--dataset", "folder", "--data-root", str(tmp_path / "tree"), "--loader", "torch", "--num-workers", "0",
            "--image-size", "16", "--arch", "resnet18", "--d-z", "16", "--proj-hidden", "16", "--proj-dim", "8",
            "--batch", "8", "--epochs", "2", "--pgd-steps", "1", "--threads", "1", "--no-progress",
            "--out-dir", str(tmp_path / "run")]
    assert main([*args, "--max-steps", "1"]) == 0
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["n_train"] == 16
    capsys.readouterr()
    ninth = sorted((src / classes[0]).iterdir())[8]  # one more image of the first class
    os.symlink(ninth, tmp_path / "tree" / "train" / classes[0] / ninth.name)
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--resume: the training set now has 17 images" in err and "the checkpoint's run had 16" in err
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 1


def test_an_unwritable_out_dir_is_named(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["--dataset", "digits", "--out-dir", str(blocker / "sub")]) == 2
    assert "--out-dir" in capsys.readouterr().err


def _tree_with_a_truncated_jpeg(root, data_root):
    src = data_root / "tiny-imagenet-100" / "train"
    classes = sorted(p.name for p in src.iterdir())[:2]
    for c in classes:
        (root / "train" / c).mkdir(parents=True)
        for f in sorted((src / c).iterdir())[:8]:
            os.symlink(f, root / "train" / c / f.name)
    victim = sorted((root / "train" / classes[0]).iterdir())[0]
    data = victim.read_bytes()
    victim.unlink()
    victim.write_bytes(data[: len(data) // 3])  # a truncated download
    return victim


def test_a_truncated_jpeg_is_named_and_skipped_with_the_flag(tmp_path, data_root, capfd):
    """(capfd: the DataLoader worker that decodes writes the skip note to the process's stderr)"""
    victim = _tree_with_a_truncated_jpeg(tmp_path / "tree", data_root)
    args = ["--dataset", "folder", "--data-root", str(tmp_path / "tree"), "--loader", "torch", "--num-workers", "1",
            "--image-size", "16", "--arch", "resnet18", "--d-z", "16", "--proj-hidden", "16", "--proj-dim", "8",
            "--batch", "16", "--epochs", "1", "--pgd-steps", "1", "--threads", "1", "--no-progress"]
    assert main([*args, "--out-dir", str(tmp_path / "a")]) == 2
    err = capfd.readouterr().err
    assert victim.name in err and "--skip-bad-images" in err and err.count("\n") <= 2
    # the decoding worker is gone with the error: a worker left alive (it ignores SIGTERM) would hang the
    # interpreter's exit, where multiprocessing terminates and then joins its children
    import multiprocessing

    assert not [p for p in multiprocessing.active_children() if p.is_alive()]
    assert main([*args, "--out-dir", str(tmp_path / "b"), "--skip-bad-images"]) == 0
    err = capfd.readouterr().err
    assert f"skipping unreadable image {str(victim)!r}" in err and "1 unreadable image file(s) skipped" in err
    assert (tmp_path / "b" / "skipped_images.tsv").read_text().startswith(str(victim))


def test_an_unexpected_error_in_the_loop_keeps_the_last_completed_step(tmp_path, monkeypatch):
    from urkle_fast.methods import Method

    real, calls = Method.loss, {"n": 0}

    def flaky(self, *args):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("a bug in step 3")
        return real(self, *args)

    monkeypatch.setattr(Method, "loss", flaky)
    with pytest.raises(RuntimeError, match="a bug in step 3"):
        train(TrainConfig(dataset="digits", train_subset=64, batch_size=16, epochs=2, pgd_steps=1, threads=1,
                          progress=False, out_dir=str(tmp_path / "run")))
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 3
    monkeypatch.undo()
    res = train(TrainConfig(out_dir=str(tmp_path / "run"), resume="auto", progress=False))
    assert res["step"] == 8


def test_eval_checks_its_flags_and_the_checkpoint_before_any_work(tmp_path, capsys):
    assert _run(tmp_path, "--max-steps", "1") == 0
    ckpt = str(tmp_path / "run" / "checkpoint.pt")
    cases = [(["--eps", "-0.1"], "--eps must be in (0, 1]"), (["--samples", "0"], "--samples must be"),
             (["--n-test", "0"], "--n-test must be"), (["--dataset", "mnist"], "trained on 'digits'")]
    for extra, message in cases:
        assert eval_cli(["--checkpoint", ckpt, "--out", str(tmp_path / "ev"), *extra]) == 2
        assert message in capsys.readouterr().err, extra
    (tmp_path / "results.txt").write_text("precious")
    assert eval_cli(["--checkpoint", ckpt, "--out", str(tmp_path / "results.txt")]) == 2
    assert "is a file" in capsys.readouterr().err and (tmp_path / "results.txt").read_text() == "precious"
    if not torch.cuda.is_available():
        assert eval_cli(["--checkpoint", ckpt, "--device", "cuda", "--out", str(tmp_path / "ev")]) == 2
        err = capsys.readouterr().err
        assert "--device 'cuda': device 'cuda' was requested but torch.cuda.is_available() is False" in err
        assert err.count("\n") == 1
        assert main(["--dataset", "digits", "--out-dir", str(tmp_path / "cu"), "--device", "cuda"]) == 2
        assert "--device 'cuda': " in capsys.readouterr().err
    assert eval_cli(["--checkpoint", ckpt, "--out", str(tmp_path / "ev"), "--label-budgets", "all", "lots"]) == 2
    assert "--label-budgets: label budget must be 'all' or a positive integer, got 'lots'" in capsys.readouterr().err


def test_old_checkpoints_with_a_numpy_random_state_still_load(tmp_path):
    """Checkpoints written before the random states were stored as tensors hold numpy's as an array."""
    import numpy as np

    assert _run(tmp_path, "--max-steps", "1") == 0
    ckpt = tmp_path / "run" / "checkpoint.pt"
    state = load_checkpoint(ckpt)
    state["rng"] = dict(state["rng"], numpy=np.random.get_state())
    state["rng_ranks"] = [state["rng"]]
    torch.save(state, ckpt)
    assert load_checkpoint(ckpt)["rng"]["numpy"][0] == "MT19937"
    assert _run(tmp_path, "--resume", "--max-steps", "2") == 0


def test_resume_from_a_file_into_an_out_dir_holding_another_run_is_refused(tmp_path, capsys):
    assert _run(tmp_path, "--max-steps", "1", out="a") == 0
    assert _run(tmp_path, "--max-steps", "1", out="b") == 0
    before = (tmp_path / "b" / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert _run(tmp_path, "--resume", str(tmp_path / "a" / "checkpoint.pt"), "--max-steps", "2", out="b") == 2
    assert "holds another run" in capsys.readouterr().err
    assert (tmp_path / "b" / "checkpoint.pt").read_bytes() == before
    assert _run(tmp_path, "--resume", str(tmp_path / "a" / "checkpoint.pt"), "--max-steps", "2", out="c") == 0
    # --overwrite: b's own run goes, a's continues there from its step 1
    assert _run(tmp_path, "--resume", str(tmp_path / "a" / "checkpoint.pt"), "--max-steps", "2", "--overwrite",
                out="b") == 0
    recs = [json.loads(ln) for ln in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [2] and load_checkpoint(tmp_path / "b" / "checkpoint.pt")["step"] == 2


def test_l2_radii_above_one_and_skip_with_dali(tmp_path, capsys):
    assert main([*TINY, "--out-dir", str(tmp_path / "l2"), "--norm", "l2", "--eps", "1.5", "--max-steps", "1"]) == 0
    assert main([*TINY, "--out-dir", str(tmp_path / "d"), "--loader", "dali", "--skip-bad-images"]) == 2
    assert "--skip-bad-images works with --loader torch" in capsys.readouterr().err
