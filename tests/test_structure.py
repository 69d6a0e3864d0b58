"""The trainer half's shape: one method registry, one table of defaults, a short loop, CLIs from dataclasses.

These tests hold the promises of the README's developer section: a method is one object (and a new
one, registered from outside, trains and micro-batches with no other change), train() is setup plus a
short loop, no function in urkle_fast/ is over 100 lines, train does not import eval, and the README's
defaults table is the code's.
"""

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from urkle_fast import defaults, methods
from urkle_fast.data import PRESETS, MultiViewAugment, as_tensors, load_dataset
from urkle_fast.eval import EvalConfig
from urkle_fast.eval import parse_args as eval_parse_args
from urkle_fast.methods import METHODS, ExtraTerm, LossParams, Method, get_method, register
from urkle_fast.microbatch import micro_batched_step
from urkle_fast.models import FAMILIES, build_model
from urkle_fast.train import TrainConfig, parse_args, resolve_config, train

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "urkle_fast"

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ------------------------------------------------------------------------------------------------
# the method registry


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_registered_method_builds_its_model_and_names_its_facts(name):
    m = get_method(name)
    assert m.name == name and m.family in FAMILIES and m.crops_per_image >= 1 and m.forward_rows >= 1
    assert all(p in PRESETS for p in m.presets) and m.summary
    assert m.contrastive == (m.inputs is not None) == (m.per_sample is None)
    cfg = resolve_config(TrainConfig(method=name, dataset="digits"))
    cfg.num_classes = 10
    assert (cfg.family, cfg.beta_robust, cfg.augment) == (m.family, m.default_beta, m.preset(1))
    model = build_model(vars(cfg))
    assert model.kind == ("supervised" if m.family == "supervised" else "representation")
    if m.contrastive:
        assert model.projector is not None


def test_registry_refuses_duplicates_and_half_defined_methods():
    with pytest.raises(ValueError, match="registered twice"):
        register(METHODS["simclr"])
    with pytest.raises(ValueError, match="exactly one of inputs"):
        register(Method("half", "contrastive", 2, 2, 0.0, ("digits", "simclr"), "neither"))
    with pytest.raises(ValueError, match="unknown method 'byol'"):
        get_method("byol")


README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _readme_method() -> tuple:
    """The README's example method, run as written: its register() call adds it to METHODS (taken out again
    here; each test puts it back with monkeypatch). Returns the method and the scope its functions see."""
    import re

    block = next(b for b in re.findall(r"```python\n(.*?)```", README, flags=re.S) if "register(Method(" in b)
    scope = dict(vars(methods))  # the names of urkle_fast/methods.py, where the README says the code goes
    before = set(METHODS)
    exec(compile(block, "README.md", "exec"), scope)  # noqa: S102 - our own README
    (name,) = set(METHODS) - before
    return METHODS.pop(name), scope


def test_a_new_method_is_one_object(monkeypatch, tmp_path):
    """Registered from outside: the trainer, its micro-batched path (the gradient cache never names a
    method) and checkpoints work with nothing else changed; chunks give the whole batch's gradient."""
    NEW, scope = _readme_method()
    assert (NEW.name, NEW.forward_rows, NEW.extra.name) == ("urkle_first_crop", 3, "urkle_kl")
    monkeypatch.setitem(METHODS, NEW.name, NEW)
    cfg = resolve_config(TrainConfig(method=NEW.name, dataset="digits", eps=0.1, pgd_steps=1, pgd_alpha=0.1))
    cfg.num_classes = 10
    torch.manual_seed(0)
    model = build_model(vars(cfg)).train()
    for mod in list(model.modules()):  # chunked batch norm differs from whole-batch batch norm by design
        for child_name, child in list(mod.named_children()):
            if isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
                setattr(mod, child_name, torch.nn.Identity())
    x, y = as_tensors(load_dataset("digits", split="train"), limit=10)
    crops = MultiViewAugment(2, 8, cfg.augment)(x, torch.Generator().manual_seed(0))
    # a fixed deterministic "attack", so that the whole batch and its chunks see the same adversaries
    monkeypatch.setitem(scope, "_attack", lambda obj, x, hp, model, eot=1: (x + hp.eps * torch.sign(
        torch.sin(997.0 * x + 0.3))).clamp(0, 1))
    monkeypatch.setattr(type(model), "sample",
                        staticmethod(lambda mu, logvar: mu + torch.exp(0.5 * logvar) * torch.sin(131.0 * mu)))
    hp = LossParams.of(cfg)
    loss, metrics = NEW.loss(model, crops, y, hp, 0.5)
    loss.backward()
    whole = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    loss_c, metrics_c = micro_batched_step(model, NEW, crops, y, hp, 0.5, micro=4)
    torch.testing.assert_close(loss_c, loss.detach(), atol=1e-5, rtol=1e-5)
    assert metrics.keys() == metrics_c.keys() == {"nt_xent", "urkle_kl"}
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, whole[n], atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")
    monkeypatch.undo()
    monkeypatch.setitem(METHODS, NEW.name, NEW)
    res = train(TrainConfig(method=NEW.name, dataset="digits", train_subset=64, batch_size=32, epochs=1,
                            pgd_steps=1, micro_batch=12, progress=False, log_every=1, threads=1,
                            out_dir=str(tmp_path / "new")))
    assert res["step"] == 2 and torch.isfinite(torch.tensor(res["loss"]))


