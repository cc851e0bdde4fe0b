"""The evaluation networks that train a found cell from scratch (METHOD.md 1.5): DARTS's NetworkCIFAR
and NetworkImageNet.

Only the genotype's ops, affine BN, no BN after pools; an optional auxiliary head after cell
`2*layers//3`; drop path on every op output except the stride-1 identity.
"""

from __future__ import annotations

import torch
from torch import nn

from .space import FIXED_REDUCTION_CELLS, OPS, DilConv, FactorizedReduce, Genotype, Identity, ReLUConvBN, Zero


def drop_path(x: torch.Tensor, drop_prob: float, part: tuple[int, slice] | None = None) -> torch.Tensor:
    """Zero whole samples with probability `drop_prob`, scaling the kept ones by 1/keep. `part` (n, where):
    `x` is the part `where` of a batch of n images, and the masks are drawn for all n (so every process of a
    run draws the same numbers, and each image gets the mask it has in the whole batch). The masks come from torch's
    CPU stream whatever the device of `x`, so a run on a GPU draws the masks it draws on the CPU."""
    keep = 1.0 - drop_prob
    n, where = part if part is not None else (x.shape[0], slice(None))
    mask = torch.empty(n, 1, 1, 1, dtype=x.dtype).bernoulli_(keep)[where]
    return x / keep * mask.to(x.device, non_blocking=True)


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

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, drop_prob: float = 0.0,
                part: tuple[int, slice] | None = None) -> torch.Tensor:  # fmt: skip
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for i in range(len(self.ops) // 2):
            node = 0
            for k in (2 * i, 2 * i + 1):
                h = self.ops[k](states[self.indices[k]])
                if self.training and drop_prob > 0 and not isinstance(self.ops[k], Identity):
                    h = drop_path(h, drop_prob, part)
                node = node + h
            states.append(node)
        return torch.cat([states[i] for i in self.concat], dim=1)


class GDASReductionCell(nn.Module):
    """GDAS's hand-designed reduction cell (METHODS_MORE.md 2, FRC; AutoDL's GDAS_Reduction_Cell): after the usual
    preprocessing, `cat(X0, X1, X2, X3)` with X0 and X1 each [ReLU, 1x3 conv stride (1, 2), 3x1 conv stride (2, 1)
    (both in 8 groups), BN, ReLU, 1x1 conv, BN] of s0 and of s1 (own weights), X2 and X3 a 3x3 stride-2 max pool and
    a BN of s0 and of s1; drop path on each of the four, as the published cell. `affine` False in the search network
    (whose BNs are all affine-free); the convs have no bias, as everywhere in fastdarts (the published search network
    gives them one)."""

    multiplier = 4
    reduction = True
    groups = 8  # of the 1x3 and 3x1 convs: the cell's channels must be a multiple of it

    def __init__(self, C_prev_prev: int, C_prev: int, C: int, reduction_prev: bool, affine: bool = True):
        super().__init__()
        if C % self.groups:
            raise ValueError(f"the GDAS reduction cell's convs have {self.groups} groups: its {C} channels must be a "
                             f"multiple of {self.groups}")  # fmt: skip
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C, affine)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine)
        self.convs = nn.ModuleList(
            nn.Sequential(
                nn.ReLU(inplace=False),
                nn.Conv2d(C, C, (1, 3), stride=(1, 2), padding=(0, 1), groups=8, bias=False),
                nn.Conv2d(C, C, (3, 1), stride=(2, 1), padding=(1, 0), groups=8, bias=False),
                nn.BatchNorm2d(C, affine=affine),
                nn.ReLU(inplace=False),
                nn.Conv2d(C, C, 1, bias=False),
                nn.BatchNorm2d(C, affine=affine),
            )
            for _ in range(2)
        )
        self.pools = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(3, stride=2, padding=1), nn.BatchNorm2d(C, affine=affine)) for _ in range(2)
        )

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, drop_prob: float = 0.0,
                part: tuple[int, slice] | None = None) -> torch.Tensor:  # fmt: skip
        s0, s1 = self.preprocess0(s0), self.preprocess1(s1)
        outs = [self.convs[0](s0), self.convs[1](s1), self.pools[0](s0), self.pools[1](s1)]
        if self.training and drop_prob > 0:
            outs = [drop_path(out, drop_prob, part) for out in outs]
        return torch.cat(outs, dim=1)


