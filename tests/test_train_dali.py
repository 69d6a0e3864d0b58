"""The trainer on ImageNet-layout data through NVIDIA DALI (CPU pipelines here; real JPEGs): runs,
resumes bit for bit (the DALI loader's state travels in the checkpoint), shards under torchrun, and
refuses what DALI cannot read with clear errors."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("nvidia.dali")

from urkle_fast.train import TrainConfig, main, train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
TINY_IN = DATA / "tiny-imagenet-100"
SAMPLES = DATA / "imagenet-samples"
RUN = dict(dataset="folder", data_root=str(TINY_IN), arch="resnet18", image_size=32, batch_size=16, epochs=1,
           pgd_steps=1, progress=False, log_every=1, threads=2, loader="dali")


@pytest.fixture(autouse=True)
def _needs_data():
    if not TINY_IN.is_dir() or not SAMPLES.is_dir():
        pytest.skip(f"shared data not found under {DATA}")


def _weights(path):
    return torch.load(path, weights_only=True)


def test_dali_run_resumes_exactly(tmp_path):
    full = train(TrainConfig(out_dir=str(tmp_path / "full"), max_steps=4, **RUN))
    train(TrainConfig(out_dir=str(tmp_path / "part"), max_steps=2, **RUN))
    part = train(TrainConfig(out_dir=str(tmp_path / "part"), max_steps=4, resume="auto", **RUN))
    a, b = _weights(full["checkpoint"]), _weights(part["checkpoint"])
    assert a["config"]["loader"] == "dali" and len(a["loader_ranks"]) == 1
    assert a["step"] == b["step"] == 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # and the run did learn something: the weights moved
    from urkle_fast.models import build_model

    torch.manual_seed(a["config"]["seed"])  # the trainer's initialisation
    z = build_model(a["config"]).state_dict()
    assert not all(torch.equal(a["model"][k], z[k]) for k in z if "running" not in k and "num_batches" not in k)


def test_imagenet_design_card_command_on_full_size_photos(tmp_path):
    """`--dataset imagenet` with DALI on the 100 full-size ImageNet photos (flat ImageFolder)."""
    rc = main(["--dataset", "imagenet", "--data-root", str(SAMPLES), "--loader", "dali", "--arch", "resnet18",
               "--image-size", "64", "--batch", "8", "--max-steps", "2", "--pgd-steps", "1", "--no-progress",
               "--out-dir", str(tmp_path / "inet")])
    assert rc == 0
    ck = _weights(tmp_path / "inet" / "checkpoint.pt")
    assert ck["step"] == 2 and ck["config"]["stem"] == "cifar" and ck["config"]["eps"] == pytest.approx(2 / 255)
    assert torch.isfinite(torch.tensor(ck["loss"]))


def test_auto_loader_is_torch_on_the_cpu(tmp_path):
    res = train(TrainConfig(out_dir=str(tmp_path / "auto"), max_steps=1, train_subset=64,
                            **{**RUN, "loader": "auto"}))
    assert _weights(res["checkpoint"])["config"]["loader"] == "torch"


def test_dali_loader_errors(tmp_path, capsys):
    assert main(["--dataset", "digits", "--loader", "dali", "--out-dir", str(tmp_path / "d")]) == 2
    assert "--loader dali reads ImageFolder JPEG trees; dataset 'digits' is not one" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--train-subset / --label-budget need --loader torch"):
        train(TrainConfig(out_dir=str(tmp_path / "s"), train_subset=32, **RUN))
    with pytest.raises(ValueError, match="augmentation presets"):
        train(TrainConfig(out_dir=str(tmp_path / "p"), augment="digits", **RUN))
    with pytest.raises(ValueError, match="--loader must be auto, torch or dali, got 'ffcv'"):
        train(TrainConfig(out_dir=str(tmp_path / "l"), **{**RUN, "loader": "ffcv"}))


@pytest.mark.slow
def test_dali_shards_under_torchrun(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "urkle_fast.train", "--dataset", "folder", "--data-root", str(TINY_IN), "--arch", "resnet18",
           "--image-size", "32", "--batch", "16", "--max-steps", "2", "--pgd-steps", "1", "--device", "cpu",
           "--loader", "dali", "--threads", "1", "--num-workers", "1", "--no-progress", "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ck = _weights(tmp_path / "checkpoint.pt")
    assert ck["world_size"] == 2 and ck["step"] == 2 and len(ck["loader_ranks"]) == 2
    assert ck["loader_ranks"][0] != ck["loader_ranks"][1]  # each rank's own shard and position
