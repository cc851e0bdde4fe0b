"""The recurrent search space (RNN.md): corpus, node op, cells, genotype rule, search runs and their resume."""

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from fastdarts import ops
from fastdarts.bilevel import frozen
from fastdarts.checkpoint import RunInterrupted
from fastdarts.config import requested_space
from fastdarts.errors import ConfigError, DataError, GenotypeError
from fastdarts.ops.reference import rnn_mixed_node as mixed_node_reference
from fastdarts.rnn import decoder
from fastdarts.rnn import search as rnn_search
from fastdarts.rnn import train as rnn_train
from fastdarts.rnn.data import BUNDLED, batchify, get_batch, load_corpus
from fastdarts.rnn.genotype import (
    DARTS_V1,
    DARTS_V2,
    PRIMITIVES,
    RecurrentGenotype,
    derive_recurrent,
    load_recurrent_genotype,
    row,
)
from fastdarts.rnn.loop import epoch_batches, rows_of
from fastdarts.rnn.model import RecurrentEvalModel, RecurrentSearchModel, SearchCell

from .conftest import requires_ext
from .test_runs import assert_same_end

# DARTS's rnn/genotypes.py, verbatim.
DARTS_V1_TEXT = ("Genotype(recurrent=[('relu', 0), ('relu', 1), ('tanh', 2), ('relu', 3), ('relu', 4), "
                 "('identity', 1), ('relu', 5), ('relu', 1)], concat=range(1, 9))")  # fmt: skip
DARTS_V2_TEXT = ("Genotype(recurrent=[('sigmoid', 0), ('relu', 1), ('relu', 1), ('identity', 1), ('tanh', 2), "
                 "('sigmoid', 5), ('tanh', 3), ('relu', 5)], concat=range(1, 9))")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Corpus


