"""Downstream head on a frozen representation, and the averaged prediction of paper Eq. 1.

docs/PROTOCOL.md sec. 7: the head is trained without adversarial training on the frozen encoder, with one
z ~ p(z|x) per input (a fresh sample each epoch); prediction averages the head's class
probabilities over S samples of z, and the deterministic z = mu path is reported beside it.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from urkle_fast.data.datasets import Budget, balanced_subset, parse_budget  # noqa: F401  (the trainer uses them too)
from urkle_fast.models.heads import make_head  # noqa: F401  (the head is shared with the classifiers)


@torch.no_grad()
def encode_dataset(model: nn.Module, x, *, batch_size: int = 512, device=None, desc: str = "encode",
                   num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, logvar) of the frozen encoder for every image, in eval mode: [N, d_z] each, float32 on CPU.

    x: a tensor [N, C, H, W] (float in [0, 1] or uint8), or an evaluation ``Split`` whose images may
    stay on disk (streamed in DataLoader batches: only the features are kept in memory)."""
    from urkle_fast.data import to_float01

    model.eval()
    device = device or next(model.parameters()).device
    if isinstance(x, torch.Tensor):
        n, batches = len(x), (x[i:i + batch_size] for i in range(0, len(x), batch_size))
    else:
        n, batches = len(x.y), x.batches(batch_size, num_workers)
    mus, lvs = [], []
    for xb in tqdm(batches, total=-(-n // batch_size), desc=desc, leave=False):
        mu, lv = model.encode(to_float01(xb.to(device, non_blocking=True)))
        mus.append(mu.float().cpu())
        lvs.append(lv.float().cpu())
    if not mus:  # an empty shard of a rank: [0, d_z]
        empty = torch.zeros(0, int(getattr(model, "d_z", 0)))
        return empty, empty.clone()
    return torch.cat(mus), torch.cat(lvs)


def train_head(mu: torch.Tensor, logvar: torch.Tensor, y: torch.Tensor, *, num_classes: int,
               head_kind: str = "linear", epochs: int = 30, lr: float = 1e-3, weight_decay: float = 0.0,
               batch_size: int = 256, hidden: int = 256, seed: int = 0, desc: str = "head",
               bounded_M: Optional[float] = None) -> nn.Module:
    """Train the head on frozen features, one fresh z = mu + sigma * eps per input per epoch.

    mu, logvar: [N, d_z] float32; y: [N] int64. Adam, cross-entropy (or, with bounded_M, the bounded loss of
    paper footnote 1, the loss Proposition 1 is stated for), no adversarial training.
    """
    g = torch.Generator().manual_seed(int(seed))
    torch.manual_seed(int(seed))  # head initialisation
    head = make_head(head_kind, mu.shape[1], num_classes, hidden)
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    std = torch.exp(0.5 * logvar)
    n = len(y)
    bs = min(batch_size, n)
    head.train()
    for _ in tqdm(range(epochs), desc=desc, leave=False):
        z = mu + std * torch.randn(mu.shape, generator=g)
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, bs):
            idx = perm[i:i + bs]
            if len(idx) < 2 and head_kind == "mlp3":  # BatchNorm needs 2 rows
                continue
            log_p = F.log_softmax(head(z[idx]), dim=-1)
            if bounded_M is not None:
                log_p = bounded_log_probs(log_p, bounded_M)
            loss = F.nll_loss(log_p, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return head.eval()


def bounded_log_probs(log_p: torch.Tensor, M: float) -> torch.Tensor:
    """Paper footnote 1: p_c -> p_c (1 - C e^-M) + e^-M, so that -log p_c <= M. [B, C] -> [B, C]."""
    C = log_p.shape[-1]
    floor = math.exp(-M)
    if C * floor >= 1.0:
        raise ValueError(f"bounded softmax needs C * exp(-M) < 1 (C={C}, M={M})")
    return torch.log(log_p.exp() * (1.0 - C * floor) + floor)


class ProbabilisticClassifier(nn.Module):
    """x in [0,1] -> log of the predicted class probabilities, [B, C].

    * supervised models (``kind == "supervised"``): log_softmax(model.logits(x)).
    * representation models, ``path="samples"``: log( 1/S sum_s softmax(head(z_s)) ),
      z_s = mu + sigma * eps_s (paper Eq. 1; the attack's cross-entropy of this average gives
      gradients averaged over the S samples, i.e. EOT).
    * ``path="mu"``: log_softmax(head(mu)).
    ``bounded_M`` applies the bounded softmax of footnote 1. Everything runs in eval mode.
    """

    def __init__(self, model: nn.Module, head: Optional[nn.Module] = None, *, path: str = "samples",
                 samples: int = 10, bounded_M: Optional[float] = None, seed: int = 0):
        super().__init__()
        if path not in ("samples", "mu"):
            raise ValueError(f"path must be 'samples' or 'mu', got {path!r}")
        self.model = model
        self.head = head
        self.kind = getattr(model, "kind", None)
        if self.kind not in ("representation", "supervised"):
            raise ValueError(f"model.kind must be 'representation' or 'supervised', got {self.kind!r}")
        if self.kind == "representation" and head is None:
            raise ValueError("a representation model needs a trained head")
        self.path = path
        self.samples = int(samples)
        self.bounded_M = bounded_M
        self._seed = int(seed)
        self._gen: dict = {}
        self.eval()

    def reseed(self, seed: int) -> None:
        self._seed = int(seed)
        self._gen.clear()

    def _randn(self, shape, device) -> torch.Tensor:
        g = self._gen.get(device)
        if g is None:
            g = self._gen[device] = torch.Generator(device=device).manual_seed(self._seed)
        return torch.randn(shape, generator=g, device=device)

    @property
    def stochastic(self) -> bool:
        return self.kind == "representation" and self.path == "samples"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.eot_log_probs(x, 1)[0]

    def eot_log_probs(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """n independent predictions of x at once, [n, B, C]: the encoder runs once (it is deterministic in eval
        mode: only z is random), then n groups of S fresh z samples. An EOT step over n draws costs one encoder
        pass instead of n, with the same expectation; a deterministic path repeats its one prediction."""
        if self.kind == "supervised":
            log_p = F.log_softmax(self.model.logits(x).float(), dim=-1).unsqueeze(0)
        else:
            mu, logvar = self.model.encode(x)
            mu, logvar = mu.float(), logvar.float()
            if self.path == "mu":
                log_p = F.log_softmax(self.head(mu), dim=-1).unsqueeze(0)
            else:
                S, (B, D) = self.samples, mu.shape
                eps = self._randn((n, S, B, D), mu.device)
                z = mu + torch.exp(0.5 * logvar) * eps
                logits = self.head(z.reshape(n * S * B, D)).reshape(n, S, B, -1)
                log_p = torch.logsumexp(F.log_softmax(logits, dim=-1), dim=1) - math.log(S)
        if self.bounded_M is not None:
            log_p = bounded_log_probs(log_p, self.bounded_M)
        return log_p if log_p.shape[0] == n else log_p.expand(n, *log_p.shape[1:])


@torch.no_grad()
def predict(clf: nn.Module, x: torch.Tensor, *, batch_size: int = 512, device=None) -> torch.Tensor:
    """Predicted labels [N] (CPU) for x [N, ...] (float in [0, 1] or uint8)."""
    from urkle_fast.data import to_float01

    device = device or next(clf.parameters()).device
    out = []
    for i in range(0, len(x), batch_size):
        out.append(clf(to_float01(x[i:i + batch_size].to(device))).argmax(-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)  # an empty shard of a rank


def accuracy(clf: nn.Module, x: torch.Tensor, y: torch.Tensor, **kw) -> float:
    return (predict(clf, x, **kw) == y.cpu()).float().mean().item()
