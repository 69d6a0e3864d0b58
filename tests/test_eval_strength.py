"""The evaluation's strength (issue 10, item 3): AutoAttack's members, the stochastic path's EOT, transfer
attack and fool confirmation, worst case with intervals, saved heads, several tasks.

APGD-DLR and APGD-T are checked against torchattacks' implementations (tests/requirements.txt, installed by the
README's test command) on a small trained digits classifier."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from urkle_fast.eval import EvalConfig, evaluate_models
from urkle_fast.evaluation.attacks import (apgd, apgd_targeted, attack_scores, dlr_loss, dlr_targeted_loss,
                                           robust_accuracy, score, wilson_interval)
from urkle_fast.evaluation.datasets import load_split
from tiny_models import TinyStandard
from urkle_fast.evaluation.probe import ProbabilisticClassifier

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

EPS = 0.08  # the undefended model keeps about half its accuracy here: attacks can be told apart


class TinyRep(nn.Module):
    """Probabilistic encoder with a visible sigma: the S-sample prediction is really stochastic."""

    kind = "representation"
    d_z = 16
    deterministic = False

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))

    def encode(self, x):
        h = self.net(x)
        return h[:, :16], torch.tanh(h[:, 16:]) - 3.0


@pytest.fixture(scope="module")
def digits():
    return load_split("digits", "train"), load_split("digits", "test")


def _fit(model, fn, x, y, steps=150):
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(fn(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _train_standard(train):
    torch.manual_seed(0)
    m = TinyStandard()
    return _fit(m, m.logits, train.x, train.y)


@pytest.fixture(scope="module")
def standard(digits):
    return _train_standard(digits[0])


@pytest.fixture(scope="module")
def test_set(digits):
    _, test = digits
    return test.x[:120], test.y[:120]


def test_dlr_losses_match_torchattacks():
    ta = pytest.importorskip("torchattacks", reason="pip install --no-deps -r tests/requirements.txt")
    torch.manual_seed(0)
    logits = torch.randn(50, 10)
    y = torch.randint(0, 10, (50,))
    y[:10] = logits[:10].argmax(1)  # both branches of "is the top class y"
    t = (y + 1 + torch.randint(0, 9, (50,))) % 10
    m = TinyStandard()
    torch.testing.assert_close(dlr_loss(logits, y), ta.APGD(m, loss="dlr").dlr_loss(logits, y))
    torch.testing.assert_close(dlr_targeted_loss(logits, y, t), ta.APGDT(m).dlr_loss_targeted(logits, y, t))
    # invariant to a per-row shift: log-probabilities of an averaged prediction serve as its logits
    torch.testing.assert_close(dlr_loss(F.log_softmax(logits, 1), y), dlr_loss(logits, y), rtol=1e-5, atol=1e-5)


def test_apgd_dlr_and_apgd_t_agree_with_torchattacks(standard, test_set):
    """Same model, same images, same budget: our APGD-DLR and APGD-T leave the accuracy torchattacks' leave, up
    to the random start (a few images of 120)."""
    ta = pytest.importorskip("torchattacks", reason="pip install --no-deps -r tests/requirements.txt")
    x, y = test_set
    clf = ProbabilisticClassifier(standard, None)
    ours_dlr = robust_accuracy(clf, x, y, attack="apgd-dlr", eps=EPS, steps=50)
    ours_t = robust_accuracy(clf, x, y, attack="apgd-t", eps=EPS, steps=50, n_targets=9)
    torch.manual_seed(0)
    x_dlr = ta.APGD(standard, eps=EPS, steps=50, loss="dlr", seed=0)(x, y)
    x_t = ta.APGDT(standard, eps=EPS, steps=50, n_classes=10, seed=0)(x, y)
    with torch.no_grad():
        theirs_dlr = (standard(x_dlr).argmax(1) == y).float().mean().item()
        theirs_t = (standard(x_t).argmax(1) == y).float().mean().item()
    assert 0.05 < theirs_dlr < 0.95, theirs_dlr  # a test that can tell attacks apart
    assert abs(ours_dlr - theirs_dlr) <= 0.05, (ours_dlr, theirs_dlr)
    assert abs(ours_t - theirs_t) <= 0.05, (ours_t, theirs_t)


def test_apgd_dlr_and_apgd_t_at_least_as_strong_as_apgd_ce(standard, test_set):
    x, y = test_set
    clf = ProbabilisticClassifier(standard, None)
    ce = attack_scores(clf, x, y, attack="apgd", eps=EPS, steps=50)["ok"]
    dlr = attack_scores(clf, x, y, attack="apgd-dlr", eps=EPS, steps=50)["ok"]
    tgt = attack_scores(clf, x, y, attack="apgd-t", eps=EPS, steps=50)["ok"]
    n = len(y)
    assert tgt.sum() <= ce.sum() + 0.02 * n, (tgt.sum(), ce.sum())
    assert dlr.sum() <= ce.sum() + 0.05 * n, (dlr.sum(), ce.sum())


class _NoisyLinear(nn.Module):
    """A stochastic two-class classifier: class 0 while (mean pixel - 0.5) + N(0, sigma^2) > 0, fresh noise on
    every call (the S-sample prediction's situation: each forward is a noisy draw)."""

    stochastic = True

    def __init__(self, sigma: float):
        super().__init__()
        self.sigma, self.g = sigma, torch.Generator().manual_seed(1)
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        d = x.flatten(1).mean(1) - 0.5 + self.bias
        d = d + self.sigma * torch.randn(d.shape, generator=self.g)
        return F.log_softmax(torch.stack([d, -d], 1), 1)


def test_square_keeps_attacking_a_stochastic_prediction_until_the_scoring_agrees():
    # 40 images at +0.06 from the boundary, noise 0.04, eps 0.2: the attack can push every one to -0.14. With a
    # fool judged by one or two noisy draws (the earlier rule) and the best margin kept from a lucky draw, 32%
    # stayed right under the 5-redraw scoring; confirming as the scoring does and redrawing the best's margin
    # leaves 15%
    from urkle_fast.evaluation.attacks import score, square_linf

    x = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    x = (x - x.flatten(1).mean(1).view(-1, 1, 1, 1) + 0.56).clamp(0, 1)
    y = torch.zeros(40, dtype=torch.long)
    clf = _NoisyLinear(0.04)
    assert score(clf, x, y, 5).ge(0.5).float().mean() > 0.9
    adv = square_linf(clf, x, y, eps=0.2, queries=300, seed=0)
    assert (adv - x).abs().max() <= 0.2 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert score(clf, adv, y, 5).ge(0.5).float().mean() <= 0.225


def test_apgd_returns_the_highest_loss_fooled_iterate(monkeypatch):
    """Recorded at every loss evaluation of the real attack: per image, the returned point is the fooled iterate
    of highest loss (AutoAttack keeps the latest fooled one; for the S-sample prediction a deeper one is likelier
    to survive the scoring's fresh draws), and the highest-loss iterate where nothing fooled."""
    import urkle_fast.evaluation.attacks as A

    seen = []
    real = A._loss_and_grad

    def recording(clf, x_adv, y, *args):
        loss, grad, log_p = real(clf, x_adv, y, *args)
        seen.append((x_adv.detach().clone(), loss.clone(), log_p.argmax(-1) != y))
        return loss, grad, log_p

    monkeypatch.setattr(A, "_loss_and_grad", recording)
    x = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    x = (x - x.flatten(1).mean(1).view(-1, 1, 1, 1) + 0.5 + torch.linspace(0.01, 0.3, 40).view(-1, 1, 1, 1)).clamp(0, 1)
    y = torch.zeros(40, dtype=torch.long)
    out = A.apgd(_NoisyLinear(0.02), x, y, eps=0.1, steps=20, eot_iter=3, seed=0)
    xs, losses, wrong = (torch.stack(t) for t in zip(*seen))  # [T, B, ...], [T, B], [T, B]
    fooled = wrong.any(0)
    assert 0 < fooled.sum() < 40  # both cases occur
    pick = torch.where(wrong, losses, torch.full_like(losses, -float("inf"))).argmax(0)
    for i in range(40):
        if fooled[i]:
            assert torch.equal(out[i], xs[pick[i], i]), i
            assert losses[pick[i], i] == losses[wrong[:, i], i].max()
        else:  # the highest-loss iterate (ties: the first)
            assert torch.equal(out[i], xs[losses[:, i].argmax(), i]), i


def test_apgd_arguments():
    m = TinyStandard().eval()
    x, y = torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="loss"):
        apgd(m, x, y, eps=0.1, loss="hinge")
    with pytest.raises(ValueError, match="target"):
        apgd(m, x, y, eps=0.1, loss="dlr-targeted")
    two = nn.Sequential(nn.Flatten(), nn.Linear(64, 2)).eval()
    with pytest.raises(ValueError, match="4 classes"):
        apgd_targeted(lambda v: F.log_softmax(two(v), 1), x, y, eps=0.1)
    with pytest.raises(ValueError, match="redraws"):
        attack_scores(ProbabilisticClassifier(m, None), x, y, attack="pgd", eps=0.1, steps=1, redraws=0)
    with pytest.raises(ValueError, match="redraws must be odd, got 4"):  # "most wrong" must not tie
        attack_scores(ProbabilisticClassifier(m, None), x, y, attack="pgd", eps=0.1, steps=1, redraws=4)
    with pytest.raises(ValueError, match="--redraws must be odd, got 2"):
        evaluate_models({}, EvalConfig(dataset="digits", eps=[0.1], redraws=2))


