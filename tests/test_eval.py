"""urkle_fast.eval: downstream head, averaged prediction, attacks, outputs, errors (digits, CPU, < ~90 s)."""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from urkle_fast.checkpoint import CheckpointError
from urkle_fast.eval import (EvalConfig, cli, evaluate_checkpoints, evaluate_models, load_eval_model, main, ok_bits,
                             subset_fingerprint, unpack_ok)
from urkle_fast.evaluation.attacks import _apgd_checkpoints, robust_accuracy
from urkle_fast.evaluation.datasets import load_split
from tiny_models import TinyStandard
from urkle_fast.evaluation.probe import (ProbabilisticClassifier, balanced_subset, bounded_log_probs, make_head,
                                         train_head)


class TinyRep(nn.Module):
    """Probabilistic encoder x -> (mu, logvar) with a settable log-variance offset."""

    kind = "representation"
    d_z = 16

    def __init__(self, logvar_offset: float = -2.0):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
        self.logvar_offset = logvar_offset

    def encode(self, x):
        h = self.net(x)
        return h[:, :16], torch.tanh(h[:, 16:]) + self.logvar_offset


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny models on a shared 2-core machine: one intra-op thread is ~20x faster than two fighting threads
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits():
    return load_split("digits", "train"), load_split("digits", "test")


@pytest.fixture(scope="module")
def standard(digits):
    train, _ = digits
    torch.manual_seed(0)
    m = TinyStandard()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(150):
        loss = F.cross_entropy(m.logits(train.x), train.y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


def test_standard_no_gradient_masking(digits, standard):
    """Accuracy of an undefended model falls monotonically with eps to ~0; APGD is at least as strong as PGD."""
    _, test = digits
    x, y = test.x[:200], test.y[:200]
    clf = ProbabilisticClassifier(standard)
    eps = [0.0, 0.05, 0.1, 0.2, 0.3, 0.5]
    acc = [robust_accuracy(clf, x, y, attack="pgd", eps=e, steps=20, seed=0) for e in eps]
    assert acc[0] > 0.9, acc
    assert all(b <= a + 1e-9 for a, b in zip(acc, acc[1:])), acc
    assert acc[-1] <= 0.02, acc
    for e in (0.05, 0.1):
        pgd = robust_accuracy(clf, x, y, attack="pgd", eps=e, steps=20, seed=0)
        apgd = robust_accuracy(clf, x, y, attack="apgd", eps=e, steps=20, seed=0)
        assert apgd <= pgd + 0.02, (e, pgd, apgd)


def test_square_attack_is_gradient_free_and_breaks_an_undefended_model(digits, standard):
    """Square (no gradients): stays in the ball and the box, only ever lowers each image's margin, is
    seeded, and takes an undefended model far below its clean accuracy."""
    from urkle_fast.evaluation.attacks import _margin, square_linf

    _, test = digits
    x, y = test.x[:200], test.y[:200]
    clf = ProbabilisticClassifier(standard)
    eps = 0.2
    start = square_linf(clf, x, y, eps=eps, queries=0, seed=3)  # the vertical-stripe start only
    adv = square_linf(clf, x, y, eps=eps, queries=300, seed=3)
    assert torch.equal(adv, square_linf(clf, x, y, eps=eps, queries=300, seed=3))
    assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        m0, m1 = _margin(clf(start), y), _margin(clf(adv), y)
    assert (m1 <= m0 + 1e-6).all() and (m1 < m0).float().mean() > 0.5
    clean = robust_accuracy(clf, x, y, attack="square", eps=0.0, steps=300)
    sq = robust_accuracy(clf, x, y, attack="square", eps=eps, steps=300, seed=3)
    assert clean > 0.9 and sq < 0.5 * clean, (clean, sq)
    with pytest.raises(ValueError, match="unknown attack 'fgsm'"):
        robust_accuracy(clf, x, y, attack="fgsm", eps=eps, steps=1)


def test_pgd_restarts_never_raise_accuracy(digits, standard):
    """Restart 0 is the single-run attack; an image must survive every restart, so accuracy can only fall."""
    _, test = digits
    x, y = test.x[:120], test.y[:120]
    clf = ProbabilisticClassifier(standard)
    one, ok1 = robust_accuracy(clf, x, y, attack="pgd", eps=0.1, steps=3, seed=0, return_correct=True)
    three, ok3 = robust_accuracy(clf, x, y, attack="pgd", eps=0.1, steps=3, seed=0, return_correct=True,
                                 restarts=3)
    assert not (ok3 & ~ok1).any() and three <= one
    assert robust_accuracy(clf, x, y, attack="pgd", eps=0.0, steps=3, restarts=3) == robust_accuracy(
        clf, x, y, attack="pgd", eps=0.0, steps=3)
    with pytest.raises(ValueError, match="restarts must be an int >= 1, got 0"):
        robust_accuracy(clf, x, y, attack="pgd", eps=0.1, steps=1, restarts=0)


def test_apgd_checkpoints_match_croce_hein():
    # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06): AutoAttack's 100-iteration schedule
    assert _apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]


