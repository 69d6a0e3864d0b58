"""The paper's baselines as the paper (and their official code) run them (issue 10, item 2).

Deterministic SimCLR / RoCL, RoCL's official attack step and 1/256 extra term (and its column-detached
similarity, checked against an independent transcription of the official loss.py), TRADES' separate
clean / adversarial passes, AE+TRADES' squared error, supervised models trained on a label budget, and
the beta ramp being an Urkle default only."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from urkle_fast.data import MultiViewAugment, as_tensors, load_dataset
from urkle_fast.data.datasets import balanced_subset
from urkle_fast.methods import LossParams, get_method
from urkle_fast.models import build_model
from urkle_fast.ops import nt_xent
from urkle_fast.ops.nt_xent import nt_xent_column_detached, nt_xent_reference
from urkle_fast.train import TrainConfig, _train_dataset, resolve_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _setup(method, B=12, seed=0, **kw):
    cfg = resolve_config(TrainConfig(method=method, dataset="digits", **kw))
    cfg.num_classes = 10
    torch.manual_seed(seed)
    model = build_model(vars(cfg)).train()
    x, y = as_tensors(load_dataset("digits", split="train"), limit=B)
    crops = MultiViewAugment(get_method(method).crops_per_image, 8, cfg.augment)(x, torch.Generator().manual_seed(seed))
    return cfg, model, crops, y


def _official_rocl_nt_xent(outputs: torch.Tensor, n_views: int, temperature: float = 0.5) -> torch.Tensor:
    """RoCL's loss.py (pairwise_similarity + NT_xent), transcribed independently of urkle_fast: cosine
    similarity with the columns detached, diagonal removed, -log of each positive's share, summed over a
    row's positives and divided by the number of rows (their 1e-8 guards dropped; +1 on the unread
    diagonal keeps log finite)."""
    N2 = outputs.shape[0]
    n = N2 // n_views
    u = outputs / outputs.norm(dim=1, keepdim=True)
    sim = torch.exp((u @ u.t().detach()) / temperature) * (1 - torch.eye(N2, dtype=u.dtype))
    nll = -torch.log(sim / sim.sum(1, keepdim=True) + torch.eye(N2, dtype=sim.dtype))  # (diagonal never read)
    total = 0.0
    for a in range(n_views):
        for b in range(n_views):
            if a != b:
                total = total + torch.diag(nll[a * n:(a + 1) * n, b * n:(b + 1) * n]).sum()
    return total / N2


def test_simclr_and_rocl_are_deterministic_encoders():
    for method in ("simclr", "rocl"):
        cfg, model, crops, _ = _setup(method)
        assert cfg.encoder == "deterministic" and model.deterministic
        mu, logvar = model.encode(crops[0])
        assert model.sample(mu, logvar) is mu  # no noise in training, none in evaluation
    cfg, model, _, _ = _setup("simclr_urkle")
    assert cfg.encoder == "gaussian" and not model.deterministic


def test_rocl_official_attack_step_and_weight():
    cfg = resolve_config(TrainConfig(method="rocl", dataset="cifar10"))
    assert cfg.pgd_steps == 7 and abs(cfg.eps - 8 / 255) < 1e-12
    assert abs(cfg.pgd_alpha - 0.007) < 1e-12  # official: k 7, alpha 0.007, epsilon 0.0314
    assert cfg.beta_robust == 1 / 256  # official lamda 256
    assert cfg.beta_warmup_epochs == 0  # no ramp on the official term
    # the Urkle methods keep the 2.5 * eps / steps rule
    assert abs(resolve_config(TrainConfig(method="simclr_urkle", dataset="cifar10")).pgd_alpha - 2.5 * 8 / 255 / 7) < 1e-12


@pytest.mark.parametrize("detach_columns", [False, True])
def test_rocl_loss_is_the_official_loss(detach_columns, monkeypatch):
    """Same adversaries, same projections: urkle_fast's RoCL loss equals the official 3-view loss + 1/256 x the
    2-view loss of (adversary, other view), in value, and (column-detached) in the gradient too."""
    from urkle_fast import methods as methods_mod

    cfg, model, crops, y = _setup("rocl", eps=0.1, pgd_steps=2, pgd_alpha=0.05, detach_columns=detach_columns)
    hp = LossParams.of(cfg)
    x_adv_fixed = (crops[0] + 0.05).clamp(0, 1)
    monkeypatch.setattr(methods_mod, "_attack", lambda objective, x, hp, model, eot=1: x_adv_fixed)
    model.eval()  # batch norm with running statistics: the official code's separate passes see the same numbers
    loss, metrics = get_method("rocl").loss(model, crops, y, hp, cfg.beta_robust)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    x1, x2 = crops[0], crops[1]
    out = model.project(model.encode(torch.cat([x1, x2, x_adv_fixed]))[0])
    out2 = model.project(model.encode(torch.cat([x_adv_fixed, x2]))[0])
    official = _official_rocl_nt_xent(out, 3) + (1 / 256) * _official_rocl_nt_xent(out2, 2)
    torch.testing.assert_close(loss, official, rtol=1e-5, atol=1e-5)
    assert set(metrics) == {"nt_xent", "rocl_adv"}
    if detach_columns:  # the official similarity: the gradients agree as well
        official.backward()
        for n, g in ours.items():
            torch.testing.assert_close(g, model.get_parameter(n).grad, rtol=1e-4, atol=1e-6)


def test_column_detached_nt_xent_value_and_gradient():
    torch.manual_seed(0)
    z = torch.randn(3 * 5, 7, dtype=torch.float64, requires_grad=True)
    value = nt_xent_column_detached(z, views=3, temperature=0.3)
    torch.testing.assert_close(value, nt_xent_reference(z, views=3, temperature=0.3), rtol=1e-6, atol=1e-6)
    (g,) = torch.autograd.grad(value, z)
    (g_full,) = torch.autograd.grad(nt_xent(z, views=3, temperature=0.3), z)
    assert not torch.allclose(g, g_full.to(g.dtype))  # the columns' share of the gradient is gone
    (g_off,) = torch.autograd.grad(_official_rocl_nt_xent(z, 3, 0.3) / 2, z)  # ours averages the 2 positives
    torch.testing.assert_close(g.double(), g_off, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="views"):
        nt_xent_column_detached(z, views=4)


def test_trades_runs_clean_and_adversarial_inputs_in_separate_passes():
    cfg, model, crops, y = _setup("trades", eps=0.1, pgd_steps=1, pgd_alpha=0.1)
    rows = []
    handle = model.backbone.register_forward_hook(lambda m, i, o: rows.append((m.training, i[0].shape[0])))
    loss, metrics = get_method("trades").loss(model, crops, y, LossParams.of(cfg), 6.0)
    handle.remove()
    B = crops.shape[1]
    train_passes = [n for training, n in rows if training]
    assert train_passes == [B, B]  # never one joint pass of 2B rows in train mode
    assert torch.isfinite(loss) and set(metrics) == {"ce", "trades_kl"}


def test_ae_trades_uses_the_squared_error_of_eq_35(monkeypatch):
    from urkle_fast import methods as methods_mod

    cfg, model, crops, y = _setup("ae_trades", eps=0.1, pgd_steps=1, pgd_alpha=0.1)
    model.eval()
    x = crops[0]
    x_adv = (x + 0.1).clamp(0, 1)
    monkeypatch.setattr(methods_mod, "_attack", lambda objective, x, hp, model, eot=1: x_adv)
    loss, metrics = get_method("ae_trades").loss(model, crops, y, LossParams.of(cfg), 2.0)
    r, r_adv = model.decode(model.encode(x)[0]), model.decode(model.encode(x_adv)[0])
    recon = ((r - x) ** 2).sum(dim=(1, 2, 3)).mean()
    dist = ((r_adv - r) ** 2).sum(dim=(1, 2, 3)).mean()
    torch.testing.assert_close(metrics["recon_se"], recon.detach())
    torch.testing.assert_close(loss, recon + 2.0 * dist)
    # h is the decoder's linear output (a sigmoid saturates under the squared error and stalls the AE)
    assert cfg.decoder_output == "linear" and torch.equal(r, model.decode_logits(model.encode(x)[0]))
    assert resolve_config(TrainConfig(method="vae_urkle", dataset="digits")).decoder_output == "sigmoid"


def test_supervised_model_on_a_label_budget_sees_only_those_labels(tmp_path):
    cfg = resolve_config(TrainConfig(method="standard", dataset="digits", label_budget=100, out_dir=str(tmp_path)))
    ds = _train_dataset(cfg)
    full = load_dataset("digits", split="train")
    idx = balanced_subset(full.labels, 100, seed=0)  # what eval's 100-label heads see (seed 0)
    assert len(ds) == 100
    assert torch.equal(ds.images, full.images[idx]) and torch.equal(ds.labels, full.labels[idx])
    assert torch.bincount(ds.labels, minlength=10).tolist() == [10] * 10
    with pytest.raises(ValueError, match="--label-budget"):
        resolve_config(TrainConfig(method="simclr_urkle", dataset="digits", label_budget=100))
    with pytest.raises(ValueError, match="--label-budget"):
        from urkle_fast.train import validate

        validate(TrainConfig(method="standard", label_budget=0, out_dir=str(tmp_path)))


def test_trained_on_a_budget_end_to_end(tmp_path):
    from urkle_fast.train import train

    r = train(TrainConfig(method="standard", dataset="digits", label_budget=50, batch_size=25, epochs=1,
                          out_dir=str(tmp_path), progress=False, threads=1))
    state = torch.load(r["checkpoint"], weights_only=True)
    assert state["config"]["label_budget"] == 50 and state["step"] == 2  # 50 images / batch 25: 2 steps


def test_beta_ramp_is_an_urkle_default_only():
    for method in ("trades", "ae_trades", "rocl", "simclr", "standard", "at"):
        assert resolve_config(TrainConfig(method=method, dataset="digits")).beta_warmup_epochs == 0, method
    for method in ("simclr_urkle", "vae_urkle"):
        cfg = resolve_config(TrainConfig(method=method, dataset="digits", warmup_epochs=4))
        assert cfg.beta_warmup_epochs == 4, method
    assert resolve_config(TrainConfig(method="trades", dataset="digits", beta_warmup_epochs=2)).beta_warmup_epochs == 2


def test_refused_combinations():
    with pytest.raises(ValueError, match="--encoder deterministic"):
        resolve_config(TrainConfig(method="simclr_urkle", dataset="digits", encoder="deterministic"))
    with pytest.raises(ValueError, match="--encoder deterministic"):
        resolve_config(TrainConfig(method="vae_urkle", dataset="digits", encoder="deterministic"))
    with pytest.raises(ValueError, match="drop --train-subset"):
        resolve_config(TrainConfig(method="at", dataset="digits", label_budget=100, train_subset=500))


def test_resuming_a_run_of_the_older_objective_is_refused(tmp_path):
    """A RoCL checkpoint written before this version (Gaussian encoder, no 1/256 term) cannot be continued under
    the new objective; a run of an unchanged method (simclr_urkle) resumes as before."""
    from urkle_fast.checkpoint import load_checkpoint, write_atomic
    from urkle_fast.train import train
    import io

    kw = dict(dataset="digits", batch_size=64, epochs=1, pgd_steps=1, progress=False, threads=1)
    for method, refused in (("rocl", True), ("simclr_urkle", False)):
        out = tmp_path / method
        train(TrainConfig(method=method, out_dir=str(out), max_steps=1, **kw))
        state = load_checkpoint(out / "checkpoint.pt")
        state["config"].pop("objective_version")  # as every checkpoint of the earlier version
        if method == "rocl":
            state["config"].pop("encoder")
            state["model"] = build_model({**state["config"], "encoder": "gaussian"}).state_dict()
        buf = io.BytesIO()
        torch.save(state, buf)
        write_atomic(out / "checkpoint.pt", buf.getvalue())
        if refused:
            with pytest.raises(ValueError, match="objective version 1"):
                train(TrainConfig(method=method, out_dir=str(out), max_steps=2, resume="auto", **kw))
            # a finished run of the older version: nothing to do, not an error (a requeued script goes on)
            assert train(TrainConfig(method=method, out_dir=str(out), max_steps=1, resume="auto", **kw))["step"] == 1
        else:
            assert train(TrainConfig(method=method, out_dir=str(out), max_steps=2, resume="auto", **kw))["step"] == 2