class _Coin(nn.Module):
    """A stochastic prediction that is right with probability p on every image (to test the scoring rule)."""

    stochastic = True

    def __init__(self, p):
        super().__init__()
        self.p = p
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        right = torch.rand(len(x)) < self.p
        out = torch.full((len(x), 3), -5.0)
        out[right, 0] = 0.0
        out[~right, 1] = 0.0
        return out


def test_a_fool_is_confirmed_by_most_fresh_draws():
    torch.manual_seed(0)
    x, y = torch.zeros(400, 1), torch.zeros(400, dtype=torch.long)
    mostly_right, mostly_wrong = score(_Coin(0.8), x, y, redraws=9), score(_Coin(0.2), x, y, redraws=9)
    assert (mostly_right >= 0.5).float().mean() > 0.9  # one unlucky draw does not make a fool
    assert (mostly_wrong >= 0.5).float().mean() < 0.1
    assert abs(mostly_right.mean().item() - 0.8) < 0.03  # the redraw average estimates the accuracy itself
    one = score(_Coin(0.8), x, y, redraws=1)
    assert set(one.unique().tolist()) <= {0.0, 1.0}


def test_wilson_interval():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and abs(hi - 0.2775) < 1e-3
    lo, hi = wilson_interval(5, 10)
    assert abs(lo - 0.2366) < 1e-3 and abs(hi - 0.7634) < 1e-3
    lo, hi = wilson_interval(950, 1000)
    assert lo < 0.95 < hi and hi - lo < 0.03


