#!/usr/bin/env python3
"""NumPy reference forward pass (float64) for quartermaster models, used by the tests.

    python3 tools/reference_numpy.py MODEL.safetensors INPUT.f32 OUTPUT.f32 BATCH

INPUT is raw little-endian float32, OUTPUT raw little-endian float64. Input is sample-major, then time step, then feature.
"""

import math
import sys

import numpy as np

from export_safetensors import read_safetensors

_erf = np.vectorize(math.erf)


def activate(name, x):
    if name == "none":
        return x
    if name == "relu":
        return np.maximum(x, 0.0)
    if name == "tanh":
        return np.tanh(x)
    if name == "sigmoid":
        return 1.0 / (1.0 + np.exp(-x))
    if name == "gelu":
        return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))
    raise ValueError(name)


def dense_stack(t, meta, x):
    n = 0
    while f"dense.{n}.weight" in t:
        n += 1
    acts = meta["activations"].split(",") if "activations" in meta else ["relu"] * (n - 1) + ["none"]
    for i in range(n):
        x = x @ t[f"dense.{i}.weight"].T
        if f"dense.{i}.bias" in t:
            x = x + t[f"dense.{i}.bias"]
        x = activate(acts[i].strip(), x)
    return x


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def forward(t, meta, x, batch):
    if meta["arch"] == "mlp":
        return dense_stack(t, meta, x.reshape(batch, -1))
    steps = int(meta["sequence_length"])
    seq = x.reshape(batch, steps, -1)
    k = 0
    while f"weight_ih_l{k}" in t:
        w_ih, w_hh = t[f"weight_ih_l{k}"], t[f"weight_hh_l{k}"]
        bias = t.get(f"bias_ih_l{k}", 0.0) + t.get(f"bias_hh_l{k}", 0.0)
        hidden = w_hh.shape[1]
        h = np.zeros((batch, hidden))
        c = np.zeros((batch, hidden))
        outs = []
        for s in range(steps):
            g = seq[:, s, :] @ w_ih.T + h @ w_hh.T + bias
            i, f, gg, o = (g[:, j * hidden : (j + 1) * hidden] for j in range(4))
            c = sigmoid(f) * c + sigmoid(i) * np.tanh(gg)
            h = sigmoid(o) * np.tanh(c)
            outs.append(h)
        seq = np.stack(outs, axis=1)
        k += 1
    return dense_stack(t, meta, h)


def main(argv):
    model, inp, out, batch = argv
    t, meta = read_safetensors(model)
    x = np.fromfile(inp, dtype="<f4").astype(np.float64)
    y = forward(t, meta, x, int(batch))
    # float64 results, so the test compares against the exact reference rather than a rounding of it.
    np.ascontiguousarray(y, dtype="<f8").tofile(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