# ------------------------------------------------------------------------------------------------
# the shape of the code


def _functions():
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(REPO), node


def test_no_function_over_100_lines_and_train_is_setup_plus_a_short_loop():
    long = [f"{p}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)" for p, n in _functions()
            if n.end_lineno - n.lineno + 1 > 100]
    assert not long, long
    tree = ast.parse((PKG / "train.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train")
    assert fn.end_lineno - fn.lineno + 1 <= 80
    loop = next(n for n in ast.walk(fn) if isinstance(n, ast.For))
    assert loop.end_lineno - loop.lineno + 1 <= 40


def test_train_does_not_import_eval():
    tree = ast.parse((PKG / "train.py").read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in names if m.endswith("eval") or ".evaluation" in m], names
    code = "import sys, urkle_fast.train; print(sorted(m for m in sys.modules if m.startswith('urkle_fast.eval')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_library_modules_import_the_ops_not_the_package_face():
    for path in sorted(PKG.rglob("*.py")):
        if path.name == "__init__.py" and path.parent == PKG:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "urkle_fast":
                ops = {"gaussian_kl", "nt_xent", "pgd_step_", "pgd_random_start"} & {a.name for a in node.names}
                assert not ops, f"{path}: from urkle_fast import {ops}; import from urkle_fast.ops"


# ------------------------------------------------------------------------------------------------
# one table of defaults, and the command lines


@pytest.mark.parametrize("dataset", defaults.DATASETS)
def test_the_trainer_and_the_evaluator_read_the_one_table(dataset):
    row = defaults.DEFAULTS[dataset]
    c = resolve_config(TrainConfig(dataset=dataset))
    assert (c.arch, c.epochs, c.batch_size, c.eps) == (row.arch, row.epochs, row.batch, row.train_eps)
    from urkle_fast.eval import _resolve

    e = _resolve(EvalConfig(dataset=dataset))
    assert (tuple(e.eps), e.head, e.head_epochs, tuple(e.sweep_eps)) == (row.test_eps, row.head, row.head_epochs,
                                                                         row.sweep)


def test_paper_settings_and_the_readme_table():
    # the paper's hyper-parameter table: CIFAR-10 ResNet-18; CIFAR-100 and ImageNet ResNet-50
    assert [defaults.DEFAULTS[d].arch for d in ("cifar10", "cifar100", "imagenet")] == ["resnet18", "resnet50",
                                                                                         "resnet50"]
    assert defaults.markdown_table() in (REPO / "README.md").read_text()


def test_every_flag_has_help_and_help_shows_the_table():
    for cls in (TrainConfig, EvalConfig):
        for f in dataclasses.fields(cls):
            if f.metadata.get("cli", True):
                assert f.metadata.get("help", "").strip(), f"{cls.__name__}.{f.name} has no help"
    text = subprocess.run([sys.executable, "-m", "urkle_fast.train", "--help"], capture_output=True, text=True,
                          check=True).stdout
    assert "cifar100 resnet50" in text and "imagenet 4096" in text and "--batch-size" in text and "--batch " in text
    assert parse_args(["--batch", "64"]).batch_size == 64
    e = eval_parse_args(["--checkpoint", "a", "--checkpoint", "b", "--eps", "0.1", "0.2", "--no-plots"])
    assert e.checkpoint == ["a", "b"] and e.eps == [0.1, 0.2] and e.plots is False and e.label_budgets == ["all"]