def _rep_models(digits):
    train, _ = digits
    torch.manual_seed(0)
    rep = TinyRep()
    head = nn.Linear(16, 10)
    _fit(nn.ModuleList([rep, head]), lambda x: head(rep.encode(x)[0]), train.x, train.y, steps=100)
    return rep.eval()


class NoisyRep(TinyRep):  # a wider sigma: the S-sample prediction often disagrees with z = mu
    def encode(self, x):
        mu, logvar = super().encode(x)
        return mu, logvar + 4.0


def test_transfer_never_raises_the_worst_case_and_worst_is_below_every_attack(tmp_path, digits):
    rep = _rep_models(digits)
    common = dict(dataset="digits", eps=[0.1, 0.2], n_test=60, attack_steps=5, apgd_steps=5, apgd_targets=3,
                  square_queries=20, eot_iter=2, redraws=3, head_epochs=40, plots=False, sweep_n_test=10,
                  verbose=False)
    with_t = evaluate_models({"rep": (rep, {})}, EvalConfig(out=str(tmp_path / "a"), transfer=True, **common),
                             splits=digits)
    without = evaluate_models({"rep": (rep, {})}, EvalConfig(out=None, transfer=False, **common), splits=digits)
    for e in ("0.1", "0.2"):
        s_on = with_t["models"]["rep"]["budgets"]["all"]["paths"]["samples"]
        s_off = without["models"]["rep"]["budgets"]["all"]["paths"]["samples"]
        assert s_on["worst"][e] <= s_off["worst"][e] + 1e-9
        assert "transfer" in s_on and "transfer" not in s_off
        for path in ("mu", "samples"):
            r = with_t["models"]["rep"]["budgets"]["all"]["paths"][path]
            cols = [r[a][e] for a in r["attacks"]] + ([r["transfer"][e]] if path == "samples" else [])
            assert r["worst"][e] <= min(cols) + 1e-9, (path, r)
            lo, hi = r["worst_ci"][e]
            assert lo <= r["worst"][e] <= hi
        assert set(with_t["models"]["rep"]["budgets"]["all"]["paths"]["mu"]["attacks"]) == {"pgd", "apgd", "apgd-t",
                                                                                             "square"}
        assert set(s_on["attacks"]) == {"pgd", "apgd", "apgd-dlr", "square"}
    table = (tmp_path / "a" / "table.md").read_text()
    assert "worst case over every attack" in table and "transfer from z=mu" in table and "[" in table


