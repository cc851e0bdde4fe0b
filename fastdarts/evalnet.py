"""The evaluation network that trains a found cell from scratch (METHOD.md 1.5): NetworkCIFAR.

Only the genotype's ops, affine BN, no BN after pools; an optional auxiliary head after cell
`2*layers//3`; drop path on every op output except the stride-1 identity.
"""

from __future__ import annotations

import torch
from torch import nn

from .space import OPS, FactorizedReduce, Genotype, Identity, ReLUConvBN, Zero


def drop_path(x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """Zero whole samples with probability `drop_prob`, scaling the kept ones by 1/keep."""
    keep = 1.0 - drop_prob
    mask = torch.empty(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x / keep * mask


class EvalCell(nn.Module):
    """A discrete cell: each node sums its two edges' ops; the output concatenates `concat`."""

    def __init__(self, genotype: Genotype, C_prev_prev, C_prev, C, reduction, reduction_prev, uncounted=None):
        super().__init__()
        self.reduction = reduction
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0)
        edges = genotype.reduce if reduction else genotype.normal
        self.concat = tuple(genotype.reduce_concat if reduction else genotype.normal_concat)
        self.indices = tuple(index for _, index in edges)
        self.multiplier = len(self.concat)
        ops = []
        for name, index in edges:
            stride = 2 if reduction and index < 2 else 1
            if name in OPS:
                ops.append(OPS[name](C, stride, True))
            elif uncounted is not None:
                # An op fastdarts does not know: a shape-keeping placeholder, reported as not counted.
                uncounted.add(name)
                ops.append(Zero(stride))
            else:
                raise ValueError(f"genotype op {name!r} is not one of fastdarts's ops ({', '.join(OPS)})")
        self.ops = nn.ModuleList(ops)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, drop_prob: float = 0.0) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for i in range(len(self.ops) // 2):
            node = 0
            for k in (2 * i, 2 * i + 1):
                h = self.ops[k](states[self.indices[k]])
                if self.training and drop_prob > 0 and not isinstance(self.ops[k], Identity):
                    h = drop_path(h, drop_prob)
                node = node + h
            states.append(node)
        return torch.cat([states[i] for i in self.concat], dim=1)


class AuxiliaryHead(nn.Module):
    """DARTS's CIFAR auxiliary classifier. It pools its input to 2x2: an 8x8 map (CIFAR-10 after two
    reductions) exactly as DARTS does, with a 5x5 average pool of stride 3; any other size (the 2x2
    maps of 8x8 digits, say) with an adaptive average pool."""

    def __init__(self, C: int, num_classes: int):
        super().__init__()
        self.relu = nn.ReLU(inplace=False)
        self.pool = nn.AvgPool2d(5, stride=3, padding=0, count_include_pad=False)
        self.adaptive_pool = nn.AdaptiveAvgPool2d(2)
        self.features = nn.Sequential(
            nn.Conv2d(C, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False),
            nn.BatchNorm2d(768),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x):
        x = self.relu(x)
        x = self.pool(x) if x.shape[-2:] == (8, 8) else self.adaptive_pool(x)
        return self.classifier(self.features(x).flatten(1))


class NetworkCIFAR(nn.Module):
    """Stem, `layers` cells of `genotype` (reductions at layers//3 and 2*layers//3), classifier.

    `forward` returns `(logits, logits_aux)`; `logits_aux` is None unless the auxiliary head is
    on and the network is training. `uncounted`, when given a set, lets unknown op names through
    as zero placeholders (for counting) and collects them.
    """

    def __init__(self, genotype: Genotype, C=36, num_classes=10, layers=20, auxiliary=False, in_channels=3,
                 uncounted: set | None = None):  # fmt: skip
        super().__init__()
        self.layers = layers
        self.drop_path_prob = 0.0
        stem_channels = 3 * C
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem_channels, 3, padding=1, bias=False), nn.BatchNorm2d(stem_channels)
        )
        C_prev_prev, C_prev, C_curr = stem_channels, stem_channels, C
        reduction_prev = False
        cells = []
        C_aux = None
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                C_curr *= 2
            cell = EvalCell(genotype, C_prev_prev, C_prev, C_curr, reduction, reduction_prev, uncounted)
            cells.append(cell)
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, cell.multiplier * C_curr
            if i == 2 * layers // 3:
                C_aux = C_prev
        self.cells = nn.ModuleList(cells)
        self.auxiliary_head = AuxiliaryHead(C_aux, num_classes) if auxiliary else None
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits_aux = None
        s0 = s1 = self.stem(x)
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == 2 * self.layers // 3 and self.auxiliary_head is not None and self.training:
                logits_aux = self.auxiliary_head(s1)
        return self.classifier(self.global_pooling(s1).flatten(1)), logits_aux


def count_parameters(model: nn.Module, exclude_auxiliary: bool = True) -> int:
    """Parameters of the network, without the auxiliary head (as DARTS reports them)."""
    return sum(
        p.numel()
        for name, p in model.named_parameters()
        if not (exclude_auxiliary and name.startswith("auxiliary_head."))
    )


def count_multiply_adds(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-adds of the convolutions and linear layers for one input of `input_shape` (C, H, W), eval mode."""
    total = 0

    def conv_hook(module: nn.Conv2d, inputs, output):
        nonlocal total
        kh, kw = module.kernel_size
        total += output.numel() * (module.in_channels // module.groups) * kh * kw

    def linear_hook(module: nn.Linear, inputs, output):
        nonlocal total
        total += output.numel() * module.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total