def test_balanced_subset_is_balanced_and_seeded(digits):
    y = digits[0].y
    a = balanced_subset(y, 105, seed=3)
    assert torch.equal(a, balanced_subset(y, 105, seed=3))
    assert not torch.equal(a, balanced_subset(y, 105, seed=4))
    assert len(a) == 105 and len(set(a.tolist())) == 105
    counts = torch.bincount(y[a], minlength=10)
    assert counts.sum() == 105 and counts.min() >= 10 and counts.max() <= 11, counts
    assert torch.equal(balanced_subset(y, "all"), torch.arange(len(y)))
    with pytest.raises(ValueError, match="exceeds"):
        balanced_subset(y, 5000)
    with pytest.raises(ValueError):
        balanced_subset(y, "some")


def test_averaged_prediction_equals_mu_path_when_logvar_to_minus_inf(digits):
    x = digits[1].x[:64]
    torch.manual_seed(0)
    head = make_head("mlp3", 16, 10).eval()
    det = TinyRep(logvar_offset=-1e4).eval()  # sigma = exp(-5e3) = 0 exactly in float32
    s = ProbabilisticClassifier(det, head, path="samples", samples=10)(x)
    m = ProbabilisticClassifier(det, head, path="mu")(x)
    torch.testing.assert_close(s, m, atol=1e-6, rtol=0)
    noisy = TinyRep(logvar_offset=0.0).eval()
    noisy.load_state_dict(det.state_dict())
    s2 = ProbabilisticClassifier(noisy, head, path="samples", samples=10)(x)
    assert (s2 - ProbabilisticClassifier(noisy, head, path="mu")(x)).abs().max() > 1e-3
    assert torch.allclose(s2.exp().sum(-1), torch.ones(len(x)), atol=1e-5)


def test_bounded_softmax_bounds_nll_by_M():
    log_p = F.log_softmax(torch.randn(32, 10) * 200, dim=-1)
    assert (-log_p).max() > 20  # unbounded before
    for M in (2.5, 5.0, 10.0):
        b = bounded_log_probs(log_p, M)
        assert (-b).max() <= M + 1e-5
        torch.testing.assert_close(b.exp().sum(-1), torch.ones(32))
        assert torch.equal(b.argmax(-1), log_p.argmax(-1))  # order preserved
    with pytest.raises(ValueError):
        bounded_log_probs(log_p, math.log(10) - 0.1)  # C e^-M >= 1


def test_head_training_learns_on_frozen_features(digits):
    train, test = digits
    # a frozen random feature map with small noise still gives a useful linear probe on digits
    torch.manual_seed(0)
    rep = TinyRep(logvar_offset=-6.0).eval()
    with torch.no_grad():
        mu, lv = rep.encode(train.x)
    head = train_head(mu, lv, train.y, num_classes=10, head_kind="linear", epochs=60, lr=1e-2, seed=0)
    clf = ProbabilisticClassifier(rep, head, samples=4)
    acc = (clf(test.x).argmax(-1) == test.y).float().mean().item()
    assert acc > 0.6, acc