def test_cascade_attacks_only_the_survivors_and_keeps_the_worst_case(tmp_path, digits, monkeypatch):
    """--cascade (AutoAttack's standard run): each attack gets exactly the images still right after the earlier
    ones (replayed here from every call's scores: on the z = mu path, right on either path, since its
    adversaries also score the S-sample prediction), its column is the accuracy left after it, far fewer images
    are attacked in all, and the worst case agrees with attacking every image."""
    import urkle_fast.eval as ev

    rep = _rep_models(digits)
    rep.__class__ = NoisyRep
    common = dict(dataset="digits", eps=[0.1, 0.2], n_test=60, attack_steps=5, apgd_steps=5, apgd_targets=3,
                  square_queries=20, eot_iter=2, redraws=3, head_epochs=40, plots=False, sweep_n_test=10,
                  verbose=False)
    calls, clean, worst, transfer_only = [], [], {}, []
    real_scores, real_live = ev._scores, ev._live_scores

    def spy_scores(job, clf, x, y, *args, **kw):
        r = real_scores(job, clf, x, y, *args, **kw)
        if not args and "attack" not in kw:  # the clean prediction of a path: mu first, then samples
            clean.append(r["frac"].clone())
        return r

    def spy_live(job, clf, x, y, live, attack, e, **kw):
        path = kw["desc"].split()[-3]
        if job.cfg.cascade:  # replay the worst case so far and check the images chosen for this attack
            st = worst.setdefault(e, {"mu": clean[0].clone(), "samples": clean[1].clone()})
            expect = (st[path] >= 0.5) | ((st["samples"] >= 0.5) if path == "mu" else False)
            assert torch.equal(live, expect.nonzero().squeeze(1)), (path, attack, e)
            if path == "mu":
                transfer_only.append(int(((st["mu"] < 0.5) & (st["samples"] >= 0.5)).sum()))
        r = real_live(job, clf, x, y, live, attack, e, **kw)
        calls.append((path, e, len(y) if live is None else len(live)))
        if job.cfg.cascade:
            st[path] = torch.minimum(st[path], r["frac"])
            if "transfer" in r:
                st["samples"] = torch.minimum(st["samples"], r["transfer"]["frac"])
        return r

    monkeypatch.setattr(ev, "_scores", spy_scores)
    monkeypatch.setattr(ev, "_live_scores", spy_live)
    full = evaluate_models({"rep": (rep, {})}, EvalConfig(out=str(tmp_path / "full"), **common), splits=digits)
    n_full, n_calls = sum(n for *_, n in calls), len(calls)
    calls.clear(), clean.clear()
    cas = evaluate_models({"rep": (rep, {})}, EvalConfig(out=str(tmp_path / "cas"), cascade=True,
                                                              heads=str(tmp_path / "full" / "heads"), **common),
                          splits=digits)
    n_cas = sum(n for *_, n in calls)
    assert n_full == 60 * n_calls and len(calls) == n_calls == 16 and n_cas < n_full / 4, (n_cas, n_full)
    # the transfer half is exercised: some z = mu attack got images already wrong on z = mu but right on S samples
    assert len(worst) == 2 and sum(transfer_only) > 0, transfer_only
    paths = cas["models"]["rep"]["budgets"]["all"]["paths"]
    full_paths = full["models"]["rep"]["budgets"]["all"]["paths"]
    for e in ("0.1", "0.2"):
        for path in ("mu", "samples"):
            r = paths[path]
            cols = [r[a][e] for a in r["attacks"]]
            assert cols[-1] == r["worst"][e] == (worst[float(e)][path] >= 0.5).float().mean().item(), (path, e)
            assert r["redraw_avg"][e] is None  # not the share over every attack: not reported
            assert abs(r["worst"][e] - full_paths[path]["worst"][e]) <= 4 / 60, (path, e)
        assert "transfer" not in paths["samples"]
    assert "accuracy left after it" in (tmp_path / "cas" / "table.md").read_text()


def test_sweep_rows_cover_every_class_of_a_class_sorted_test_subset():
    """The accuracy-vs-eps sweep takes a seeded random part of the test subset, not its first rows (on
    CIFAR-10's ImageFolder tree those were airplanes and automobiles only)."""
    from urkle_fast.eval import sweep_rows

    labels = torch.arange(2000) // 200  # a balanced subset of a class-sorted split
    rows = sweep_rows(2000, 300, seed=0)
    assert len(rows) == 300 and len(set(rows.tolist())) == 300 and torch.equal(rows, rows.sort().values)
    counts = torch.bincount(labels[rows], minlength=10)
    assert counts.min() >= 15, counts  # every class, roughly 30 each
    assert torch.equal(rows, sweep_rows(2000, 300, seed=0)) and not torch.equal(rows, sweep_rows(2000, 300, seed=1))
    assert torch.equal(sweep_rows(50, 500, seed=0), torch.arange(50))