# The module of each name of space.FIXED_REDUCTION_CELLS.
FIXED_REDUCTION_CELL_MODULES = {"gdas_reduction": GDASReductionCell}
assert tuple(FIXED_REDUCTION_CELL_MODULES) == FIXED_REDUCTION_CELLS


def make_cell(genotype: Genotype, C_prev_prev, C_prev, C, reduction, reduction_prev, uncounted=None) -> nn.Module:
    """The evaluation network's cell of one layer: an EvalCell, or the genotype's fixed reduction cell."""
    if reduction and genotype.fixed_reduction:
        return FIXED_REDUCTION_CELL_MODULES[genotype.fixed_reduction](C_prev_prev, C_prev, C, reduction_prev)
    return EvalCell(genotype, C_prev_prev, C_prev, C, reduction, reduction_prev, uncounted)


class AuxiliaryHead(nn.Module):
    """DARTS's auxiliary classifier, on the output of cell 2*layers//3: ReLU, a 5x5 average pool down to
    2x2, a 1x1 conv to 128, BN, ReLU, a 2x2 conv to 768, BN, ReLU, linear.

    DARTS pools with stride 3 on the 8x8 map of a 32x32 image (CIFAR), with stride 2 on the 7x7 map of a
    224x224 one (ImageNet, whose published head has no BN after the 2x2 conv: `bn_768=False`). A map of
    another size (the 2x2 maps of 8x8 digits, say) is pooled to 2x2 adaptively.
    """

    def __init__(self, C: int, num_classes: int, pool_stride: int = 3, native_size: int = 8, bn_768: bool = True):
        super().__init__()
        self.native_size = native_size
        self.relu = nn.ReLU(inplace=False)
        self.pool = nn.AvgPool2d(5, stride=pool_stride, padding=0, count_include_pad=False)
        self.adaptive_pool = nn.AdaptiveAvgPool2d(2)
        self.features = nn.Sequential(
            nn.Conv2d(C, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False),
            *([nn.BatchNorm2d(768)] if bn_768 else []),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x):
        x = self.relu(x)
        x = self.pool(x) if x.shape[-2:] == (self.native_size, self.native_size) else self.adaptive_pool(x)
        return self.classifier(self.features(x).flatten(1))


class EvalNetwork(nn.Module):
    """What both evaluation networks share: after a stem that gives the first two cell inputs, `layers`
    cells of `genotype` (reductions at layers//3 and 2*layers//3), the auxiliary head after cell
    2*layers//3, global average pooling and a linear classifier.

    `forward` returns `(logits, logits_aux)`; `logits_aux` is None unless the auxiliary head is
    on and the network is training.
    """

    def stems(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The inputs of the first cell."""
        raise NotImplementedError

    def _add_cells(self, genotype: Genotype, C: int, num_classes: int, layers: int, C_stem: int, stem_reduces: bool,
                   auxiliary_head: dict | None, uncounted: set | None) -> None:  # fmt: skip
        """Build the cells and heads (after the stem, so that weights are drawn in DARTS's order). `C_stem`
        is the channels of both stem outputs; `stem_reduces` says the second is half the size of the
        first; `auxiliary_head` holds the AuxiliaryHead's keyword arguments, None for no head."""
        self.layers = layers
        self.drop_path_prob = 0.0
        # (images in the global batch, this process's part of it) over several processes: see drop_path.
        self.drop_path_part: tuple[int, slice] | None = None
        C_prev_prev, C_prev, C_curr = C_stem, C_stem, C
        reduction_prev = stem_reduces
        cells = []
        C_aux = None
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                C_curr *= 2
            cell = make_cell(genotype, C_prev_prev, C_prev, C_curr, reduction, reduction_prev, uncounted)
            cells.append(cell)
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, cell.multiplier * C_curr
            if i == 2 * layers // 3:
                C_aux = C_prev
        self.cells = nn.ModuleList(cells)
        self.auxiliary_head = None if auxiliary_head is None else AuxiliaryHead(C_aux, num_classes, **auxiliary_head)
        # Adaptive, so that any image size works: on the 7x7 map of a 224x224 image it is DARTS's ImageNet AvgPool2d(7).
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits_aux = None
        s0, s1 = self.stems(x)
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob, self.drop_path_part)
            if i == 2 * self.layers // 3 and self.auxiliary_head is not None and self.training:
                logits_aux = self.auxiliary_head(s1)
        return self.classifier(self.global_pooling(s1).flatten(1)), logits_aux


class NetworkCIFAR(EvalNetwork):
    """DARTS's network for 32x32 images: a 3x3 conv stem (3C channels) at full resolution, then the cells.

    `uncounted`, when given a set, lets unknown op names through as zero placeholders (for counting)
    and collects them.
    """

    def __init__(self, genotype: Genotype, C=36, num_classes=10, layers=20, auxiliary=False, in_channels=3,
                 uncounted: set | None = None):  # fmt: skip
        super().__init__()
        stem_channels = 3 * C
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem_channels, 3, padding=1, bias=False), nn.BatchNorm2d(stem_channels)
        )
        self._add_cells(genotype, C, num_classes, layers, stem_channels, False, {} if auxiliary else None, uncounted)

    def stems(self, x):
        s = self.stem(x)
        return s, s