def test_evaluate_models_writes_table_json_pngs(tmp_path, digits, standard):
    torch.manual_seed(1)
    models = {"Standard": (standard, {"method": "standard"}), "Tiny VAE": (TinyRep(), {"method": "vae_urkle"})}
    res = evaluate_models(models, EvalConfig(dataset="digits", eps=[0.1, 0.2], out=str(tmp_path),
                                             label_budgets=["all", 100], samples=4, attack_steps=5, apgd_steps=5,
                                             n_test=60, sweep_eps=[0.0, 0.3], sweep_n_test=40, head_epochs=5,
                                             fig2_images=2, square_queries=0, eot_iter=2, verbose=False),
                          splits=digits)
    for f in ("table.md", "results.json", "accuracy_vs_eps.png", "accuracy_vs_eps_Standard.png",
              "accuracy_vs_eps_Tiny_VAE.png", "zspace_Tiny_VAE.png"):
        assert (tmp_path / f).is_file() and (tmp_path / f).stat().st_size > 0, f
    js = json.loads((tmp_path / "results.json").read_text())
    assert js["settings"]["n_test"] == 60 and js["label_budgets"] == ["all", "100"]
    r = js["models"]["Tiny VAE"]["budgets"]["100"]
    assert r["n_labels"] == 100
    for path in ("samples", "mu"):
        assert set(r["paths"][path]["pgd"]) == {"0.1", "0.2"} and set(r["paths"][path]["apgd"]) == {"0.1", "0.2"}
        assert 0.0 <= r["paths"][path]["clean"] <= 1.0
        bits = r["paths"][path]["ok_bits"]
        clean_ok = unpack_ok(bits["clean"], 60)
        assert clean_ok.float().mean().item() == pytest.approx(r["paths"][path]["clean"])
        for e in ("0.1", "0.2"):  # correct under every attack <= correct under any one
            worst = r["paths"][path]["worst"][e]
            assert worst <= min(r["paths"][path]["pgd"][e], r["paths"][path]["apgd"][e]) + 1e-9
            # the per-image record behind the worst case (for paired comparisons): its mean is the worst case,
            # and an image right under every attack is right clean
            ok = unpack_ok(bits["worst"][e], 60)
            assert ok.float().mean().item() == pytest.approx(worst) and not (ok & ~clean_ok).any()
    assert re.fullmatch(r"[0-9a-f]{16}", js["settings"]["test_fingerprint"])
    md = (tmp_path / "table.md").read_text()
    assert "| Standard |" in md and "| Tiny VAE |" in md and "PGD 0.1" in md and "APGD-CE 0.2" in md and "worst 0.1" in md
    assert md.count("## Task digit, labels") == 2  # 2 budgets
    assert res["models"]["Standard"]["budgets"]["all"]["paths"]["samples"]["clean"] > 0.9
    assert all(p.requires_grad for p in standard.parameters())  # the caller's model is left as it was


def test_per_image_bits_roundtrip_and_the_fingerprint_names_the_images():
    g = torch.Generator().manual_seed(0)
    for n in (1, 8, 13, 2000):  # whole and partial bytes
        ok = torch.rand(n, generator=g) < 0.3
        assert torch.equal(unpack_ok(ok_bits(ok), n), ok)
    x, y = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8, generator=g), torch.arange(5)
    f = subset_fingerprint(x, y)
    assert f == subset_fingerprint(x.clone(), y.clone())
    x2 = x.clone()
    x2[4, 2, 3, 3] ^= 1  # one pixel of the last image
    assert subset_fingerprint(x2, y) != f
    assert subset_fingerprint(x, y.flip(0)) != f  # the order is part of it (bits pair up by position)


def test_the_model_fingerprint_covers_what_the_model_computes_with():
    """Saved heads and attacks are keyed by it: the same weights under another sigma_min, another pixel scaling
    (non-persistent buffers, not in the state dict) or another architecture are another model; a rebuild with the
    same weights is the same one."""
    from urkle_fast.eval import fingerprint
    from urkle_fast.models import build_model
    from urkle_fast.train import TrainConfig, resolve_config

    config = vars(resolve_config(TrainConfig(method="simclr_urkle", dataset="digits")))
    torch.manual_seed(0)
    model = build_model(config)
    f = fingerprint(model)

    def rebuilt(**changes):
        m = build_model({**config, **changes})
        m.load_state_dict(model.state_dict())
        return fingerprint(m)

    assert rebuilt() == f and fingerprint(model.eval()) == f  # content, not identity or mode
    assert rebuilt(sigma_min=config["sigma_min"] * 2) != f
    assert rebuilt(variance="exp") != f
    assert rebuilt(pixel_mean=[m + 0.1 for m in config["pixel_mean"]]) != f
    assert "normalize.mean" not in model.state_dict()  # why the buffers are hashed on their own
    with torch.no_grad():
        model.head.fc.weight[0, 0] += 1e-3
    assert fingerprint(model) != f


