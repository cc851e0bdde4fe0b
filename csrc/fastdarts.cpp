// Every fastdarts op schema, in one place. Kernels register against these names from
// cpu/<op>.cpp (TORCH_LIBRARY_IMPL); fakes and autograd formulas live in fastdarts/ops/_cpp.py.

#include <Python.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "fastdarts/cpu_isa.h"

namespace {

// Sets a ValueError with the error's one-line message; returns nullptr for the caller to return.
PyObject* value_error(const c10::Error& error) {
  PyErr_SetString(PyExc_ValueError, error.what_without_backtrace());
  return nullptr;
}

// The instruction-set tier of the CPU kernels (include/fastdarts/cpu_isa.h), for fastdarts.ops: errors become a
// ValueError with their one-line message.
PyObject* cpu_isa(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(fastdarts::cpu_isa_name(fastdarts::cpu_isa()));
  } catch (const c10::Error& error) {
    return value_error(error);
  }
}

PyObject* best_cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(fastdarts::cpu_isa_name(fastdarts::best_cpu_isa()));
}

PyObject* set_cpu_isa(PyObject*, PyObject* name) {
  const char* text = PyUnicode_AsUTF8(name);
  if (text == nullptr) {
    return nullptr;  // not a str: PyUnicode_AsUTF8 set a TypeError
  }
  try {
    fastdarts::set_cpu_isa(text);
  } catch (const c10::Error& error) {
    return value_error(error);
  }
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "The instruction-set tier the CPU kernels run: baseline, avx2 or avx512."},
    {"best_cpu_isa", best_cpu_isa, METH_NOARGS, "The best tier this CPU supports."},
    {"set_cpu_isa", set_cpu_isa, METH_O, "Make a tier the one in force (ValueError if unknown or unsupported)."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
// `import fastdarts._C` loads this shared library: its static initialisers (TORCH_LIBRARY and TORCH_LIBRARY_IMPL)
// register the ops with the dispatcher; the module itself holds the tier functions above.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "Compiled fastdarts kernels; the ops are under torch.ops.fastdarts.", -1, methods,
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastdarts, m) {
  // out = sum_k w[k] * xs[k]: the DARTS mixed-op sum. xs: K tensors of one shape, w: [K].
  m.def("weighted_sum(Tensor[] xs, Tensor w) -> Tensor");
  // grad_xs[k] = w[k] * grad, grad_w[k] = sum(grad * xs[k]), in one pass over grad.
  m.def("weighted_sum_backward(Tensor grad, Tensor[] xs, Tensor w) -> (Tensor[], Tensor)");
  // out = sum_k w[k] * (ts[k] - mean[k, c]) * invstd[k, c], per channel c: the mixed-op sum of K affine-free BNs,
  // without writing the K normalised tensors. ts: K tensors [N, C, H, W] of one shape; w: [K]; mean, invstd: [K, C]
  // (mean 0 and invstd 1: a term added un-normalised, the skip connection). out is laid out like ts[0].
  m.def("bn_weighted_sum(Tensor[] ts, Tensor w, Tensor mean, Tensor invstd) -> Tensor");
  // The gradient of bn_weighted_sum when mean[k] and invstd[k] are, for the rows with batch_statistics[k], the
  // batch statistics of ts[k] (biased variance, invstd = rsqrt(var + eps)): the gradient flows through them too,
  // as in native_batch_norm_backward in training, times w[k]; the other rows are fixed (skip connection, eval).
  // grad_ts (laid out like ts[0]) if input_grad, else an empty list; grad_w if w_grad, else None. Not
  // differentiable: the autograd of bn_weighted_sum takes mean and invstd as plain inputs and calls it with every
  // flag false.
  m.def(
      "bn_weighted_sum_backward(Tensor grad, Tensor[] ts, Tensor w, Tensor mean, Tensor invstd, "
      "bool[] batch_statistics, bool input_grad, bool w_grad) -> (Tensor[], Tensor?)");
  // bn_weighted_sum_backward for a caller that forms some rows' gradients itself as it reads them (the conv
  // candidates', inside relu_dwconv_pointwise_backward): grad_ts only for the rows with written[k] (in row order),
  // and for every row the factors [K, 4, C] (a, b, mean, e) of grad_t_k = a grad + b (t_k - mean) + e, with
  // b = e = 0 on fixed rows; grad_w if w_grad, else None.
  m.def(
      "bn_weighted_sum_backward_factors(Tensor grad, Tensor[] ts, Tensor w, Tensor mean, Tensor invstd, "
      "bool[] batch_statistics, bool[] written, bool w_grad) -> (Tensor[] grad_ts, Tensor factors, Tensor? grad_w)");
  // out[i] = depthwise conv of relu(x) (x when relu is false) with weights[i]: dilation dilations[i], the one stride,
  // "same" padding dilations[i] * (k_i - 1) / 2. x: [N, C, H, W]; weights[i]: [C, 1, k_i, k_i], k_i odd;
  // out[i]: [N, C, (H - 1) / stride + 1, (W - 1) / stride + 1], laid out like x. The first stage of DARTS's sep and
  // dil conv candidates, all K from one read of x. No default for relu: the dispatcher drops arguments equal to
  // their default, and register_autograd's backward must then return one gradient fewer.
  m.def("relu_dwconv(Tensor x, Tensor[] weights, int[] dilations, int stride, bool relu) -> Tensor[]");
  // One pass over x (relu(x) recomputed, never saved) and the K output gradients: grad_x (masked by x > 0 when
  // relu) if input_grad, else None; every grad_weights[i] if weight_grad, else an empty list.
  m.def(
      "relu_dwconv_backward(Tensor[] grads, Tensor x, Tensor[] weights, int[] dilations, int stride, bool relu, "
      "bool input_grad, bool weight_grad) -> (Tensor?, Tensor[])");
  // relu_dwconv with each output i going straight through a 1x1 conv: out[i] = conv2d(relu_dwconv(...)[i],
  // pointwise_weights[i]) with pointwise_weights[i]: [C, C, 1, 1], laid out like x; mean, var: [K, C], the
  // per-channel mean and biased variance of each out[i] over (N, H_out, W_out) (no gradient: a following BN's
  // batch statistics). The depthwise outputs are never written: a DARTS sep or dil conv up to its BN.
  // With input_mean and input_invstd ([1, C] each) the convs read x normalised first, (x - input_mean) input_invstd
  // (a sep conv's middle BN, applied as the input is read instead of written out by itself).
  m.def(
      "relu_dwconv_pointwise(Tensor x, Tensor[] weights, Tensor[] pointwise_weights, int[] dilations, int stride, "
      "bool relu, Tensor? input_mean=None, Tensor? input_invstd=None) -> (Tensor[] outs, Tensor mean, Tensor var)");
  // One pass over x and the K output gradients, the depthwise outputs recomputed in tiles: grad_x (masked by x > 0
  // when relu) if input_grad, else None; the depthwise and the 1x1 weights' gradients if weight_grad, else empty.
  // With input_mean and input_invstd, grad_x is the gradient with respect to the normalised x u (masked by where it
  // is > 0): the normalisation's own backward, which depends on how its statistics were made, follows it, and
  // input_sums [2, C] (with input_grad, else None) gives it the per-channel sums over (N, H, W) of grad_x and of
  // grad_x u, made while both are in cache. With grad_inputs (one per grad, shaped like it) and grad_factors
  // [K, 4, C], the gradient of out[i] is a grads[i] + b (grad_inputs[i] - mean) + e with (a, b, mean, e) =
  // grad_factors[i] per channel: a BN's backward (bn_weighted_sum_backward_factors') formed as each row is read,
  // never written out.
  m.def(
      "relu_dwconv_pointwise_backward(Tensor[] grads, Tensor x, Tensor[] weights, Tensor[] pointwise_weights, "
      "int[] dilations, int stride, bool relu, bool input_grad, bool weight_grad, Tensor? input_mean=None, "
      "Tensor? input_invstd=None, Tensor[]? grad_inputs=None, Tensor? grad_factors=None) -> "
      "(Tensor?, Tensor[], Tensor[], Tensor? input_sums)");
  // PR-DARTS's hard-concrete gates and top-k mask from given noise: reference.gates_from_noise, with the same
  // arguments. beta, u: [E, K]; explore: bool [E, K] and perm: int64 [K] when k is set, ignored (may be None)
  // when it is not. Outputs [E, K]: gates (exactly the 0/1 mask with k, g without), mask, p_nonzero = P(g != 0),
  // and s_kept (the sigmoid s on kept, unclamped gates, else 0: what autograd differentiates through).
  m.def(
      "sample_gates(Tensor beta, float tau, float a, float b, int? k, Tensor u, Tensor? explore, Tensor? perm) -> "
      "(Tensor gates, Tensor mask, Tensor p_nonzero, Tensor s_kept)");
  // DARTS's two pool candidates and their BN statistics from one read of x [N, C, H, W]: max_out =
  // max_pool2d(x, 3, stride, 1) and avg_out = avg_pool2d(x, 3, stride, 1, count_include_pad=False), laid out like x;
  // mean, var [2, C]: the per-channel mean and biased variance of each over (N, H_out, W_out), row 0 for max_out and
  // row 1 for avg_out (no gradient). stride: 1 or 2.
  m.def("pool_bn_stats(Tensor x, int stride) -> (Tensor max_out, Tensor avg_out, Tensor mean, Tensor var)");
  // grad_x of both pools, the max's argmax recomputed from x (ATen's: the first maximum in scan order, or a NaN);
  // a None gradient contributes nothing.
  m.def("pool_bn_stats_backward(Tensor? grad_max, Tensor? grad_avg, Tensor x, int stride) -> Tensor");
  // DARTS's FactorizedReduce before its BN, for E = len(conv_1s) pairs of weights from one read of x = cat(xs, 1)
  // [N, C, H, W] (xs: one or more [N, C_i, H, W], read where they are, as relu_pointwise_bn_stats reads them):
  // outs[e] = cat(conv_1s[e] r at the even pixels (2i, 2j), conv_2s[e] r at the odd ones (2i + 1, 2j + 1), zero where
  // those fall outside x) along the channels, r = relu(x) (x when relu is false); conv_1s[e], conv_2s[e]:
  // [h, C, 1, 1]; outs[e]: [N, 2h, (H + 1) / 2, (W + 1) / 2], laid out like x; mean, var [E, 2h]: the per-channel
  // mean and biased variance of each over (N, H_out, W_out) (no gradient: its BN's batch statistics). The skip
  // candidates of all the stride-2 edges leaving one state, and a cell's preprocessing after a reduction cell.
  m.def(
      "factorized_reduce_bn_stats(Tensor[] xs, Tensor[] conv_1s, Tensor[] conv_2s, bool relu) -> (Tensor[] outs, "
      "Tensor mean, Tensor var)");
  // One pass over x (r recomputed, never saved) and the E output gradients: grad_xs, the gradient of each of xs (the
  // sum over the outputs, masked by x > 0 when relu), if input_grad, else empty; the gradients of conv_1s and conv_2s
  // if weight_grad, else empty.
  m.def(
      "factorized_reduce_bn_stats_backward(Tensor[] grads, Tensor[] xs, Tensor[] conv_1s, Tensor[] conv_2s, "
      "bool relu, bool input_grad, bool weight_grad, Tensor[]? grad_inputs=None, Tensor? grad_factors=None) -> "
      "(Tensor[], Tensor[], Tensor[])");
  // PC-DARTS's partial channels around the ops of E = len(outs) edges leaving x [N, C, H, W], K = partial_channels
  // groups of m = C / K channels: each edge's full-width output [N, C, Ho, Wo], laid out channels_last, with
  // outs[e] ([N, m, Ho, Wo]) in channels c K and the bypass (x's other channels, 2x2-max-pooled rounding up when
  // stride is 2), times bypass_w[e] when given, in channels c K + g (reference.partial_channel_edge).
  m.def(
      "partial_channel_outputs(Tensor[] outs, Tensor x, int partial_channels, int stride, Tensor? bypass_w) -> "
      "Tensor[]");
  // A node of a partial-channel cell: the sum, in edge order, of E = len(outs) edges' outputs as
  // partial_channel_outputs gives them at stride 1, edge e's from its ops' output outs[e] [N, C/K, Ho, Wo] and the
  // bypass of its state xs[e] [N, C, Ho, Wo], or xs[e] that bypass alone [N, C - C/K, Ho, Wo] (a stride-2 state's,
  // pooled), times bypass_w[e] when given; [N, C, Ho, Wo], channels_last.
  m.def("partial_channel_node(Tensor[] outs, Tensor[] xs, int partial_channels, Tensor? bypass_w) -> Tensor");
  // From the E edges' output gradients (None: not in the loss): the ops' gradients (one per given gradient, in
  // order), dL/dx of the bypass if x_grad (zero in the ops' m channels; the pool's argmax recomputed from x) and
  // dL/dbypass_w [E] if bypass_w_grad, else None. With grad_x_base (x's shape; needs x_grad), grad_x is
  // grad_x_base + that dL/dx: x's gradient from its other readers, added as the bypass's is written.
  m.def(
      "partial_channel_outputs_backward(Tensor?[] grads, Tensor x, int partial_channels, int stride, "
      "Tensor? bypass_w, bool x_grad, bool bypass_w_grad, Tensor? grad_x_base=None) -> (Tensor[] ops_grads, "
      "Tensor? grad_x, Tensor? grad_bypass_w)");
  // A ReLU and 1x1 conv before a BN, for E = len(weights) weights from one read of x = cat(xs, 1) [N, C, H, W] (xs:
  // one or more [N, C_i, H, W], read where they are): outs[e] = conv2d(r, weights[e]), r = relu(x) (x when relu is
  // false); weights[e]: [C_out, C, 1, 1]; outs[e]: [N, C_out, H, W], laid out like xs[0]; mean, var [E, C_out]: each
  // output's per-channel mean and biased variance over (N, H, W) (no gradient). A cell's preprocessing up to its BN,
  // xs the nodes of the cell before.
  m.def(
      "relu_pointwise_bn_stats(Tensor[] xs, Tensor[] weights, bool relu) -> (Tensor[] outs, Tensor mean, "
      "Tensor var)");
  // One pass over x and the E output gradients: grad_xs, the gradient of each of xs (the sum over the outputs, masked
  // by x > 0 when relu), if input_grad, else empty; the weights' gradients if weight_grad, else empty. With
  // grad_inputs and grad_factors, the output gradients are formed as they are read, as relu_dwconv_pointwise_backward
  // forms them (both ops).
  m.def(
      "relu_pointwise_bn_stats_backward(Tensor[] grads, Tensor[] xs, Tensor[] weights, bool relu, bool input_grad, "
      "bool weight_grad, Tensor[]? grad_inputs=None, Tensor? grad_factors=None) -> (Tensor[], Tensor[])");
  // The E = w.shape[0] DARTS edges leaving x, computed from the kernels above with no Python between them: the
  // arguments and results of fastdarts/ops/_mixed_op.py's group (the ops' part of mixed_ops, without partial
  // channels), which fastdarts.ops.mixed_ops wraps. weights: each edge's in turn (mixed_op_layout order), candidates:
  // counts[e] for edge e. Returns each edge's output, the statistics [E, B, C] (recorded in training, else copies of
  // bn_mean and bn_var, which evaluation needs) and, with keep, the tensors edge_group_backward then reads instead
  // of recomputing them.
  m.def(
      "edge_group(Tensor x, Tensor w, Tensor[] weights, int stride, int[] candidates, int[] counts, Tensor? bn_mean, "
      "Tensor? bn_var, bool training, float eps, bool pool_bn, bool keep) -> (Tensor[] outs, Tensor mean, "
      "Tensor var, Tensor[] saved)");
  // Its backward from the statistics the forward gave (and its saved tensors, or a recomputation when empty):
  // grad_x if x_grad, grad_w [E, K] if w_grad, every conv weight's gradient if weights_grad (zeros for candidates
  // not computed, [] otherwise). grads[e] None: edge e's output took no part in the loss.
  m.def(
      "edge_group_backward(Tensor?[] grads, Tensor x, Tensor w, Tensor[] weights, int stride, int[] candidates, "
      "int[] counts, Tensor mean, Tensor var, bool training, float eps, bool pool_bn, Tensor[] saved, bool x_grad, "
      "bool w_grad, bool weights_grad) -> (Tensor? grad_x, Tensor? grad_w, Tensor[] grad_weights)");
  // A DARTS cell of `steps` nodes from its preprocessed inputs s0 and s1, its groups of edge_group run one after the
  // other with no Python between them (fastdarts/ops/_mixed_op.py's edge_cell, which fastdarts.ops.mixed_cell wraps):
  // node i sums its incoming edges' outputs in input order, once complete. w: [E, K] for the E = steps (steps + 3) / 2
  // edges (node-major, input-minor); weights: each edge's in turn, at its stride (`stride` for the inputs' edges, 1
  // for the nodes'); candidates: counts[e] for edge e, 0 leaving it out; with partial_channels K > 1 each group runs
  // on its state's first C/K channels and partial_channel_outputs writes its outputs (bypass_w [E] or None). Returns
  // the nodes, the groups' statistics one after the other as [R, C/K] (bn_mean and bn_var, in evaluation, the same),
  // and with keep the groups' saved.
  m.def(
      "edge_cell(Tensor s0, Tensor s1, Tensor w, Tensor[] weights, int steps, int stride, int[] candidates, "
      "int[] counts, Tensor? bn_mean, Tensor? bn_var, bool training, float eps, bool pool_bn, bool keep, "
      "int partial_channels=1, Tensor? bypass_w=None) -> (Tensor[] nodes, Tensor mean, Tensor var, Tensor[] saved)");
  // Its backward, the groups in reverse, each node's gradient (grads[i], None when not in the loss, plus what its
  // edges send back) complete before its group runs: grad_s0 if s0_grad and grad_s1 if s1_grad (zeros when no edge
  // leaving it reaches the loss), grad_w [E, K] if w_grad, grad_bypass_w [E] if bypass_w_grad, every conv weight's
  // gradient if weights_grad (zeros for candidates not computed, [] otherwise).
  m.def(
      "edge_cell_backward(Tensor?[] grads, Tensor s0, Tensor s1, Tensor[] nodes, Tensor w, Tensor[] weights, "
      "int steps, int stride, int[] candidates, int[] counts, Tensor mean, Tensor var, bool training, float eps, "
      "bool pool_bn, Tensor[] saved, bool s0_grad, bool s1_grad, bool w_grad, bool weights_grad, "
      "int partial_channels=1, Tensor? bypass_w=None, bool bypass_w_grad=False) -> (Tensor? grad_s0, "
      "Tensor? grad_s1, Tensor? grad_w, Tensor? grad_bypass_w, Tensor[] grad_weights)");
  // DARTS's recurrent mixed op for one node after its matmul (fastdarts.ops.rnn_mixed_node): x [B, H] =
  // sum_j P_j (1 - sigmoid(c_j)) s_j + sigmoid(c_j) g_j with g_j = sum_k p[j, k] f_k(h_j) over tanh, relu, sigmoid,
  // identity and P_j their total. states: [n, B, H]; ch: [n, B, 2H], c_j = ch[j, :, :H], h_j = ch[j, :, H:];
  // p: [n, 5], columns none, tanh, relu, sigmoid, identity (none adds nothing).
  m.def("rnn_mixed_node(Tensor states, Tensor ch, Tensor p) -> Tensor");
  // grad_states, grad_ch, grad_p (column 0 zero), the activations recomputed from ch.
  m.def("rnn_mixed_node_backward(Tensor grad, Tensor states, Tensor ch, Tensor p) -> (Tensor, Tensor, Tensor)");
}
