import json
import random
import re
import subprocess
import sys
from fractions import Fraction

import pytest

from fastdarts import analyze
from fastdarts.analyze import cell_depth, cell_to_dot, cell_width, describe_network, variants, write_cell_diagrams
from fastdarts.config import run_cli
from fastdarts.evalnet import NetworkCIFAR, count_multiply_adds, count_parameters
from fastdarts.space import DARTS_V1, DARTS_V2, Genotype


def cell(edges, concat=(2, 3, 4, 5)):
    """A genotype whose normal and reduce cells are both `edges`."""
    return Genotype(normal=edges, normal_concat=concat, reduce=edges, reduce_concat=concat)


def width_depth(g):
    return cell_width(g.normal), cell_depth(g.normal, g.normal_concat)


def test_darts_v2_is_three_and_a_half_wide_and_three_deep():
    assert width_depth(DARTS_V2) == (Fraction(7, 2), 3)


def test_all_nodes_on_the_inputs_is_depth_two():
    g = cell([("sep_conv_3x3", 0), ("sep_conv_3x3", 1)] * 4)
    assert width_depth(g) == (4, 2)


def test_node_reading_the_same_input_twice():
    # Node 3 reads node 2 twice: no cell input, so it adds no width and one level of depth.
    g = cell([("sep_conv_3x3", 0), ("skip_connect", 0), ("sep_conv_3x3", 2), ("max_pool_3x3", 2),
              ("sep_conv_3x3", 1), ("sep_conv_3x3", 3), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1)])  # fmt: skip
    assert width_depth(g) == (Fraction(5, 2), 4)


def test_node_not_in_the_concat_list_counts_for_width_but_not_depth():
    # Node 5 reads only the inputs but a deep chain 2 -> 3 -> 4 is left out of the output.
    edges = [("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 2), ("sep_conv_3x3", 2),
             ("sep_conv_3x3", 3), ("sep_conv_3x3", 3), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1)]  # fmt: skip
    assert width_depth(cell(edges, concat=(2, 5))) == (2, 2)
    assert width_depth(cell(edges, concat=(4, 5))) == (2, 4)


def test_five_node_cell():
    edges = [("sep_conv_3x3", 0), ("sep_conv_5x5", 1), ("max_pool_3x3", 0), ("sep_conv_3x3", 2),
             ("skip_connect", 3), ("avg_pool_3x3", 1), ("sep_conv_3x3", 4), ("sep_conv_3x3", 4),
             ("dil_conv_3x3", 0), ("skip_connect", 5)]  # fmt: skip
    g = cell(edges, concat=(2, 3, 4, 5, 6))
    assert g.steps == 5
    # widths 1 + 1/2 + 1/2 + 0 + 1/2; deepest: x0 -> 2 -> 3 -> 4 -> 5 -> 6 -> out
    assert width_depth(g) == (Fraction(5, 2), 6)


def test_chain_cell():
    edges = [("sep_conv_3x3", n) for n in (1, 1, 2, 2, 3, 3, 4, 4)]
    assert width_depth(cell(edges, concat=(5,))) == (1, 5)