def test_heads_are_saved_and_reused(tmp_path, digits, monkeypatch):
    import urkle_fast.eval as ev

    rep = _rep_models(digits)
    cfg = dict(dataset="digits", eps=[0.1], n_test=40, attack_steps=2, apgd_steps=0, square_queries=0,
               head_epochs=20, plots=False, sweep_n_test=10, verbose=False, tasks=["digit", "parity"])
    first = evaluate_models({"rep": (rep, {})}, EvalConfig(out=str(tmp_path / "a"), **cfg), splits=digits)
    saved = sorted(p.name for p in (tmp_path / "a" / "heads").iterdir())
    assert saved == ["rep__digit__all.pt", "rep__parity__all.pt"]

    def no_training(*a, **k):
        raise AssertionError("a saved head was trained again")

    monkeypatch.setattr(ev, "train_head", no_training)
    again = evaluate_models({"rep": (rep, {})}, EvalConfig(out=str(tmp_path / "b"), heads=str(tmp_path / "a" / "heads"),
                                                           **cfg), splits=digits)
    for task in ("digit", "parity"):
        a = first["models"]["rep"]["tasks"][task]["budgets"]["all"]["paths"]["mu"]
        b = again["models"]["rep"]["tasks"][task]["budgets"]["all"]["paths"]["mu"]
        assert a["clean"] == b["clean"] and a["worst"] == b["worst"]
    # other weights under the same name: the saved heads do not fit them, so they are trained afresh
    other = _rep_models(digits)
    with torch.no_grad():
        other.net[1].weight.mul_(1.01)
    with pytest.raises(AssertionError, match="trained again"), pytest.warns(UserWarning, match="other weights"):
        evaluate_models({"rep": (other, {})}, EvalConfig(out=None, heads=str(tmp_path / "a" / "heads"), **cfg),
                        splits=digits)


def test_tasks_have_their_own_heads_and_rows(tmp_path, digits):
    rep = _rep_models(digits)
    std = _train_standard(digits[0])
    res = evaluate_models({"rep": (rep, {}), "std": (std, {"label_budget": None})},
                          EvalConfig(dataset="digits", eps=[0.1], n_test=60, attack_steps=2, apgd_steps=0,
                                     square_queries=0, head_epochs=40, plots=False, sweep_n_test=10, verbose=False,
                                     tasks=["digit", "parity", "gt4"], out=str(tmp_path)), splits=digits)
    tasks = res["models"]["rep"]["tasks"]
    assert set(tasks) == {"digit", "parity", "gt4"}
    assert res["models"]["std"]["tasks"]["parity"]["skipped"]  # a digit classifier has no parity head
    for t in ("parity", "gt4"):  # a 2-class task: clean accuracy well above its chance of 50%
        assert tasks[t]["budgets"]["all"]["paths"]["mu"]["clean"] > 0.7, t
    table = (tmp_path / "table.md").read_text()
    assert "## Task parity, labels all" in table and "## Task gt4, labels all" in table
    with pytest.raises(ValueError, match="--tasks"):
        evaluate_models({"rep": (rep, {})}, EvalConfig(dataset="digits", tasks=["animal_vehicle"], out=None),
                        splits=digits)


def test_supervised_model_reported_under_its_own_label_budget(tmp_path, digits):
    std = _train_standard(digits[0])
    res = evaluate_models({"std": (std, {"label_budget": 500})},
                          EvalConfig(dataset="digits", eps=[0.1], n_test=40, attack_steps=2, apgd_steps=0,
                                     square_queries=0, plots=False, sweep_n_test=10, verbose=False,
                                     label_budgets=["all", "100"], out=str(tmp_path)), splits=digits)
    assert set(res["models"]["std"]["budgets"]) == {"500"}  # never repeated under all / 100
    table = (tmp_path / "table.md").read_text()
    assert "## Task digit, labels 500" in table
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["models"]["std"]["budgets"]["500"]["n_labels"] == 500


def test_eot_from_one_encoder_pass_matches_separate_draws(digits):
    """eot_log_probs: n groups of S z samples from one encoder pass; the EOT gradient equals, in expectation, the
    average over n separate forwards (checked with many draws), and a z = mu path repeats its one prediction."""
    from urkle_fast.evaluation.attacks import _loss_and_grad

    rep = _rep_models(digits)
    torch.manual_seed(0)
    head = nn.Linear(16, 10)
    x, y = digits[1].x[:8], digits[1].y[:8]
    clf = ProbabilisticClassifier(rep, head, samples=4, seed=1)

    class Looped(nn.Module):  # the same classifier without the batched path
        stochastic = True

        def forward(self, v):
            return clf(v)

    loss_b, grad_b, _ = _loss_and_grad(clf, x, y, 3000)
    loss_l, grad_l, _ = _loss_and_grad(Looped(), x, y, 3000)
    torch.testing.assert_close(loss_b, loss_l, rtol=0.02, atol=0.01)
    assert (grad_b - grad_l).norm() <= 0.05 * grad_l.norm()
    mu_clf = ProbabilisticClassifier(rep, head, path="mu")
    lp = mu_clf.eot_log_probs(x, 3)
    assert lp.shape == (3, 8, 10) and torch.equal(lp[0], lp[2]) and torch.allclose(lp[0], mu_clf(x))


