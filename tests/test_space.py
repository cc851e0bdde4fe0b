import json

import pytest
import torch

from fastdarts import ops
from fastdarts.errors import GenotypeError
from fastdarts.space import DARTS_V1, DARTS_V2, OPS, PRIMITIVES, DilConv, Genotype, derive_cell, load_genotype

from .conftest import requires_ext


def test_primitives_order():
    assert PRIMITIVES == (
        "none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
        "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5",
    )  # fmt: skip


@pytest.mark.parametrize("name", PRIMITIVES)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("C,size", [(4, 7), (16, 8), (6, 9)])
@pytest.mark.parametrize("affine", [False, True])
def test_every_primitive_output_shape(name, stride, C, size, affine):
    op = OPS[name](C, stride, affine)
    x = torch.randn(3, C, size, size)
    out = op(x)
    expected = (size + 1) // 2 if stride == 2 else size
    assert out.shape == (3, C, expected, expected)
    if name == "none":
        assert torch.count_nonzero(out) == 0
    if name == "skip_connect" and stride == 1:
        assert torch.equal(out, x)


def test_conv_ops_have_no_bias_and_the_documented_structure():
    sep = OPS["sep_conv_5x5"](8, 2, False)
    convs = [m for m in sep.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(5, 5), (1, 1), (5, 5), (1, 1)]
    assert [c.stride for c in convs] == [(2, 2), (1, 1), (1, 1), (1, 1)]
    assert all(c.bias is None for c in convs)
    dil = OPS["dil_conv_5x5"](8, 1, False)
    depthwise = [m for m in dil.modules() if isinstance(m, torch.nn.Conv2d)][0]
    assert depthwise.dilation == (2, 2) and depthwise.padding == (4, 4) and depthwise.groups == 8
    bns = [m for m in dil.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 1 and not bns[0].affine


def test_avg_pool_does_not_count_padding():
    x = torch.ones(1, 1, 4, 4)
    assert torch.allclose(OPS["avg_pool_3x3"](1, 1, False)(x), x)


def test_darts_string_round_trip():
    for g in (DARTS_V1, DARTS_V2):
        text = str(g)
        assert text.startswith("Genotype(normal=[('sep_conv_3x3', ")
        assert Genotype.parse(text) == g


def test_parses_the_reference_code_form_with_range():
    text = (
        "Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1), "
        "('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), ('dil_conv_3x3', 2)], "
        "normal_concat=range(2, 6), reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), "
        "('max_pool_3x3', 1), ('max_pool_3x3', 0), ('skip_connect', 2), ('skip_connect', 2), ('max_pool_3x3', 1)], "
        "reduce_concat=range(2, 6))"
    )
    assert Genotype.parse(text) == DARTS_V2


def test_json_round_trip():
    for g in (DARTS_V1, DARTS_V2):
        data = json.loads(g.to_json())
        assert data["normal"][0] == ["sep_conv_3x3", 0] or data["normal"][0] == ["sep_conv_3x3", 1]
        assert Genotype.from_json(g.to_json()) == g


def test_a_named_fixed_reduction_cell_round_trips_as_text_and_json():
    g = Genotype(normal=DARTS_V2.normal, normal_concat=[2, 3, 4, 5], reduce="gdas_reduction", reduce_concat=[])
    assert str(g).endswith("normal_concat=[2, 3, 4, 5], reduce='gdas_reduction', reduce_concat=[])")
    assert Genotype.parse(str(g)) == g and Genotype.from_json(g.to_json()) == g
    assert json.loads(g.to_json())["reduce"] == "gdas_reduction"
    assert g.fixed_reduction == "gdas_reduction" and g.cell_edges("reduce") == () and g.reduce_concat == ()
    assert DARTS_V2.fixed_reduction is None and DARTS_V2.cell_edges("reduce") == DARTS_V2.reduce


@pytest.mark.parametrize(
    "text,message",
    [
        ("", "empty"),
        ("Genotype(normal=[('sep_conv_3x3', 0)", "not valid syntax"),
        ("Foo(normal=[])", "must have the form"),
        ("Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], normal_concat=[2])", "missing field"),
        ("Genotype(normal=[('a', 0), ('b', 1)], normal_concat=[2], reduce=[('a', 0), ('b', 1)], "
         "reduce_concat=[2], extra=1)", "unknown field"),
        ("Genotype(normal=[('a', 0), ('b', 3)], normal_concat=[2], reduce=[('a', 0), ('b', 1)], "
         "reduce_concat=[2])", "node 2 reads input 3"),
        ("Genotype(normal=[('a', 0)], normal_concat=[2], reduce=[('a', 0), ('b', 1)], reduce_concat=[2])",
         "two edges per intermediate node"),
        ("Genotype(normal=[('a', 0), ('b', 1)], normal_concat=[7], reduce=[('a', 0), ('b', 1)], "
         "reduce_concat=[2])", "names node 7"),
        ("Genotype(normal=[('a', 'x'), ('b', 1)], normal_concat=[2], reduce=[('a', 0), ('b', 1)], "
         "reduce_concat=[2])", "expected an integer"),
        ("Genotype(normal=[(1, 0), ('b', 1)], normal_concat=[2], reduce=[('a', 0), ('b', 1)], "
         "reduce_concat=[2])", "pair (op name, input index)"),
        ("Genotype(normal=os.system('x'), normal_concat=[2], reduce=[], reduce_concat=[2])", "range(...)"),
        ("Genotype(normal=[('a', 0), ('b', 1)], normal_concat=[2], reduce='gdas', reduce_concat=[])",
         "reduce: 'gdas' is not a fixed reduction cell (gdas_reduction)"),
        ("Genotype(normal=[('a', 0), ('b', 1)], normal_concat=[2], reduce='gdas_reduction', reduce_concat=[2])",
         "reduce_concat must be .. with the fixed reduction cell 'gdas_reduction'"),
        ("Genotype(normal='gdas_reduction', normal_concat=[2], reduce='gdas_reduction', reduce_concat=[])",
         "genotype field 'normal' must be a list"),
    ],
)  # fmt: skip
def test_malformed_genotype_strings_give_one_line_errors(text, message):
    with pytest.raises(GenotypeError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        Genotype.parse(text)
    assert "\n" not in str(info.value)


def test_load_genotype_sources(tmp_path):
    assert load_genotype("DARTS_V2") is DARTS_V2
    assert load_genotype(str(DARTS_V1)) == DARTS_V1
    (tmp_path / "genotype.json").write_text(DARTS_V1.to_json())
    assert load_genotype(tmp_path) == DARTS_V1
    assert load_genotype(tmp_path / "genotype.json") == DARTS_V1
    (tmp_path / "g.txt").write_text(str(DARTS_V2) + "\n")
    assert load_genotype(tmp_path / "g.txt") == DARTS_V2
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(GenotypeError, match="empty"):
        load_genotype(tmp_path / "empty.txt")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(GenotypeError, match="malformed"):
        load_genotype(tmp_path / "bad.json")
    with pytest.raises(GenotypeError, match="not a built-in genotype"):
        load_genotype("DARTS_V9")
    (tmp_path / "nested").mkdir()
    with pytest.raises(GenotypeError, match="no genotype.json"):
        load_genotype(tmp_path / "nested")


def _weights_for(cell, steps=4):
    """Edge weights that make DARTS's rule pick `cell` (an 8-edge list), `none` strongest everywhere."""
    rows = []
    for i in range(steps):
        chosen = {inp: (op, rank) for rank, (op, inp) in enumerate(cell[2 * i : 2 * i + 2])}
        for j in range(2 + i):
            row = torch.full((len(PRIMITIVES),), 0.01)
            row[0] = 0.5  # none is ignored however large
            if j in chosen:
                op, rank = chosen[j]
                row[PRIMITIVES.index(op)] = 0.3 - 0.1 * rank
            rows.append(row)
    return torch.stack(rows)


def test_derivation_recovers_known_cells():
    for g in (DARTS_V1, DARTS_V2):
        assert derive_cell(_weights_for(g.normal), 4) == g.normal
        assert derive_cell(_weights_for(g.reduce), 4) == g.reduce


def test_derivation_tie_breaks():
    # Node 0: both inputs tie on score -> input 0 first; on an edge, two ops tie -> lower column.
    w = torch.zeros(2, len(PRIMITIVES))
    w[0, PRIMITIVES.index("sep_conv_5x5")] = 0.4
    w[0, PRIMITIVES.index("sep_conv_3x3")] = 0.4
    w[1, PRIMITIVES.index("max_pool_3x3")] = 0.4
    assert derive_cell(w, 1) == (("sep_conv_3x3", 0), ("max_pool_3x3", 1))
    # Ordered by descending score, not by input index.
    w[1, PRIMITIVES.index("max_pool_3x3")] = 0.9
    assert derive_cell(w, 1) == (("max_pool_3x3", 1), ("sep_conv_3x3", 0))


def test_derivation_keeps_two_distinct_inputs_and_rejects_wrong_shapes():
    w = torch.rand(14, len(PRIMITIVES))
    cell = derive_cell(w, 4)
    for i in range(4):
        (_, a), (_, b) = cell[2 * i : 2 * i + 2]
        assert a != b and a < 2 + i and b < 2 + i
        assert "none" not in (cell[2 * i][0], cell[2 * i + 1][0])
    with pytest.raises(ValueError, match="shape"):
        derive_cell(torch.rand(13, 8), 4)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=requires_ext)])