class NetworkImageNet(EvalNetwork):
    """DARTS's network for 224x224 images: two stems of stride-2 3x3 convs shrink the image 8x before the
    cells (stem0: conv to C/2, BN, ReLU, conv to C, BN; stem1: ReLU, conv, BN), so the first cell reads a
    56x56 and a 28x28 map; the auxiliary head pools the 7x7 map of cell 2*layers//3 with stride 2.
    DARTS's ImageNet setting: C=48, 14 cells, 1000 classes, the head on."""

    def __init__(self, genotype: Genotype, C=48, num_classes=1000, layers=14, auxiliary=False, in_channels=3,
                 uncounted: set | None = None):  # fmt: skip
        super().__init__()
        self.stem0 = nn.Sequential(
            nn.Conv2d(in_channels, C // 2, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C // 2),
            nn.ReLU(inplace=True),
            nn.Conv2d(C // 2, C, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C),
        )
        # Not in place, unlike DARTS's: there the ReLU also rewrites stem0's output, which changes nothing,
        # since the first cell reads that output through a ReLU of its own (FactorizedReduce).
        self.stem1 = nn.Sequential(nn.ReLU(inplace=False), nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False),
                                   nn.BatchNorm2d(C))  # fmt: skip
        head = dict(pool_stride=2, native_size=7, bn_768=False) if auxiliary else None
        self._add_cells(genotype, C, num_classes, layers, C, True, head, uncounted)

    def stems(self, x):
        s0 = self.stem0(x)
        return s0, self.stem1(s0)


NETWORKS = {"cifar": NetworkCIFAR, "imagenet": NetworkImageNet}


def count_parameters(model: nn.Module, exclude_auxiliary: bool = True) -> int:
    """Parameters of the network, without the auxiliary head (as DARTS reports them)."""
    return sum(
        p.numel()
        for name, p in model.named_parameters()
        if not (exclude_auxiliary and name.startswith("auxiliary_head."))
    )


def count_multiply_adds(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-adds of the convolutions and linear layers for one input of `input_shape` (C, H, W), eval mode.

    A conv counts its output elements times the inputs each one reads (in_channels / groups x kernel
    area), a linear layer its outputs times in_features. The convs that fused ops compute without calling
    their modules (the depthwise conv of a DilConv or SepConv, FactorizedReduce's two 1x1 convs) are
    counted from the shape of their op's output.
    """
    total = 0

    def conv_hook(module: nn.Conv2d, inputs, output):
        nonlocal total
        kh, kw = module.kernel_size
        total += output.numel() * (module.in_channels // module.groups) * kh * kw

    def linear_hook(module: nn.Linear, inputs, output):
        nonlocal total
        total += output.numel() * module.in_features

    def dil_conv_hook(module: DilConv, inputs, output):
        nonlocal total
        if module.fused:  # the depthwise conv: the op's input channels at its output's size
            depthwise = module[1]
            kh, kw = depthwise.kernel_size
            total += output.numel() // output.shape[1] * depthwise.in_channels * kh * kw

    def factorized_reduce_hook(module: FactorizedReduce, inputs, output):
        nonlocal total
        total += output.numel() * module.conv_1.in_channels  # each output channel is a 1x1 conv of the input

    hooks = {nn.Conv2d: conv_hook, nn.Linear: linear_hook, DilConv: dil_conv_hook,
             FactorizedReduce: factorized_reduce_hook}  # fmt: skip
    handles = [m.register_forward_hook(hooks[type(m)]) for m in model.modules() if type(m) in hooks]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            first = next(model.parameters(), None)
            model(torch.zeros(1, *input_shape, device=None if first is None else first.device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total