def test_variants_keep_ops_and_concat_are_reproducible_and_respect_the_dag():
    drawn = variants(DARTS_V2, 20, seed=3)
    assert drawn == variants(DARTS_V2, 20, seed=3)
    assert drawn != variants(DARTS_V2, 20, seed=4)
    assert len(set(drawn)) == 20 and DARTS_V2 not in drawn
    for g in drawn:
        for name in ("normal", "reduce"):
            edges, original = getattr(g, name), getattr(DARTS_V2, name)
            assert [op for op, _ in edges] == [op for op, _ in original]
            assert getattr(g, f"{name}_concat") == getattr(DARTS_V2, f"{name}_concat")
            assert all(index < 2 + k // 2 for k, (_, index) in enumerate(edges))
    widths = {cell_width(g.normal) for g in drawn}
    assert len(widths) > 1  # the wiring really is redrawn


def test_op_variants_keep_the_wiring():
    for g in variants(DARTS_V2, 5, seed=0, kind="ops"):
        assert [i for _, i in g.normal] == [i for _, i in DARTS_V2.normal]
        assert all(op != "none" for op, _ in g.normal + g.reduce)


def test_one_seeded_stream_serves_both_cells():
    rng = random.Random(7)
    g = analyze.random_wiring_variant(DARTS_V2, rng)
    rng = random.Random(7)
    normal = [rng.randrange(2 + k // 2) for k in range(8)]
    reduce = [rng.randrange(2 + k // 2) for k in range(8)]
    assert [i for _, i in g.normal] == normal and [i for _, i in g.reduce] == reduce


def parse_dot(text):
    labelled = re.findall(r'"([^"]+)" -> "([^"]+)" \[label="([^"]+)"\]', text)
    to_output = re.findall(r'"([^"]+)" -> "c_\{k\}" \[color=gray\]', text)
    nodes = re.findall(r'^\s*"([^"]+)" \[fillcolor', text, flags=re.M)
    return nodes, labelled, to_output


@pytest.mark.parametrize("g", [DARTS_V1, DARTS_V2])
def test_dot_output_parses_back_to_the_genotype(g):
    nodes, labelled, to_output = parse_dot(cell_to_dot(g, "normal"))
    assert nodes == ["c_{k-2}", "c_{k-1}", "0", "1", "2", "3", "c_{k}"]
    names = ["c_{k-2}", "c_{k-1}", "0", "1", "2", "3"]
    assert labelled == [(names[i], str(k // 2), op) for k, (op, i) in enumerate(g.normal)]
    assert to_output == [names[c] for c in g.normal_concat]


def test_diagrams_render_with_or_without_dot(tmp_path):
    # Graphviz renders the PNG and SVG when `dot` is installed, matplotlib draws them otherwise (tests/test_plots.py).
    written = write_cell_diagrams(DARTS_V2, tmp_path)
    assert [p.name for p in written] == [f"{c}.{s}" for c in ("normal", "reduce") for s in ("dot", "png", "svg")]
    png = (tmp_path / "normal.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert (tmp_path / "reduce.svg").read_text().lstrip().startswith("<?xml")


def test_a_fixed_reduction_cell_is_reported_kept_by_variants_and_not_drawn(tmp_path, capsys):
    g = Genotype(normal=DARTS_V2.normal, normal_concat=[2, 3, 4, 5], reduce="gdas_reduction", reduce_concat=[])
    report = analyze.describe(g, C=8, layers=5, image_size=8, in_channels=1)
    assert report["reduce"] == {"fixed": "gdas_reduction"} and report["normal"]["width_c"] == 3.5
    assert report["network"]["parameters"] > 0 and not report["network"]["uncounted_ops"]
    analyze.print_report(report)
    assert "reduce: the fixed reduction cell gdas_reduction" in capsys.readouterr().out
    for kind in ("wiring", "ops"):
        drawn = variants(g, 3, seed=0, kind=kind)
        assert all(v.reduce == "gdas_reduction" and v.normal != g.normal for v in drawn)
    assert analyze.shu_wiring_variant(g, 1).reduce == "gdas_reduction"
    assert {p.stem for p in write_cell_diagrams(g, tmp_path)} == {"normal"}


def test_darts_v2_evaluation_network_parameter_count():
    n = describe_network(DARTS_V2)
    assert 3.3e6 <= n["parameters"] <= 3.4e6
    assert n["uncounted_ops"] == []
    assert n["multiply_adds"] > 4e8


def test_a_network_too_large_for_memory_is_counted_on_the_meta_device(capsys):
    """Counting builds the evaluation network on the meta device: at the largest sizes analyze accepts, its weights
    alone would be terabytes, and the counts still come out (and match a CPU build at a small size)."""
    small = describe_network(DARTS_V2, C=4, layers=5, image_size=9)
    net = NetworkCIFAR(DARTS_V2, 4, 10, 5, auxiliary=False)
    assert small["parameters"] == count_parameters(net)
    assert small["multiply_adds"] == count_multiply_adds(net, (3, 9, 9))
    most = analyze.NETWORK_LIMITS
    sizes = ("init_channels", "num_classes", "image_size")
    argv = ["DARTS_V2", "--json", *(f"--{name}={most[name]}" for name in sizes)]
    assert run_cli(analyze.main, argv) == 0
    network = json.loads(capsys.readouterr().out)["network"]
    assert network["parameters"] > 1e12 and network["multiply_adds"] > 1e18


@pytest.mark.parametrize("name", ["init_channels", "layers", "num_classes", "image_size"])
def test_sizes_past_the_limits_are_refused_in_one_line(name, capsys):
    value = analyze.NETWORK_LIMITS[name] + 1
    assert run_cli(analyze.main, ["DARTS_V2", f"--{name}", str(value)]) == 2
    err = capsys.readouterr().err
    assert f"--{name} must be at most" in err and len(err.strip().splitlines()) == 1, err


def test_unknown_ops_are_reported_as_not_counted():
    g = cell([("sep_conv_3x3", 0), ("my_op", 1)] * 4)
    n = describe_network(g, C=8, layers=5)
    assert n["uncounted_ops"] == ["my_op"]


def run(*args):
    command = [sys.executable, "-m", "fastdarts.analyze", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_cli_json_report(tmp_path):
    result = run("DARTS_V2", "--json", "--variants", "3", "--seed", "1", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["normal"]["width_c"] == 3.5 and report["normal"]["depth"] == 3
    assert report["normal"]["skip_connects"] == 2
    assert sum(len(v) for v in report["variants"].values()) == 3
    assert json.loads((tmp_path / "variants.json").read_text()) == report["variants"]


@pytest.mark.parametrize(
    "arg,message",
    [
        ("DARTS_V9", "not a built-in genotype"),
        ("Genotype(normal=[('sep_conv_3x3', 0)", "not valid syntax"),
        ("Genotype(normal=[('a', 0), ('b', 2)], normal_concat=[2], reduce=[('a', 0), ('b', 1)], reduce_concat=[2])",
         "node 2 reads input 2"),
        ("EMPTY_FILE", "genotype file is empty"),
    ],
)  # fmt: skip
def test_cli_bad_input_is_one_line_and_status_2(tmp_path, arg, message):
    if arg == "EMPTY_FILE":
        arg = str(tmp_path / "genotype.txt")
        (tmp_path / "genotype.txt").write_text("")
    result = run(arg)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_builtin_cells_from_other_search_spaces():
    from fastdarts.space import AMOEBANET, NASNET, PRDARTS

    nasnet = analyze.describe(NASNET, C=8, layers=5)
    assert nasnet["normal"]["nodes"] == 5 and nasnet["normal"]["width_c"] == 5 and nasnet["normal"]["depth"] == 2
    assert nasnet["network"]["uncounted_ops"] == ["sep_conv_7x7"]
    amoeba = analyze.describe(AMOEBANET, C=8, layers=5)
    assert amoeba["network"]["uncounted_ops"] == ["conv_7x1_1x7", "sep_conv_7x7"]
    assert amoeba["reduce"]["concat"] == [3, 4, 6]
    # PR-DARTS's normal cell has one skip connection, DARTS_V2's two, DARTS_V1's three.
    assert [analyze.describe_cell(g, "normal")["skip_connects"] for g in (PRDARTS, DARTS_V2, DARTS_V1)] == [1, 2, 3]


@pytest.mark.parametrize("name", ["DARTS_V1", "DARTS_V2"])
def test_cli_takes_a_published_genotype_written_out_in_full(name):
    # Longer than a file name may be: analyze once crashed looking it up as a path (OSError: File name too long).
    from fastdarts.space import BUILTIN_GENOTYPES

    text = str(BUILTIN_GENOTYPES[name])
    assert len(text) > 255
    result = run("--json", text)
    assert result.returncode == 0, result.stderr
    by_name = json.loads(run("--json", name).stdout)
    assert json.loads(result.stdout) == {k: v for k, v in by_name.items() if k != "source"}


@pytest.mark.parametrize(
    "arg,message",
    [
        ("x" * 300, "genotype " + "x" * 60 + "... (300 characters): File name too long"),
        ("FILE/genotype.json", "FILE/genotype.json: Not a directory"),
        ("Genotype(normal=[('a', 0), ('b', 1)], normal_concat=range(2, 1000000000000), reduce=[('a', 0), ('b', 1)], "
         "reduce_concat=[2])", "'normal_concat' names 999999999998 nodes, more than the cell has"),
        ("Genotype(normal=[('a', 0), ('b', 1)], normal_concat=[2], reduce=[('a', 0), ('b', 1)], reduce_concat=[0, 2])",
         "reduce_concat names cell input 0"),
    ],
)  # fmt: skip
def test_bad_paths_and_cells_are_one_line_errors(arg, message, tmp_path, capsys):
    (tmp_path / "FILE").write_text("a file where a directory is expected")
    arg, message = (text.replace("FILE", str(tmp_path / "FILE")) for text in (arg, message))
    assert run_cli(analyze.main, [arg]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_run_directory_source_and_out_checked_before_writing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "genotype.json").write_text(DARTS_V2.to_json())
    assert run_cli(analyze.main, [str(run_dir), "--variants", "2", "--init_channels", "2", "--layers", "3"]) == 0
    assert json.loads((run_dir / "variants.json").read_text())  # a run directory is where its outputs go
    (tmp_path / "file").write_text("")
    assert run_cli(analyze.main, ["DARTS_V2", "--variants", "2", "--out", str(tmp_path / "file")]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