def test_square_columns_in_the_table(tmp_path, digits, standard):
    res = evaluate_models({"Standard": (standard, {"method": "standard"})},
                          EvalConfig(dataset="digits", eps=[0.1], out=str(tmp_path), attack_steps=5, apgd_steps=5,
                                     square_queries=40, pgd_restarts=2, n_test=60, sweep_eps=[0.0], sweep_n_test=20,
                                     fig2_images=0, verbose=False), splits=digits)
    r = res["models"]["Standard"]["budgets"]["all"]["paths"]["mu"]
    assert res["settings"]["square_queries"] == 40
    assert r["worst"]["0.1"] <= min(r["pgd"]["0.1"], r["apgd"]["0.1"], r["square"]["0.1"]) + 1e-9
    assert 0.0 <= r["square"]["0.1"] <= 1.0
    md = (tmp_path / "table.md").read_text()
    assert "Square 0.1" in md and "worst 0.1" in md and "Square with 40 queries" in md
    assert "2 restarts" in md and res["settings"]["pgd_restarts"] == 2


def test_checkpoint_roundtrip_and_cli(tmp_path, capsys):
    """A checkpoint written by urkle_fast.train goes through evaluate_checkpoints and the CLI."""
    from urkle_fast.train import TrainConfig, train

    out = train(TrainConfig(method="standard", dataset="digits", out_dir=str(tmp_path / "std"), epochs=1,
                            max_steps=3, batch_size=64, progress=False, log_every=1000))
    ckpt = out["checkpoint"]
    vae = train(TrainConfig(method="vae_urkle", dataset="digits", out_dir=str(tmp_path / "vae"), epochs=1,
                            max_steps=2, batch_size=64, pgd_steps=1, progress=False, log_every=1000))["checkpoint"]
    res = evaluate_checkpoints({"Standard": ckpt, "VAE+Urkle": vae},
                               EvalConfig(dataset="digits", eps=[0.05, 0.1], out=str(tmp_path / "ev"),
                                          label_budgets=["all", 50], attack_steps=3, apgd_steps=3, n_test=30,
                                          sweep_eps=[0.0, 0.5], sweep_n_test=20, head_epochs=2, square_queries=0,
                                          eot_iter=2, verbose=False))
    assert res["models"]["Standard"]["kind"] == "supervised"
    assert res["models"]["Standard"]["checkpoint"] == ckpt
    assert res["models"]["VAE+Urkle"]["kind"] == "representation"
    assert res["models"]["VAE+Urkle"]["budgets"]["50"]["n_labels"] == 50
    r = res["models"]["VAE+Urkle"]["budgets"]["all"]["paths"]["samples"]
    assert set(r["pgd"]) == {"0.05", "0.1"} and 0.0 <= r["worst"]["0.1"] <= r["pgd"]["0.1"]
    assert (tmp_path / "ev" / "zspace_VAE_Urkle.png").is_file()
    cli = main(["--checkpoint", ckpt, "--name", "Std", "--eps", "0.1", "--out", str(tmp_path / "cli"),
                "--attack-steps", "2", "--apgd-steps", "0", "--square-queries", "0", "--n-test", "20", "--no-plots"])
    assert (tmp_path / "cli" / "table.md").is_file() and "Std" in cli["models"]
    assert cli["settings"]["apgd_steps"] == 0
    # the same --out for another evaluation: a one-line error naming the flags that differ, before any work
    from urkle_fast.eval import cli as eval_cli

    args = ["--checkpoint", ckpt, "--name", "Std", "--out", str(tmp_path / "cli"), "--attack-steps", "2",
            "--apgd-steps", "0", "--square-queries", "0", "--n-test", "20", "--no-plots"]
    before = (tmp_path / "cli" / "results.json").read_text()
    assert eval_cli([*args, "--eps", "0.2"]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "holds another evaluation (it differs in --eps)" in err and "--overwrite" in err
    assert (tmp_path / "cli" / "results.json").read_text() == before
    assert eval_cli([*args, "--eps", "0.2", "--overwrite"]) == 0
    assert '"0.2"' in (tmp_path / "cli" / "results.json").read_text()


def test_models_of_another_channel_count_or_image_size_are_refused():
    from urkle_fast.eval import check_models_match

    with pytest.raises(ValueError, match=r"^m: the model takes 3-channel images, --dataset 'digits' has 1$"):
        check_models_match({"m": (None, {"dataset": "digits", "in_channels": 3})}, "digits")
    with pytest.raises(ValueError, match=r"^m: the model was trained at 32 pixels, --dataset 'digits' images are 8$"):
        check_models_match({"m": (None, {"dataset": "digits", "image_size": 32})}, "digits")
    # a folder of images is resized to the model's size on loading, so any size is accepted there
    check_models_match({"m": (None, {"dataset": "imagenet", "image_size": 64, "in_channels": 3})}, "imagenet")


def test_a_model_at_chance_is_flagged(tmp_path, digits, standard):
    # a constant classifier (zero last layer: always class 0) is right on 1 image in 10 of the balanced test set,
    # and so is a head on a representation that maps every image to the same z
    const = TinyStandard()
    nn.init.zeros_(const.net[-1].weight), nn.init.zeros_(const.net[-1].bias)
    flat = TinyRep()
    nn.init.zeros_(flat.net[-1].weight), nn.init.zeros_(flat.net[-1].bias)
    cfg = EvalConfig(dataset="digits", eps=[0.1], out=str(tmp_path), attack_steps=2, apgd_steps=2, n_test=60,
                     square_queries=0, samples=2, eot_iter=1, head_epochs=2, sweep_eps=[0.0], sweep_n_test=20,
                     fig2_images=0, plots=False, verbose=False)
    with pytest.warns(UserWarning) as got:
        res = evaluate_models({"Const": (const.eval(), {"method": "standard"}), "Flat": (flat.eval(), {"method": "x"}),
                               "Standard": (standard, {"method": "standard"})}, cfg, splits=digits)
    said = " | ".join(str(w.message) for w in got)
    assert ("Const, task digit, labels all: the classifier's clean accuracy 10.0% is at chance (1/10): the "
            "classifier learned nothing" in said)
    assert "Flat, task digit, labels all: the head's clean accuracy 10.0% is at chance (1/10)" in said
    assert "Standard," not in said
    saved = json.loads((tmp_path / "results.json").read_text())
    for out in (res, saved):
        assert out["models"]["Const"]["budgets"]["all"]["at_chance"] is True
        assert out["models"]["Flat"]["budgets"]["all"]["at_chance"] is True
        assert "at_chance" not in out["models"]["Standard"]["budgets"]["all"]


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_eval_model(str(tmp_path / "missing.pt"))
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"this is not a torch checkpoint\x00\x01")
    with pytest.raises(CheckpointError, match="corrupt"):
        evaluate_checkpoints({"x": str(bad)}, EvalConfig(dataset="digits", eps=[0.1], out=str(tmp_path / "o")))
    with pytest.raises(ValueError, match="unknown dataset"):
        evaluate_checkpoints({"x": str(bad)}, EvalConfig(dataset="svhn", eps=[0.1], out=str(tmp_path / "o")))
    with pytest.raises(FileNotFoundError):
        evaluate_checkpoints({"x": str(tmp_path / "nope.pt")}, EvalConfig(dataset="digits", eps=[0.1],
                                                                         out=str(tmp_path / "o")))
    # the command line turns them into one-line errors with exit status 2
    assert cli(["--checkpoint", str(tmp_path / "nope.pt")]) == 2
    assert cli(["--checkpoint", str(bad), "--dataset", "digits"]) == 2