def test_worst_case_starts_from_the_clean_prediction(digits):
    """An image the clean prediction gets wrong counts as wrong under any attack, even one that lands on a right
    prediction; with no attack at all the worst case is the clean accuracy."""
    std = _train_standard(digits[0])
    base = dict(dataset="digits", eps=[0.1], n_test=60, plots=False, sweep_n_test=10, verbose=False, out=None)
    none = evaluate_models({"std": (std, {})}, EvalConfig(attack_steps=0, apgd_steps=0, square_queries=0, **base),
                           splits=digits)["models"]["std"]["budgets"]["all"]["paths"]["mu"]
    assert none["attacks"] == [] and none["worst"]["0.1"] == none["clean"]
    some = evaluate_models({"std": (std, {})}, EvalConfig(attack_steps=3, apgd_steps=3, apgd_targets=2,
                                                          square_queries=5, **base),
                           splits=digits)["models"]["std"]["budgets"]["all"]["paths"]["mu"]
    assert some["worst"]["0.1"] <= some["clean"]
    # an attack that returns its input unchanged cannot make a wrong clean prediction right
    x, y = digits[1].x[:60], digits[1].y[:60]
    clf = ProbabilisticClassifier(std, None)
    wrong = (clf(x).argmax(1) != y)
    y_bad = torch.where(wrong, y, (y + 1) % 10)  # every clean prediction wrong now
    r = attack_scores(clf, x, y_bad, attack="apgd-t", eps=0.1, steps=3, n_targets=2)
    assert not r["ok"].any()