@pytest.mark.parametrize("name", ["sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv_ops_run_relu_and_depthwise_fused_with_the_module_math(name, stride, backend):
    """The fused forward of DilConv (and so of SepConv) equals running its DARTS submodules one after another."""
    op = OPS[name](5, stride, True)
    for module in op.modules():
        if isinstance(module, DilConv):
            assert module.fused
    x = torch.randn(3, 5, 9, 9, requires_grad=True)

    def unfused(m, x):  # nn.Sequential's forward, through nested DilConvs
        for child in m:
            x = unfused(child, x) if isinstance(child, DilConv) else child(x)
        return x

    with ops.use_backend(backend):
        got = op(x)
    want = unfused(op, x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    inputs = [x, *op.parameters()]
    upstream = torch.randn_like(got)
    for g, w in zip(torch.autograd.grad(got, inputs, upstream), torch.autograd.grad(want, inputs, upstream)):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-4)


def test_dil_conv_with_other_padding_keeps_the_plain_modules():
    op = DilConv(4, 4, 3, 1, 0, 1)
    assert not op.fused
    assert op(torch.randn(1, 4, 7, 7)).shape == (1, 4, 5, 5)


def test_cells_without_ops_names_the_searched_cells_whose_every_edge_is_none():
    empty = [("none", 0), ("none", 1)] * 4
    assert DARTS_V2.cells_without_ops() == []
    assert Genotype(empty, [2, 3, 4, 5], DARTS_V2.reduce, [2, 3, 4, 5]).cells_without_ops() == ["normal"]
    assert Genotype(empty, [2, 3, 4, 5], empty, [2, 3, 4, 5]).cells_without_ops() == ["normal", "reduce"]
    assert Genotype(empty, [2, 3, 4, 5], "gdas_reduction", []).cells_without_ops() == ["normal"]