def _tiny_imagefolder(root, data_root, classes=4, train=12, val=6):
    """A small ImageFolder tree of symlinks to real Tiny ImageNet JPEGs: <root>/{train,val}/<wnid>/."""
    src = data_root / "tiny-imagenet-100"
    for wnid in sorted(p.name for p in (src / "train").iterdir())[:classes]:
        for split, n in (("train", train), ("val", val)):
            (root / split / wnid).mkdir(parents=True)
            for f in sorted((src / split / wnid).iterdir())[:n]:
                os.symlink(f, root / split / wnid / f.name)
    return root


def test_imagefolder_splits_stream_from_disk(tmp_path, data_root):
    """ImageFolder splits are not materialised: labels from the file list, images decoded on demand
    (uint8, at the model's size), the train split encoded batch by batch with the same result."""
    from urkle_fast.data import to_float01
    from urkle_fast.evaluation.probe import encode_dataset

    root = _tiny_imagefolder(tmp_path / "tin", data_root)
    train = load_split("folder", "train", str(root), image_size=32)
    assert train.x is None and train.y.tolist() == sorted(train.y.tolist()) and len(train.y) == 48
    assert train.num_classes == 4
    some = train.images(torch.tensor([0, 13, 47]))
    assert some.dtype == torch.uint8 and some.shape == (3, 3, 32, 32)  # centre crop at 32, no crop room
    assert sum(len(b) for b in train.batches(20)) == 48
    torch.manual_seed(0)
    from urkle_fast.models import build_model
    from urkle_fast.train import TrainConfig, resolve_config

    cfg = resolve_config(TrainConfig(dataset="folder", arch="resnet18", image_size=32, d_z=16, proj_hidden=32))
    enc = build_model(vars(cfg)).eval()
    mu_s, lv_s = encode_dataset(enc, train, batch_size=20)
    mu_t, lv_t = encode_dataset(enc, to_float01(train.images()), batch_size=20)
    torch.testing.assert_close(mu_s, mu_t)
    torch.testing.assert_close(lv_s, lv_t)
    test = load_split("folder", "test", str(root), image_size=32)
    assert test.x is None and len(test.y) == 24


