import json
import subprocess
import sys

import pytest
import torch

from fastdarts import search
from fastdarts.config import SearchConfig
from fastdarts.space import Genotype

from .test_data import make_cifar_dir

TINY = ["--epochs", "1", "--layers", "3", "--init_channels", "2", "--batch_size", "64", "--no_progress"]


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "fastdarts.search", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


@pytest.mark.slow
def test_cli_runs_a_one_epoch_search_and_writes_its_outputs(tmp_path):
    out = tmp_path / "run"
    result = run_cli(*TINY, "--out", str(out))
    assert result.returncode == 0, result.stderr
    genotype = Genotype.from_json((out / "genotype.json").read_text())
    assert Genotype.parse((out / "genotype.txt").read_text()) == genotype
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "genotype", "normal_skip_connects",
                "entropy_normal", "entropy_reduce"):  # fmt: skip
        assert key in rows[0]
    assert (out / "checkpoint.pt").stat().st_size > 0
    for picture in ("curves.png", "skip_connects.png", "weights_normal.png", "weights_reduce.png", "normal.dot"):
        assert (out / picture).stat().st_size > 0, picture
    assert "epoch 0:" in result.stdout


def test_python_call_returns_genotype_and_history(tmp_path):
    result = search.run(SearchConfig(epochs=1, layers=3, init_channels=2, out=str(tmp_path / "r"), progress=False))
    assert isinstance(result.genotype, Genotype)
    assert len(result.history) == 1 and result.history[0]["epoch"] == 0
    assert 0 <= result.history[0]["val_acc"] <= 1


def test_config_file_and_flag_precedence(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 3\nlayers: 4\nlearning_rate: 0.05\n")
    from fastdarts.config import parse_command_line

    cli = parse_command_line(SearchConfig, ["--config", str(cfg), "--layers", "6"], "p", "d")
    config = cli.config.resolved()
    assert cli.resume is None and cli.seeds is None and cli.given == {"layers": 6}
    assert (config.epochs, config.layers, config.learning_rate) == (3, 6, 0.05)
    assert config.batch_size == 64  # preset of the digits data set


@pytest.mark.parametrize(
    "args,message",
    [
        (["--dataset", "cifar10", "--data", "/nonexistent/dir"], "does not exist"),
        (["--train_portion", "1.5"], "train_portion must be < 1"),
        (["--batch_size", "0"], "batch_size must be >= 1"),
        (["--learning_rate", "-1"], "learning_rate must be > 0"),
        (["--layers", "2"], "layers must be >= 3"),
        (["--layers", "1001"], "layers must be <= 1000"),
        (["--init_channels", "30000"], "with their gradients and momentum need"),
        (["--dataset", "cifar10"], "needs data"),
        (["--dataset", "imagenet"], "invalid choice"),
        (["--epochs", "many"], "invalid int value"),
        (["--config", "/nonexistent.yaml"], "does not exist"),
        (["--zero_one_weight", "5"], "zero_one_weight is an option of --method fair-darts, not of darts"),
        (["--method", "sdarts", "--pgd_steps", "3"], "pgd_steps is an option of the adversarial perturbation"),
        (["--method", "fair-darts", "--threshold", "1"], "threshold must be < 1"),
        (["--device", "tpu"], "invalid choice"),
        pytest.param(
            ["--device", "cuda"],
            "device cuda: no GPU is visible",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU"),
        ),
    ],
)
def test_bad_input_gives_one_line_and_status_2(tmp_path, args, message):
    result = run_cli(*args, "--out", str(tmp_path / "never"))
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "never").exists()