def test_merge_joins_budgets_of_one_model_and_refuses_clashes(tmp_path, digits, capsys):
    from urkle_fast.evaluation.merge import main as merge_cli
    from urkle_fast.evaluation.merge import merge

    std = _train_standard(digits[0])
    kw = dict(dataset="digits", eps=[0.1], n_test=40, attack_steps=2, apgd_steps=0, square_queries=0, plots=False,
              sweep_n_test=10, verbose=False, out=None)
    a = evaluate_models({"Standard": (std, {"method": "standard", "label_budget": 500})}, EvalConfig(**kw),
                        splits=digits)
    b = evaluate_models({"Standard": (std, {"method": "standard", "label_budget": 100})}, EvalConfig(**kw),
                        splits=digits)
    m = merge([a, b])
    assert set(m["models"]["Standard"]["budgets"]) == {"500", "100"}
    assert set(a["models"]["Standard"]["budgets"]) == {"500"}  # the inputs are left as they were
    with pytest.raises(ValueError, match="evaluated in two results files"):
        merge([a, a])
    c = evaluate_models({"Standard": (std, {"method": "at"})}, EvalConfig(**kw), splits=digits)
    with pytest.raises(ValueError, match="two different models"):
        merge([a, c])
    d = evaluate_models({"Other": (std, {"method": "standard"})}, EvalConfig(**{**kw, "attack_steps": 3}),
                        splits=digits)
    with pytest.raises(ValueError, match="attack_steps"):
        merge([a, d])
    # same settings, other test images (another copy of the data, say): refused by the fingerprint
    other = dict(b, settings=dict(b["settings"], test_fingerprint="0" * 16))
    with pytest.raises(ValueError, match="test_fingerprint"):
        merge([a, other])
    old = dict(b, settings={k: v for k, v in b["settings"].items() if k != "test_fingerprint"})
    assert set(merge([a, old])["models"]["Standard"]["budgets"]) == {"500", "100"}  # older results have none
    with pytest.raises(ValueError, match="test_fingerprint"):  # each file against every other, not the first only
        merge([old, a, dict(other, models={"Other": other["models"]["Standard"]})])
    assert merge([old, a])["settings"]["test_fingerprint"] == a["settings"]["test_fingerprint"]
    # the command the README gives: results.json files in, one table and results.json out; a clash is one line, exit 2
    files = []
    for name, part in (("a", a), ("b", b)):
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps(part))
    assert merge_cli([str(files[0]), str(files[1]), "--out", str(tmp_path / "merged")]) == 0
    capsys.readouterr()
    written = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert set(written["models"]["Standard"]["budgets"]) == {"500", "100"}
    table = (tmp_path / "merged" / "table.md").read_text()
    assert "task digit, labels 500" in table and "task digit, labels 100" in table
    assert merge_cli([str(files[0]), str(files[0]), "--out", str(tmp_path / "clash")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "evaluated in two results files" in err and err.count("\n") == 1
    assert not (tmp_path / "clash").exists()


def test_an_interrupted_evaluation_resumes_after_its_last_finished_attack(tmp_path, digits, monkeypatch):
    """Interrupted twice (in the middle of a representation's z = mu path, then in a classifier's attacks) and
    run again on the same --out, the evaluation runs each attack exactly once in all, reuses its own saved head
    (no head is trained again), and writes the numbers of an uninterrupted run: per attack, worst case, interval,
    per-image bits and Proposition 1. Another evaluation is refused on that --out (unless --overwrite), and its
    attacks are never mixed with the saved ones."""
    import urkle_fast.eval as ev

    rep = _rep_models(digits)
    rep.__class__ = NoisyRep  # its S-sample prediction depends on the z draws, so a stream out of step shows
    models = {"rep": (rep, {}), "std": (_train_standard(digits[0]), {})}
    common = dict(dataset="digits", eps=[0.1, 0.2], n_test=60, attack_steps=5, apgd_steps=5, apgd_targets=3,
                  square_queries=20, eot_iter=2, redraws=3, head_epochs=40, plots=True, fig2_images=0,
                  sweep_eps=[0.0, 0.2], sweep_n_test=60, verbose=False, cascade=True, bound=3.0, bound_samples=32)
    real = ev._one_attack
    calls = []

    def counting(stop_at=None):
        def attack(*a, **k):
            if len(calls) == stop_at:
                raise KeyboardInterrupt  # as Ctrl-C or SIGTERM would stop it, mid-evaluation
            calls.append(a[2:4])  # (path, attack)
            return real(*a, **k)
        return attack

    monkeypatch.setattr(ev, "_one_attack", counting())
    full = evaluate_models(models, EvalConfig(out=str(tmp_path / "full"), **common), splits=digits)
    n_full = len(calls)
    assert n_full == 16 + 8  # rep: 4 attacks x 2 paths x 2 eps; std: 4 attacks x 2 eps

    cut = EvalConfig(out=str(tmp_path / "cut"), **common)
    done = []
    for stop_at in (5, 14):  # in rep's z = mu path (cascade survivors restored), then in std's attacks
        calls.clear()
        monkeypatch.setattr(ev, "_one_attack", counting(stop_at))
        with pytest.raises(KeyboardInterrupt):
            evaluate_models(models, cut, splits=digits)
        done.append(len(calls))
        monkeypatch.setattr(ev, "train_head", lambda *a, **k: pytest.fail("the saved head was trained again"))
    assert (tmp_path / "cut" / "progress" / "rep__digit__all.pt").is_file()
    assert (tmp_path / "cut" / "progress" / "std__digit__all.pt").is_file()
    calls.clear()
    monkeypatch.setattr(ev, "_one_attack", counting())
    resumed = evaluate_models(models, cut, splits=digits)
    assert sum(done) + len(calls) == n_full and calls and all(c[0] == "mu" for c in calls)  # std's last attacks only

    def numbers(res):
        return {m: {k: v for k, v in e.items() if k not in ("wall_s", "checkpoint", "plots")}
                for m, e in res["models"].items()}

    assert numbers(resumed) == numbers(full)
    # the S-sample sweep runs after the attacks, from the stream the last attack reseeded, replayed or not
    assert resumed["models"]["rep"]["sweep"] == full["models"]["rep"]["sweep"] and \
        "S=10, labels all" in full["models"]["rep"]["sweep"]
    assert resumed["models"]["rep"]["budgets"]["all"]["bound"]["0.1"] == full["models"]["rep"]["budgets"]["all"]["bound"]["0.1"]
    on_disk = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert numbers(on_disk) == json.loads(json.dumps(numbers(full)))
    # after a change in the code a score depends on, the saved attacks are another evaluation's: all run again
    calls.clear()
    with monkeypatch.context() as m, pytest.warns(UserWarning, match="another evaluation's progress"):
        m.setattr(ev, "_attack_code", lambda: "changed")
        again = evaluate_models(models, cut, splits=digits)
    assert len(calls) == n_full and numbers(again) == numbers(full)
    on_disk = json.loads((tmp_path / "cut" / "results.json").read_text())

    # another evaluation on the same --out is refused before any attack, naming what differs; with --overwrite
    # it replaces this one, and the saved attacks, not being its own, are not reused
    calls.clear()
    with pytest.raises(ValueError, match=r"holds another evaluation \(it differs in --attack-steps\)"):
        evaluate_models(models, replace(cut, attack_steps=3), splits=digits)
    with pytest.raises(ValueError, match=r"differs in the models \(names, weights or configuration"):
        evaluate_models({"std": models["std"]}, cut, splits=digits)
    assert not calls and json.loads((tmp_path / "cut" / "results.json").read_text()) == on_disk
    with pytest.warns(UserWarning, match="another evaluation's progress"):
        evaluate_models({"std": models["std"]}, replace(cut, attack_steps=3, overwrite=True), splits=digits)
    assert len(calls) == 8
    # results from before this record existed are not overwritten either
    (tmp_path / "cut" / "evaluation.json").unlink()
    with pytest.raises(ValueError, match="kept no record of its settings"):
        evaluate_models({"std": models["std"]}, replace(cut, attack_steps=3), splits=digits)


def test_the_attack_code_hash_covers_the_whole_scoring_path(monkeypatch, tmp_path):
    """Every module a saved score depends on is in the hash: a change in any of them (here: another file in its
    place) gives another hash, so the saved attacks are not replayed."""
    import urkle_fast.eval as ev
    from urkle_fast import attack
    from urkle_fast.evaluation import attacks, probe
    from urkle_fast.models import backbones, heads
    from urkle_fast.ops import pgd

    base = ev._attack_code()
    other = tmp_path / "other.py"
    other.write_text("# a changed module\n")
    for mod in (attacks, probe, attack, pgd, backbones, heads):
        with monkeypatch.context() as m:
            m.setattr(mod, "__file__", str(other))
            assert ev._attack_code() != base, mod.__name__
    assert ev._attack_code() == base
    for fn in ("_scores", "_live_scores", "_ensemble", "_attack_paths", "_one_attack"):  # eval's own scoring
        with monkeypatch.context() as m:
            m.setattr(ev, fn, test_the_attack_code_hash_covers_the_whole_scoring_path)
            assert ev._attack_code() != base, fn


def test_an_out_folder_holds_one_evaluation(tmp_path, digits, monkeypatch):
    """--out is claimed only once an evaluation has started (a command refused by its settings leaves it as it
    was); a record from before a new setting existed still matches at that setting's default; --overwrite
    removes the other evaluation's results before this one's attacks; a damaged progress file is started
    afresh, not fatal."""
    import urkle_fast.eval as ev

    std = {"std": (_train_standard(digits[0]), {})}
    cfg = EvalConfig(dataset="digits", eps=[0.1], n_test=30, attack_steps=2, apgd_steps=0, square_queries=0,
                     plots=False, verbose=False, out=str(tmp_path / "o"))
    with pytest.raises(ValueError, match="bounded softmax needs M"):  # refused while preparing: nothing claimed
        evaluate_models(std, replace(cfg, bounded_M=1.0), splits=digits)
    assert not (tmp_path / "o" / "evaluation.json").exists()
    first = evaluate_models(std, cfg, splits=digits)
    record = json.loads((tmp_path / "o" / "evaluation.json").read_text())
    del record["pgd_restarts"]  # as an evaluation from before that setting existed recorded it
    (tmp_path / "o" / "evaluation.json").write_text(json.dumps(record))
    assert evaluate_models(std, cfg, splits=digits)["models"]["std"]["budgets"] == first["models"]["std"]["budgets"]
    (tmp_path / "o" / "evaluation.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="differs in --pgd-restarts"):
        evaluate_models(std, replace(cfg, pgd_restarts=2), splits=digits)
    # --overwrite: the other evaluation's results go before any attack of this one
    monkeypatch.setattr(ev, "_one_attack", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        evaluate_models(std, replace(cfg, eps=[0.2], overwrite=True), splits=digits)
    assert not (tmp_path / "o" / "results.json").exists() and not (tmp_path / "o" / "table.md").exists()
    assert json.loads((tmp_path / "o" / "evaluation.json").read_text())["eps"] == [0.2]
    monkeypatch.undo()
    (tmp_path / "o" / "progress" / "std__digit__all.pt").write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="unreadable"):
        again = evaluate_models(std, replace(cfg, eps=[0.2]), splits=digits)
    assert again["models"]["std"]["budgets"]["all"]["paths"]["mu"]["worst"]["0.2"] <= \
        first["models"]["std"]["budgets"]["all"]["paths"]["mu"]["worst"]["0.1"]