def small_corpus(directory, names=("train.txt", "valid.txt", "test.txt"), lines=(150, 40, 40)):
    """The first lines of each bundled split, under the given file names."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, split, count in zip(names, ("train", "valid", "test"), lines):
        text = (BUNDLED / f"{split}.txt").read_text().splitlines(keepends=True)[:count]
        (directory / name).write_text("".join(text))
    return directory


def test_bundled_corpus_is_ptb_format_with_a_closed_vocabulary():
    corpus = load_corpus()
    assert len(corpus.train) > 40000 and len(corpus.valid) > 5000 and len(corpus.test) > 5000
    train_words = set(corpus.dictionary.idx2word[i] for i in corpus.train.unique().tolist())
    assert set(corpus.dictionary.idx2word) == train_words  # valid and test use only train's words
    assert "<unk>" in train_words and "<eos>" in train_words and "N" in train_words
    assert sum(p.stat().st_size for p in BUNDLED.glob("*.txt")) < 1_000_000


@pytest.mark.parametrize("names", [("train.txt", "valid.txt", "test.txt"),
                                   ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt")])  # fmt: skip
def test_data_directory_in_either_naming(tmp_path, names):
    (tmp_path / "d").mkdir()
    for name, text in zip(names, (" a b c \n b c \n", " c a \n", "\n a \n")):
        (tmp_path / "d" / name).write_text(text)
    corpus = load_corpus(tmp_path / "d")
    words = corpus.dictionary.idx2word
    assert words == ["a", "b", "c", "<eos>"]  # ids in order of first occurrence, train first
    assert [words[i] for i in corpus.train] == ["a", "b", "c", "<eos>", "b", "c", "<eos>"]
    assert [words[i] for i in corpus.test] == ["<eos>", "a", "<eos>"]  # a blank line is one <eos>


def test_data_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(tmp_path / "missing")
    (tmp_path / "f").write_text("x")
    with pytest.raises(DataError, match="is not a directory"):
        load_corpus(tmp_path / "f")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.txt").write_text("a b\n")
    with pytest.raises(DataError, match=r"must hold train.txt, valid.txt and test.txt \(or ptb.train.txt"):
        load_corpus(tmp_path / "d")
    for name in ("valid.txt", "test.txt"):
        (tmp_path / "d" / name).write_text("")
    with pytest.raises(DataError, match="valid.txt: holds no text"):
        load_corpus(tmp_path / "d")


def test_batchify_and_get_batch_follow_darts():
    data = torch.arange(23)
    batched = batchify(data, 4)  # 5 rows; the last 3 tokens are dropped
    assert batched.shape == (5, 4) and batched[:, 1].tolist() == [5, 6, 7, 8, 9]
    x, y = get_batch(batched, 2, seq_len=35)  # shortened to the stream's end
    assert x.tolist() == batched[2:4].tolist() and y.tolist() == batched[3:5].reshape(-1).tolist()
    with pytest.raises(DataError, match="fewer than 2 rows"):
        batchify(data, 16)


def test_epoch_batches_cover_the_stream_with_darts_lengths():
    batched = batchify(torch.arange(40000), 10)  # 4000 rows
    batches = epoch_batches(len(batched), 10, 35, torch.Generator().manual_seed(0))
    lengths = [len(b) // 10 for b in batches]
    assert set(lengths[:-1]) <= {35, 17} and 17 in lengths  # half of bptt with probability 0.05
    start, x, y = rows_of(batched, batches[1])
    assert start == lengths[0] and torch.equal(x, batched[start : start + lengths[1]])
    assert torch.equal(y, batched[start + 1 : start + 1 + lengths[1]].reshape(-1))
    # Every row is an input once, up to the last one or two (DARTS's loop stops at rows - 2).
    assert len(batched) - 2 <= sum(lengths) <= len(batched) - 1


# ---------------------------------------------------------------------------------------------------------------
# The node op and the cells


def darts_node(states, ch, p):
    """model_search.py:30-38 written out: every predecessor, every op but none, the highway update."""
    funcs = {"tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid, "identity": lambda h: h}
    total = 0
    for j in range(len(states)):
        c, h = ch[j].chunk(2, dim=-1)
        c = torch.sigmoid(c)
        for k, name in enumerate(PRIMITIVES):
            if name == "none":
                continue
            total = total + p[j, k] * (states[j] + c * (funcs[name](h) - states[j]))
    return total


@pytest.mark.parametrize("n,batch,hidden", [(1, 3, 4), (4, 5, 7), (8, 2, 3)])
def test_node_op_matches_darts_formula_in_values_and_gradients(n, batch, hidden):
    g = torch.Generator().manual_seed(n)
    states = torch.randn(n, batch, hidden, generator=g, dtype=torch.float64, requires_grad=True)
    ch = torch.randn(n, batch, 2 * hidden, generator=g, dtype=torch.float64)
    ch[0, 0, hidden] = 0.0  # a relu input of exactly 0: derivative 0, as torch's
    ch.requires_grad_()
    p = torch.randn(n, 5, generator=g, dtype=torch.float64).softmax(-1).requires_grad_()
    expected, got = darts_node(states, ch, p), mixed_node_reference(states, ch, p)
    torch.testing.assert_close(got, expected)
    upstream = torch.randn(batch, hidden, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(got, (states, ch, p), upstream)
    for a, b in zip(grads, torch.autograd.grad(expected, (states, ch, p), upstream)):
        torch.testing.assert_close(a, b)
    assert torch.all(grads[2][:, 0] == 0)  # none adds nothing
    # gradcheck away from relu's kink (finite differences straddle it at exactly 0)
    smooth = torch.randn(n, batch, 2 * hidden, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(mixed_node_reference, (states, smooth, p))


def test_search_model_shapes_and_the_shared_batch_norm():
    torch.manual_seed(0)
    model = RecurrentSearchModel(50, 8, 8)
    steps, batch = 6, 4
    logits, _, _, hidden, raw = model(torch.randint(0, 50, (steps, batch)), model.init_hidden(batch))
    assert logits.shape == (steps * batch, 50) and hidden.shape == (1, batch, 8) and raw.shape == (steps, batch, 8)
    assert torch.equal(hidden[0], raw[-1])
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(bns) == 1 and int(bns[0].num_batches_tracked) == 9 * steps  # node 0 and 8 nodes, every step
    assert model.alpha.shape == (36, 5) and model.alpha.abs().max() < 0.01
    assert all(p is not model.alpha for p in model.weight_parameters())
    assert model.decoder.weight is model.encoder.weight


def test_search_cell_output_is_the_mean_of_the_normalised_nodes():
    torch.manual_seed(1)
    cell = SearchCell(3, 3, 0.25, 0.75).eval()
    x, h = torch.randn(5, 3), torch.randn(5, 3)
    p = torch.randn(36, 5).softmax(-1)
    states = [cell.bn(cell.node0(x, h, None, None))]
    for n in range(1, 9):
        s = torch.stack(states)
        states.append(cell.bn(darts_node(s, s @ cell.Ws[n - 1], p[row(n, 0) : row(n, n)])))
    torch.testing.assert_close(cell.step(x, h, None, None, p), torch.stack(states[1:]).mean(0))


def test_eval_model_follows_the_genotype_without_batch_norm():
    torch.manual_seed(2)
    model = RecurrentEvalModel(30, DARTS_V2, 6, 6).eval()
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in model.modules())
    cell = model.cell
    x, h = torch.randn(4, 6), torch.randn(4, 6)
    s = [cell.node0(x, h, None, None)]
    funcs = {"tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid, "identity": lambda v: v}
    for (op, pred), W in zip(DARTS_V2.recurrent, cell.Ws):
        c, hh = (s[pred] @ W).chunk(2, -1)
        s.append(s[pred] + torch.sigmoid(c) * (funcs[op](hh) - s[pred]))
    torch.testing.assert_close(cell.step(x, h, None, None), torch.stack(s[1:]).mean(0))


def test_parameter_counts_are_darts_at_ptb_size():
    assert RecurrentSearchModel(10000).parameter_count() == 4_810_000
    assert RecurrentEvalModel(10000, DARTS_V2).parameter_count() == 22_960_000  # the paper's "23 M"


# ---------------------------------------------------------------------------------------------------------------
# Genotype


def test_builtin_genotypes_print_and_parse_in_darts_format():
    assert str(DARTS_V1) == DARTS_V1_TEXT and str(DARTS_V2) == DARTS_V2_TEXT
    for genotype in (DARTS_V1, DARTS_V2):
        assert RecurrentGenotype.parse(str(genotype)) == genotype
        assert RecurrentGenotype.from_dict(json.loads(json.dumps(genotype.to_dict()))) == genotype
    assert load_recurrent_genotype("DARTS") == DARTS_V2
    odd = RecurrentGenotype((("tanh", 0), ("relu", 0)), (0, 2))
    assert RecurrentGenotype.parse(str(odd)) == odd


def test_genotype_files_and_run_directories(tmp_path):
    (tmp_path / "g.txt").write_text(DARTS_V1_TEXT + "\n")
    assert load_recurrent_genotype(tmp_path / "g.txt") == DARTS_V1
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "genotype.json").write_text(json.dumps(DARTS_V2.to_dict()))
    assert load_recurrent_genotype(tmp_path / "run") == DARTS_V2


@pytest.mark.parametrize("text,message", [
    ("Genotype(recurrent=[('conv', 0)], concat=[1])", "unknown op 'conv'"),
    ("Genotype(recurrent=[('tanh', 1)], concat=[1])", "node 1 reads node 1"),
    ("Genotype(recurrent=[('tanh', 0)], concat=[2])", "concat must name nodes among 0..1"),
    ("Genotype(recurrent=[], concat=[1])", "no node"),
    ("Genotype(recurrent=[('tanh', 0)])", "exactly the fields"),
    ("Genotype(recurrent=[('tanh', 0)], concat=[1]", "is not a Genotype"),
    ("nonsense", "is not a built-in recurrent genotype"),
])  # fmt: skip
def test_malformed_genotypes_are_named(text, message):
    with pytest.raises(GenotypeError, match=message):
        load_recurrent_genotype(text)


def test_genotype_rule_on_hand_set_probabilities_with_ties():
    p = torch.zeros(36, 5)
    p[:, 0] = 1.0  # none is ignored, however strong
    p[row(1, 0)] = torch.tensor([0.9, 0.02, 0.01, 0.05, 0.02])  # node 1: sigmoid from 0
    p[row(2, 0), 1] = p[row(2, 1), 4] = 0.3  # node 2: a tie between predecessors -> the lower, 0 (tanh)
    p[row(3, 2), 2] = p[row(3, 2), 3] = 0.4  # node 3: a tie between ops -> the lower column, relu
    p[row(4, 3), 4] = 0.2  # node 4: identity from 3, weaker than none but strongest of the rest
    for n in range(5, 9):
        p[row(n, n - 1), 1] = 0.1
    p[row(8, 5), 3] = 0.11  # node 8: predecessors compared across rows, on probabilities
    genotype = derive_recurrent(p)
    assert genotype.recurrent == (("sigmoid", 0), ("tanh", 0), ("relu", 2), ("identity", 3), ("tanh", 4),
                                  ("tanh", 5), ("tanh", 6), ("sigmoid", 5))  # fmt: skip
    assert genotype.concat == tuple(range(1, 9))


def test_search_model_genotype_uses_the_softmax_not_the_logits():
    model = RecurrentSearchModel(20, 4, 4)
    with torch.no_grad():
        model.alpha.zero_()
        # Node 1 has one predecessor. Node 2: row (2,0) has the larger logit, row (2,1) the larger probability.
        model.alpha[row(2, 0)] = torch.tensor([5.0, 3.0, 0.0, 0.0, 0.0])
        model.alpha[row(2, 1)] = torch.tensor([0.0, 0.0, 2.0, 0.0, 0.0])
    assert model.genotype().recurrent[1] == ("relu", 1)


# ---------------------------------------------------------------------------------------------------------------
# Search runs


def settings(data, **more):
    return dict(data=str(data), emsize=8, nhid=8, batch_size=16, bptt=10, eval_batch_size=10, progress=False,
                **more)  # fmt: skip


@pytest.mark.slow
def test_short_search_lowers_validation_perplexity(tmp_path):
    data = small_corpus(tmp_path / "data", lines=(150, 30, 30))
    result = rnn_search.run(**settings(data, epochs=2, out=str(tmp_path / "run")))
    ppl = [r["val_ppl"] for r in result.history]
    vocabulary = len(load_corpus(data).dictionary)
    assert ppl[-1] < ppl[0] < vocabulary  # below the uniform model's, and falling
    assert (tmp_path / "run" / "genotype.txt").read_text().strip() == str(result.genotype)
    assert RecurrentGenotype.from_dict(json.loads((tmp_path / "run" / "genotype.json").read_text())) == result.genotype
    assert (tmp_path / "run" / "curves.png").exists() and (tmp_path / "run" / "weights_recurrent.png").exists()


@pytest.mark.slow
@pytest.mark.parametrize("unrolled", [False, True])
def test_search_interrupted_mid_epoch_resumes_bit_exact(tmp_path, monkeypatch, unrolled):
    data = small_corpus(tmp_path / "data", lines=(60, 30, 30))
    config = settings(data, epochs=2, unrolled=unrolled)
    whole = rnn_search.run(**config, out=str(tmp_path / "whole"))
    task = rnn_search.RecurrentSearchTask
    original_step, original_begin, steps_in_epoch = task.step, task.begin_epoch, {}

    def begin_epoch(self, epoch):
        steps_in_epoch.update(epoch=epoch, steps=0)
        return original_begin(self, epoch)

    def step_then_signal(self, inputs):
        steps_in_epoch["steps"] += 1
        if steps_in_epoch == {"epoch": 1, "steps": 3}:  # mid-epoch: the carried hidden states must be restored
            os.kill(os.getpid(), signal.SIGTERM)
        return original_step(self, inputs)

    monkeypatch.setattr(task, "begin_epoch", begin_epoch)
    monkeypatch.setattr(task, "step", step_then_signal)
    with pytest.raises(RunInterrupted, match="stopped by SIGTERM at epoch 1 step 3 "):
        rnn_search.run(**config, out=str(tmp_path / "cut"))
    monkeypatch.setattr(task, "step", original_step)
    resumed = rnn_search.run(resume=tmp_path / "cut", progress=False)
    assert_same_end(whole.run_dir, resumed.run_dir)
    assert resumed.genotype == whole.genotype


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"emsize \(16\) must equal nhid \(8\)"):
        rnn_search.RecurrentSearchConfig(emsize=16, nhid=8).resolved()
    with pytest.raises(DataError, match="does not exist"):
        rnn_search.run(data=str(tmp_path / "nowhere"), out=str(tmp_path / "r"))
    for run in (rnn_search.run, rnn_train.run):  # refused before anything is built or written
        with pytest.raises(ConfigError, match=r"nhid 200000 and emsize 200000 make a network of [\d,]+ weights"):
            run(emsize=200000, nhid=200000, out=str(tmp_path / "big"))
        assert not (tmp_path / "big").exists()


def test_the_bundled_corpus_searches_at_lr_5_and_ptb_at_darts_lr_20(tmp_path):
    # At 20 with batch 32 the bundled corpus's training-mode loss climbs above a uniform prediction's (README).
    bundled, penn = rnn_search.RecurrentSearchConfig().resolved(), rnn_search.RecurrentSearchConfig(data=str(tmp_path))
    assert (bundled.lr, bundled.batch_size) == (5.0, 32)
    assert (penn.resolved().lr, penn.resolved().batch_size) == (20.0, 256)
    assert rnn_search.RecurrentSearchConfig(lr=7.0).resolved().lr == 7.0
    assert rnn_train.RecurrentTrainConfig().resolved().lr == 20.0  # the evaluation training keeps DARTS's lr
    with pytest.raises(ConfigError, match="lr"):
        rnn_search.RecurrentSearchConfig(lr=0.0).resolved()


@pytest.mark.parametrize("args,message", [
    (["--space", "lstm"], "space must be one of cnn, rnn, got 'lstm'"),
    (["--space", "rnn", "--data", "/nonexistent/penn"], "data /nonexistent/penn does not exist"),
    (["--space", "rnn", "--method", "pr-darts"], "invalid choice"),
])  # fmt: skip
def test_cli_bad_input_is_one_line_and_status_2(tmp_path, args, message):
    proc = subprocess.run([sys.executable, "-m", "fastdarts.search", *args, "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_uniform_model_perplexity_is_about_the_vocabulary():
    from fastdarts.rnn.loop import evaluate

    torch.manual_seed(0)
    model = RecurrentEvalModel(100, DARTS_V2, 8, 8)
    loss = evaluate(model, batchify(torch.randint(0, 100, (400,)), 4), 35)
    assert abs(math.exp(loss) - 100) < 5  # weights of U(-0.04, 0.04): nearly uniform predictions


# ---------------------------------------------------------------------------------------------------------------
# The fused node and the fused decoder loss against DARTS's eager computation


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=requires_ext)])
@pytest.mark.parametrize("training", [True, False])
def test_fused_search_model_equals_darts_eager_model(backend, training):
    torch.manual_seed(3)
    fused = RecurrentSearchModel(40, 6, 6, dropoute=0.1).double().train(training)
    eager = RecurrentSearchModel(40, 6, 6, dropoute=0.1, fused=False).double().train(training)
    eager.load_state_dict(fused.state_dict())
    x, y = torch.randint(0, 40, (5, 3)), torch.randint(0, 40, (15,))
    results = []
    for model in (fused, eager):
        torch.manual_seed(4)  # the same dropout masks
        with ops.use_backend(backend):
            out = model(x, model.init_hidden(3), y)
            loss = out.loss + out.raw.square().mean()
            grads = torch.autograd.grad(loss, list(model.parameters()))
        results.append((out.loss, out.hidden, grads, model.cell.bn.running_mean.clone(), model.cell.bn.running_var))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
    # an alpha-only pass (frozen weights, as in the architecture step) gives the same alpha gradient
    grads = []
    for model in (fused, eager):
        torch.manual_seed(4)
        with frozen(model.weight_parameters()), ops.use_backend(backend):
            grads.append(torch.autograd.grad(model(x, model.init_hidden(3), y).loss, [model.alpha])[0])
    torch.testing.assert_close(grads[0], grads[1])


def test_decoder_loss_equals_cross_entropy_of_the_logits(monkeypatch):
    monkeypatch.setattr(decoder, "ROWS_PER_BLOCK", 7)  # several blocks and a short last one
    x = torch.randn(30, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (30,))
    loss, correct = decoder.linear_cross_entropy(x, weight, bias, targets)
    logits = torch.nn.functional.linear(x, weight, bias)
    expected = torch.nn.functional.cross_entropy(logits, targets)
    torch.testing.assert_close(loss, expected)
    assert int(correct) == int((logits.argmax(1) == targets).sum())
    for a, b in zip(torch.autograd.grad(loss, (x, weight, bias)), torch.autograd.grad(expected, (x, weight, bias))):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda *a: decoder.linear_cross_entropy(*a, targets)[0], (x, weight, bias))
    assert torch.autograd.gradgradcheck(lambda *a: decoder.linear_cross_entropy(*a, targets)[0], (x, weight, bias))


def test_the_space_is_read_from_the_command_line_or_the_resumed_run(tmp_path):
    assert requested_space(["--space=rnn", "--epochs", "1"]) == ("rnn", ["--epochs", "1"])
    assert requested_space(["--epochs", "1", "--space", "cnn"]) == ("cnn", ["--epochs", "1"])
    assert requested_space(["--epochs", "1"]) == ("cnn", ["--epochs", "1"])
    (tmp_path / "config.json").write_text(json.dumps({"space": "rnn"}))
    assert requested_space(["--resume", str(tmp_path)])[0] == "rnn"
    assert requested_space(["--resume", str(tmp_path / "nowhere")])[0] == "cnn"  # the resume names the problem
    with pytest.raises(ConfigError, match="space must be one of cnn, rnn, got ''"):
        requested_space(["--space"])


@pytest.mark.parametrize("masks", ["shared", "fresh"])
def test_hessian_vector_product_with_shared_masks_is_the_exact_one(masks):
    torch.manual_seed(5)
    model = RecurrentSearchModel(20, 5, 5, fused=False).double()
    config = rnn_search.RecurrentSearchConfig(emsize=5, nhid=5, hvp_masks=masks, hessian_r=1e-4)
    architect = rnn_search.RecurrentArchitect(model, config)
    x, y, hidden = torch.randint(0, 20, (4, 3)), torch.randint(0, 20, (12,)), model.init_hidden(3)
    names, weights = zip(*model.named_weight_parameters())
    v = [torch.randn_like(w) for w in weights]
    state = torch.get_rng_state()
    got = architect.hessian_vector_product((x, y), hidden, names, weights, v)
    # exact: the derivative of grad_alpha L_train along v, with the masks of the first pass
    torch.set_rng_state(state)
    loss = model(x, hidden, y).loss
    grad_w = torch.autograd.grad(loss, weights, create_graph=True)
    exact = torch.autograd.grad(sum((g * t).sum() for g, t in zip(grad_w, v)), [model.alpha])
    close = all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(got, exact))
    assert close == (masks == "shared")  # fresh masks: the difference of two dropout draws, not a derivative


def test_the_second_order_step_clips_v_to_the_clip_norm():
    """RNN.md: v = grad_w' L_val(w') is clipped to a norm of at most `clip` before the Hessian-vector product."""
    torch.manual_seed(5)
    model = RecurrentSearchModel(20, 5, 5, fused=False).double()
    config = rnn_search.RecurrentSearchConfig(emsize=5, nhid=5, clip=1e-3, unrolled=True)
    architect = rnn_search.RecurrentArchitect(model, config)
    batch = torch.randint(0, 20, (4, 3)), torch.randint(0, 20, (12,))
    seen = []

    def hessian_vector_product(train, hidden, names, weights, v):
        seen.append(torch.nn.utils.get_total_norm(v))
        return [torch.zeros_like(a) for a in model.arch_parameters()]

    architect.hessian_vector_product = hessian_vector_product
    architect.second_order_grads(batch, batch, model.init_hidden(3), model.init_hidden(3), lr=1.0)
    torch.testing.assert_close(seen[0], torch.tensor(1e-3, dtype=torch.float64), rtol=1e-3, atol=0)


def test_a_corpus_too_small_for_the_batch_is_named(tmp_path):
    data = small_corpus(tmp_path / "data", lines=(60, 5, 30))
    with pytest.raises(DataError, match=r"the valid split \(\d+ tokens\) makes fewer than 2 rows at batch size 256"):
        rnn_search.run(data=str(data), batch_size=256, out=str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()  # refused before anything is written


@pytest.mark.skipif("FASTDARTS_PTB" not in os.environ, reason="set FASTDARTS_PTB to a Penn Treebank directory")
def test_penn_treebank_has_its_published_sizes():
    corpus = load_corpus(os.environ["FASTDARTS_PTB"])  # data/penn or simple-examples/data
    assert (len(corpus.train), len(corpus.valid), len(corpus.test)) == (929_589, 73_760, 82_430)
    assert len(corpus.dictionary) == 10_000
    assert RecurrentEvalModel(len(corpus.dictionary), DARTS_V2).parameter_count() == 22_960_000