def test_evaluate_a_checkpoint_on_an_imagefolder_tree(tmp_path, data_root):
    from urkle_fast.train import TrainConfig, train

    root = _tiny_imagefolder(tmp_path / "tin", data_root)
    ck = train(TrainConfig(dataset="folder", data_root=str(root), arch="resnet18", image_size=32, d_z=16,
                           proj_hidden=32, proj_dim=16, batch_size=16, epochs=1, max_steps=2, pgd_steps=1,
                           progress=False, out_dir=str(tmp_path / "run"), num_workers=0))["checkpoint"]
    res = evaluate_checkpoints({"urkle": ck}, EvalConfig(dataset="folder", eps=[2 / 255], out=str(tmp_path / "ev"),
                                                         attack_steps=2, apgd_steps=0, n_test=12, samples=2,
                                                         head_epochs=2, sweep_eps=[0.0], sweep_n_test=8, fig2_images=0,
                                                         verbose=False, num_workers=0, square_queries=0, eot_iter=1))
    r = res["models"]["urkle"]["budgets"]["all"]
    assert r["n_labels"] == 48 and res["settings"]["n_test"] == 12
    for path in ("samples", "mu"):
        acc = r["paths"][path]
        e = str(2 / 255)  # 12 images: each accuracy is k / 12, and an attack only takes images away
        assert 0.0 <= acc["worst"][e] <= acc["pgd"][e] <= acc["clean"] <= 1.0
        assert all(abs(12 * v - round(12 * v)) < 1e-9 for v in (acc["worst"][e], acc["pgd"][e], acc["clean"]))
    assert (tmp_path / "ev" / "table.md").is_file()


# ------------------------------------------------------------------------------------------------
# evaluation over torch.distributed ranks

EVAL_KW = dict(dataset="digits", eps=[0.2], label_budgets=["all", 100], attack_steps=1, apgd_steps=2,
               n_test=100, samples=3, sweep_eps=[0.0, 0.1], sweep_n_test=16, head_epochs=3, batch_size=16,
               fig2_images=0, verbose=False, device="cpu", num_workers=0, square_queries=10, eot_iter=2,
               apgd_targets=2)


def _eval_worker(rank, world, ckpts, out_dir, extra=None):
    torch.set_num_threads(1)
    res = evaluate_checkpoints(ckpts, EvalConfig(out=os.path.join(out_dir, "ev"), **{**EVAL_KW, **(extra or {})}))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({n: m["budgets"] for n, m in res["models"].items()} | {"sweep": {n: m["sweep"] for n, m in
                                                                              res["models"].items()}}, f)


