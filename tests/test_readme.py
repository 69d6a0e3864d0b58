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
    grads = [p.grad for p in scope["encoder"].parameters()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    # the adversaries moved away from x, and to where the KL is larger than at x itself (0)
    from urkle_fast import gaussian_kl
    with torch.no_grad():
        assert float(gaussian_kl(scope["mu0"], scope["lv0"], *scope["encoder"](x_adv))) > 0
    assert (x_adv - x).abs().max() > 0


def test_ci_runs_the_readme_commands():
    bash_blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    install, tests = bash_blocks[0].strip(), bash_blocks[1].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci, f"CI must run the README's test command {tests!r}"
    assert install.endswith("python -m urkle_fast.train")
    # every step of the first command before the default job (which runs inside the tests), word for word
    steps = install.split(" && ")
    assert len(steps) >= 3
    for step in steps[:-1]:
        assert step in ci, f"CI must run the README's install step {step!r} as written"


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


def test_readme_train_and_eval_command_lines_parse():
    """Every `python -m urkle_fast.train|eval ...` line of the README's bash blocks (continuations joined) is a
    valid command line of that module, and names what its text says."""
    import shlex

    from urkle_fast.eval import parse_args as eval_args
    from urkle_fast.train import parse_args as train_args

    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    lines = [ln.strip() for b in blocks for ln in b.replace("\\\n", " ").splitlines()]
    parsed = {"train": [], "eval": []}
    for ln in lines:
        argv = shlex.split(ln.split("#")[0])
        for mod, parse in (("train", train_args), ("eval", eval_args)):
            if f"urkle_fast.{mod}" in argv and argv[argv.index(f"urkle_fast.{mod}") - 1] == "-m" and "&&" not in argv:
                parsed[mod].append(parse(argv[argv.index(f"urkle_fast.{mod}") + 1:]))
    train_cfgs, (ev,) = parsed["train"], parsed["eval"]
    assert [c.method for c in train_cfgs[:2]] == ["simclr_urkle", "vae_urkle"] and len(train_cfgs) >= 3
    assert (train_cfgs[1].optimizer, train_cfgs[1].base_lr) == ("adamw", 0.006)
    assert (train_cfgs[2].dataset, train_cfgs[2].batch_size) == ("imagenet", 4096)
    assert ev.checkpoint == ["runs/a/checkpoint.pt", "runs/b/checkpoint.pt"] and ev.out == "runs/eval"
    assert [str(b) for b in ev.label_budgets] == ["all", "5000", "1000"]


def test_readme_python_api_example_runs(tmp_path, monkeypatch):
    """The README's Python API block (train, load, export, load the export without urkle_fast), as written."""
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    api = next(b for b in blocks if "export_encoder" in b)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(api, "README.md", "exec"), scope)  # noqa: S102 - our own README
    model, mu2 = scope["model"], scope["mu2"]
    assert scope["mu"].shape == (4, model.d_z) and mu2.shape == (7, model.d_z)
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        ref, got = model.encode(x), scope["encoder"](x)
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1])
    assert (tmp_path / "runs" / "api-example" / "encoder.pt2").is_file()
