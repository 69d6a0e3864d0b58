"""Small models the evaluation tests share (imported by the test modules; tests/ is on sys.path under pytest)."""

import torch.nn as nn


class TinyStandard(nn.Module):
    """Undefended supervised MLP on 8x8 digits (the 'Standard' row)."""

    kind = "supervised"

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def logits(self, x):
        return self.net(x)

    forward = logits