@pytest.mark.slow
def test_two_ranks_evaluate_as_one_process(tmp_path):
    """2 gloo ranks split every image set in whole batches (7 of 16 test images per rank), gather the
    per-image scores and share rank 0's heads: every path (supervised, z = mu, and the S-sample prediction,
    whose z draws are seeded per batch) gives exactly the single-process numbers, both ranks return the same
    results, and only rank 0 writes files."""
    from test_distributed import _spawn

    from urkle_fast.demo import DEMO
    from urkle_fast.train import TrainConfig, train

    # models good enough that the attacks' random starts decide some predictions (so the test can fail)
    std = train(TrainConfig(method="standard", dataset="digits", out_dir=str(tmp_path / "std"), epochs=3,
                            batch_size=64, optimizer="adamw", base_lr=0.01, warmup_epochs=0,
                            progress=False))["checkpoint"]
    vae = train(TrainConfig(method="simclr_urkle", out_dir=str(tmp_path / "urkle"), progress=False,
                            **{**DEMO, "epochs": 6, "warmup_epochs": 1, "beta_warmup_epochs": 1}))["checkpoint"]
    ckpts = {"Standard": std, "SimCLR+Urkle": vae}
    single = evaluate_checkpoints(ckpts, EvalConfig(out=str(tmp_path / "single"), **EVAL_KW))
    _spawn(_eval_worker, 2, ckpts, str(tmp_path))
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0 == r1
    one = {n: m["budgets"] for n, m in single["models"].items()}
    assert r0["Standard"] == json.loads(json.dumps(one["Standard"]))
    for b in ("all", "100"):
        mu = r0["SimCLR+Urkle"][b]["paths"]["mu"]
        assert mu == json.loads(json.dumps(one["SimCLR+Urkle"][b]["paths"]["mu"]))
        assert mu["clean"] > 0.3 or b != "all"  # an informative representation
        s = r0["SimCLR+Urkle"][b]["paths"]["samples"]  # z streams reseeded per batch: the stochastic path too
        assert s == json.loads(json.dumps(one["SimCLR+Urkle"][b]["paths"]["samples"]))
    assert r0["sweep"]["Standard"] == json.loads(json.dumps(single["models"]["Standard"]["sweep"]))
    assert (tmp_path / "ev" / "table.md").is_file() and (tmp_path / "ev" / "results.json").is_file()
    # --cascade: every rank picks the same surviving images (the gathered worst case) and attacks its share of
    # their batches: again exactly the single process's numbers, on every path
    single = evaluate_checkpoints(ckpts, EvalConfig(out=str(tmp_path / "single_c"), cascade=True, **EVAL_KW))
    (tmp_path / "c").mkdir()
    _spawn(_eval_worker, 2, ckpts, str(tmp_path / "c"), {"cascade": True})
    c0, c1 = (json.loads((tmp_path / "c" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert c0 == c1
    for name, m in single["models"].items():
        assert c0[name] == json.loads(json.dumps(m["budgets"])), name
    assert c0["SimCLR+Urkle"]["all"]["paths"]["samples"]["worst"] != {}


def test_empty_shards_predict_and_encode_nothing(standard):
    """A rank whose shard is empty (fewer batches than ranks) gets empty results, not an error."""
    from urkle_fast.evaluation.probe import encode_dataset, predict

    clf = ProbabilisticClassifier(standard, None)
    assert predict(clf, torch.zeros(0, 1, 8, 8)).shape == (0,)
    mu, lv = encode_dataset(TinyRep(), torch.zeros(0, 1, 8, 8))
    assert mu.shape == lv.shape == (0, 16)


def test_batch_shards_cover_every_row_once():
    from urkle_fast.distributed import batch_shard

    for n, bs, W in [(100, 16, 2), (100, 16, 3), (7, 16, 4), (0, 8, 2), (64, 16, 4)]:
        parts = [batch_shard(n, bs, r, W) for r in range(W)]
        rows = [i for sl, _ in parts for i in range(n)[sl]]
        assert rows == list(range(n))
        for sl, b0 in parts:
            assert sl.start == min(n, b0 * bs) and (sl.start % bs == 0 or sl.start == n)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        batch_shard(10, 0, 0, 1)


@pytest.mark.slow
def test_torchrun_eval_cli_matches_one_process(tmp_path):
    """`torchrun -m urkle_fast.eval` with 2 gloo ranks, where one batch of 256 leaves rank 1 with nothing:
    same z = mu table as one process; rank 0 alone writes the outputs."""
    import subprocess
    import sys

    from urkle_fast.demo import DEMO
    from urkle_fast.train import TrainConfig, train

    ck = train(TrainConfig(method="simclr_urkle", out_dir=str(tmp_path / "run"), progress=False,
                           **{**DEMO, "epochs": 4, "warmup_epochs": 1, "beta_warmup_epochs": 1}))["checkpoint"]
    args = ["--checkpoint", ck, "--eps", "0.1", "--attack-steps", "2", "--apgd-steps", "2", "--n-test", "200",
            "--device", "cpu", "--sweep-eps", "0", "0.1", "--sweep-n-test", "32", "--head-epochs", "5",
            "--square-queries", "10", "--eot-iter", "2", "--apgd-targets", "2"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "urkle_fast.eval", *args, "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert cli([*args, "--out", str(tmp_path / "one")]) == 0
    two = json.loads((tmp_path / "two" / "results.json").read_text())["models"]["simclr_urkle"]["budgets"]["all"]
    one = json.loads((tmp_path / "one" / "results.json").read_text())["models"]["simclr_urkle"]["budgets"]["all"]
    assert two["paths"]["mu"] == one["paths"]["mu"]


def test_holdout_tests_on_training_images_the_model_never_saw(tmp_path):
    """--holdout N: the heads train on the training split minus its last N images (subset_order) and the attacks run
    on those N; a model trained on any of them is refused, naming the flag and the --train-subset that would do."""
    from urkle_fast.train import TrainConfig, train

    kw = dict(method="simclr_urkle", dataset="digits", epochs=1, max_steps=2, batch_size=64, pgd_steps=1,
              progress=False, log_every=1000)
    held_out = train(TrainConfig(out_dir=str(tmp_path / "sub"), train_subset=1000, **kw))["checkpoint"]
    ecfg = dict(dataset="digits", eps=[0.1], attack_steps=2, apgd_steps=0, square_queries=0, head_epochs=2,
                sweep_eps=[0.0], sweep_n_test=20, verbose=False, plots=False, samples=2, redraws=1, eot_iter=1)
    res = evaluate_checkpoints({"u": held_out}, EvalConfig(out=str(tmp_path / "ev"), holdout=400, **ecfg))
    assert res["settings"]["split"].startswith("holdout") and res["settings"]["n_train"] == 1037
    assert res["settings"]["n_test"] == 400
    everything = train(TrainConfig(out_dir=str(tmp_path / "all"), **kw))["checkpoint"]
    with pytest.raises(ValueError, match=r"--holdout 400: u was trained on the first 1437 training images.*"
                                         r"--train-subset 1037 or less"):
        evaluate_checkpoints({"u": everything}, EvalConfig(out=str(tmp_path / "ev2"), holdout=400, **ecfg))
    with pytest.raises(ValueError, match="--holdout must be an integer >= 1"):
        evaluate_checkpoints({"u": held_out}, EvalConfig(out=str(tmp_path / "ev3"), holdout=0, **ecfg))


def test_subset_order_spreads_imagefolder_subsets_over_classes(data_root):
    """ImageFolder trees are stored class by class: --train-subset and --holdout read them in a fixed shuffle, so that
    the first 1000 CIFAR-10 files cover every class (the first 1000 files on disk are all airplanes)."""
    from urkle_fast.data import load_dataset
    from urkle_fast.data.datasets import subset_order
    from urkle_fast.train import TrainConfig, _train_dataset, resolve_config

    root = data_root / "cifar10-jpeg"
    if not root.is_dir():
        pytest.skip("../shared/data/cifar10-jpeg is not here")
    assert torch.equal(subset_order(50, by_class=False), torch.arange(50))
    order = subset_order(50_000, by_class=True)
    assert torch.equal(order, subset_order(50_000, by_class=True)) and torch.equal(order.sort().values,
                                                                                  torch.arange(50_000))
    ds = _train_dataset(resolve_config(TrainConfig(dataset="cifar10", data_root=str(root), train_subset=1000)))
    labels = torch.tensor([ds.dataset.inner.targets[i] for i in ds.indices])
    assert len(ds) == 1000 and torch.bincount(labels, minlength=10).min() >= 60
    assert set(load_dataset("cifar10", str(root), "train").inner.targets[:1000]) == {0}