def test_unknown_config_key_and_bad_value(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text('{"epochs": 2, "learning_rat": 0.1}')
    result = run_cli("--config", str(cfg))
    assert result.returncode == 2 and "unknown key(s) learning_rat" in result.stderr
    cfg.write_text('{"batch_size": "big"}')
    result = run_cli("--config", str(cfg))
    assert result.returncode == 2 and "batch_size must be of type int" in result.stderr


def test_cifar10_directory_with_wrong_files(tmp_path):
    root = make_cifar_dir(tmp_path / "cifar")
    (root / "data_batch_5").unlink()
    result = run_cli("--dataset", "cifar10", "--data", str(root))
    assert result.returncode == 2 and "missing data_batch_5" in result.stderr


@pytest.mark.slow
def test_search_runs_on_a_cifar10_directory(tmp_path):
    root = make_cifar_dir(tmp_path / "cifar", per_batch=8)
    out = tmp_path / "run"
    result = run_cli("--dataset", "cifar10", "--data", str(root), *TINY, "--batch_size", "8", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert (out / "genotype.txt").exists()


def test_each_method_takes_its_own_options_and_refuses_another_method_s():
    from fastdarts.errors import ConfigError

    sdarts = SearchConfig(method="sdarts", perturbation="adv", pgd_steps=3).resolved()
    assert sdarts.method_settings() == dict(variant="adv", epsilon_start=0.03, epsilon_end=0.3, pgd_steps=3, seed=2)
    beta = SearchConfig(method="beta-darts", beta_decay_end=20.0).resolved()
    assert beta.method_settings() == dict(lambda_start=0.0, lambda_end=20.0)
    assert SearchConfig(method="darts-minus").resolved().method_settings() == dict(beta=1.0, decay="linear")
    with pytest.raises(ConfigError, match="auxiliary_skip_decay is an option of --method darts-minus, not of fair"):
        SearchConfig(method="fair-darts", auxiliary_skip_decay="cosine").resolved()


def test_a_method_starts_from_its_published_settings_on_the_cifar_setting_data_sets():
    fair = SearchConfig(dataset="cifar10", data="/cifar", method="fair-darts").resolved()
    assert (fair.batch_size, fair.learning_rate, fair.arch_learning_rate, fair.arch_beta1) == (128, 0.005, 3e-3, 0.9)
    darts = SearchConfig(dataset="cifar10", data="/cifar").resolved()
    assert (darts.batch_size, darts.learning_rate, darts.arch_learning_rate, darts.arch_beta1) == (64, 0.025, 3e-4, 0.5)
    given = SearchConfig(dataset="cifar10", data="/cifar", method="fair-darts", learning_rate=0.01).resolved()
    assert given.learning_rate == 0.01 and given.arch_beta1 == 0.9
    digits = SearchConfig(method="fair-darts").resolved()  # the digits preset is the same for every method
    assert (digits.batch_size, digits.learning_rate, digits.arch_learning_rate) == (64, 0.025, 3e-3)


@pytest.mark.parametrize("method", ["darts", "pr-darts", "gdas", "pc-darts", "drnas"])
def test_which_searches_keep_their_intermediates_unless_told(method):
    """Recomputation is the default on the CIFAR-setting data sets but for the methods whose kept intermediates are
    few (PR-DARTS's gated ops, GDAS's one op an edge, PC-DARTS's quarter of the channels); on the digits every method
    keeps them, and the flag overrides both."""
    keeps = method in ("pr-darts", "gdas", "pc-darts")
    assert SearchConfig(dataset="cifar10", data="/cifar", method=method).resolved().recompute is not keeps
    assert SearchConfig(method=method).resolved().recompute is False
    for flag in (True, False):
        given = SearchConfig(dataset="cifar10", data="/cifar", method=method, recompute=flag).resolved()
        assert given.recompute is flag


def test_the_paper_form_of_pr_darts_recomputes_unless_told():
    """PR-DARTS's paper form computes every op, as DARTS does: it recomputes on the CIFAR-setting data sets (keeping
    would take DARTS's 1.81 GiB at batch 64), keeps on the digits, and the flag overrides both."""
    paper = dict(method="pr-darts", prdarts_form="paper")
    assert SearchConfig(dataset="cifar10", data="/cifar", **paper).resolved().recompute is True
    assert SearchConfig(**paper).resolved().recompute is False
    assert SearchConfig(dataset="cifar10", data="/cifar", recompute=False, **paper).resolved().recompute is False
