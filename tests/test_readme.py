"""The README's promises: its code example runs as written, and its commands are the ones CI runs."""

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_code_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks, "README has no python example"
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)  # noqa: S102 - our own README
    assert torch.isfinite(scope["loss"]) and scope["loss"].item() > 0
    x_adv, x, eps = scope["x_adv"], scope["x"], scope["eps"]
    assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert all(p.grad is not None for p in scope["encoder"].parameters())


def test_ci_runs_the_readme_commands():
    bash_blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    install, tests = bash_blocks[0].strip(), bash_blocks[1].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci, f"CI must run the README's test command {tests!r}"
    assert "python -m urkle_fast.train" in install
    for step in ("pip install -q -r requirements.txt", "--no-build-isolation -e ."):
        assert step.split("-q ")[-1] in install and step in ci


def test_readme_torchrun_commands_parse():
    """Every `torchrun ... -m urkle_fast.train ARGS` line of the README is a valid trainer command line."""
    import shlex

    from urkle_fast.train import parse_args

    lines = [ln.strip() for ln in README.splitlines() if ln.strip().startswith("torchrun ")]
    assert len(lines) >= 2
    for ln in lines:
        argv = shlex.split(ln.split("#")[0])
        cfg = parse_args(argv[argv.index("urkle_fast.train") + 1:])
        assert cfg.batch_size > 0
    big = parse_args(shlex.split(lines[0])[shlex.split(lines[0]).index("urkle_fast.train") + 1:])
    assert (big.dataset, big.batch_size, big.micro_batch) == ("imagenet", 4096, 128)
