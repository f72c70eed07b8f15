#!/usr/bin/env python3
"""Write models in quartermaster's safetensors layout (see docs/model-format.md).

From PyTorch (torch is imported only when you call these):

    from export_safetensors import export_torch
    export_torch(torch.nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 1)), "mlp.safetensors")
    export_torch(MyForecaster(), "lstm.safetensors", sequence_length=30)   # has .lstm (nn.LSTM, batch_first) and .head

From NumPy (no torch needed; this is what the tests use):

    export_mlp([(W0, b0), (W1, b1)], ["relu", "none"], "mlp.safetensors")
    export_lstm([(W_ih, W_hh, b_ih, b_hh)], [(W, b)], ["none"], 30, "lstm.safetensors")

Weights use PyTorch layouts: Linear weight [out, in]; LSTM weight_ih_l{k} [4H, in], gates i, f, g, o.

Command line:
    python3 tools/export_safetensors.py samples models/         # the shipped sample models
    python3 tools/export_safetensors.py mlp OUT SEED DIMS ACTS  # e.g. mlp m.safetensors 7 64,256,256,1 relu,relu,none
    python3 tools/export_safetensors.py lstm OUT SEED INPUT HIDDEN LAYERS SEQ HEAD_DIMS ACTS
"""

import json
import struct
import sys

import numpy as np

ACTIVATIONS = ("none", "relu", "tanh", "sigmoid", "gelu")


def write_safetensors(path, tensors, metadata):
    """Writes `tensors` (name -> float32 array) with string `metadata`, data 8-byte aligned."""
    header = {"__metadata__": {k: str(v) for k, v in metadata.items()}}
    blobs, offset = [], 0
    for name, array in tensors.items():
        data = np.ascontiguousarray(array, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(np.shape(array)), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for blob in blobs:
            f.write(blob)


def read_safetensors(path):
    """Returns (tensors as float64 arrays, metadata). Reads F32, F16 and BF16."""
    with open(path, "rb") as f:
        buf = f.read()
    (n,) = struct.unpack("<Q", buf[:8])
    header = json.loads(buf[8 : 8 + n])
    meta = header.pop("__metadata__", {})
    data = buf[8 + n :]
    out = {}
    for name, info in header.items():
        a, b = info["data_offsets"]
        raw = data[a:b]
        if info["dtype"] == "F32":
            arr = np.frombuffer(raw, dtype="<f4")
        elif info["dtype"] == "F16":
            arr = np.frombuffer(raw, dtype="<f2")
        elif info["dtype"] == "BF16":
            arr = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            raise ValueError(f"unsupported dtype {info['dtype']}")
        out[name] = arr.astype(np.float64).reshape(info["shape"])
    return out, meta


def _check_acts(acts, n):
    if len(acts) != n or any(a not in ACTIVATIONS for a in acts):
        raise ValueError(f"need {n} activations from {ACTIVATIONS}, got {acts}")


def export_mlp(layers, activations, path):
    """`layers`: [(W [out, in], b [out] or None)], `activations`: one per layer."""
    _check_acts(activations, len(layers))
    tensors = {}
    for i, (w, b) in enumerate(layers):
        tensors[f"dense.{i}.weight"] = np.asarray(w, dtype=np.float32)
        if b is not None:
            tensors[f"dense.{i}.bias"] = np.asarray(b, dtype=np.float32)
    write_safetensors(path, tensors, {"arch": "mlp", "activations": ",".join(activations), "format_version": 1})


def export_lstm(lstm_layers, head, activations, sequence_length, path):
    """`lstm_layers`: [(W_ih [4H, in], W_hh [4H, H], b_ih [4H] or None, b_hh [4H] or None)];
    `head`: dense layers applied to the last hidden state, as for `export_mlp`."""
    _check_acts(activations, len(head))
    tensors = {}
    for k, (w_ih, w_hh, b_ih, b_hh) in enumerate(lstm_layers):
        tensors[f"weight_ih_l{k}"] = np.asarray(w_ih, dtype=np.float32)
        tensors[f"weight_hh_l{k}"] = np.asarray(w_hh, dtype=np.float32)
        if b_ih is not None:
            tensors[f"bias_ih_l{k}"] = np.asarray(b_ih, dtype=np.float32)
        if b_hh is not None:
            tensors[f"bias_hh_l{k}"] = np.asarray(b_hh, dtype=np.float32)
    for i, (w, b) in enumerate(head):
        tensors[f"dense.{i}.weight"] = np.asarray(w, dtype=np.float32)
        if b is not None:
            tensors[f"dense.{i}.bias"] = np.asarray(b, dtype=np.float32)
    meta = {"arch": "lstm", "sequence_length": int(sequence_length), "format_version": 1}
    if head:
        meta["activations"] = ",".join(activations)
    write_safetensors(path, tensors, meta)


def _torch_dense_stack(modules):
    """nn.Linear modules, each optionally followed by one activation module."""
    import torch.nn as nn

    kinds = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.GELU: "gelu", nn.Identity: "none"}
    layers, acts = [], []
    for m in modules:
        if isinstance(m, nn.Linear):
            w = m.weight.detach().cpu().float().numpy()
            b = None if m.bias is None else m.bias.detach().cpu().float().numpy()
            layers.append((w, b))
            acts.append("none")
        elif type(m) in kinds and layers:
            if isinstance(m, nn.GELU) and getattr(m, "approximate", "none") != "none":
                raise ValueError("only exact GELU (approximate='none') is supported")
            acts[-1] = kinds[type(m)]
        elif isinstance(m, nn.Dropout):
            continue
        else:
            raise ValueError(f"unsupported module {type(m).__name__}")
    return layers, acts


def export_torch(module, path, sequence_length=None):
    """A `nn.Sequential` of Linear + activations (MLP), or a module with `.lstm` (nn.LSTM,
    batch_first, unidirectional, no projections) and `.head` (Linear or Sequential) run on
    the last time step's hidden state (LSTM)."""
    import torch.nn as nn

    if isinstance(module, nn.Sequential):
        layers, acts = _torch_dense_stack(list(module))
        return export_mlp(layers, acts, path)
    lstm = getattr(module, "lstm", None)
    if not isinstance(lstm, nn.LSTM):
        raise ValueError("expected nn.Sequential (MLP) or a module with .lstm and .head")
    if lstm.bidirectional or getattr(lstm, "proj_size", 0):
        raise ValueError("bidirectional and projected LSTMs are not supported")
    if sequence_length is None:
        raise ValueError("sequence_length is required for an LSTM")
    sd = {k: v.detach().cpu().float().numpy() for k, v in lstm.state_dict().items()}
    layers = [
        (sd[f"weight_ih_l{k}"], sd[f"weight_hh_l{k}"], sd.get(f"bias_ih_l{k}"), sd.get(f"bias_hh_l{k}"))
        for k in range(lstm.num_layers)
    ]
    head = module.head
    head_layers, acts = _torch_dense_stack(list(head) if isinstance(head, nn.Sequential) else [head])
    return export_lstm(layers, head_layers, acts, sequence_length, path)


def random_mlp(seed, dims, activations, path):
    rng = np.random.default_rng(seed)
    layers = []
    for i, o in zip(dims[:-1], dims[1:]):
        bound = 1 / np.sqrt(i)  # nn.Linear's default init range
        layers.append((rng.uniform(-bound, bound, (o, i)), rng.uniform(-bound, bound, o)))
    export_mlp(layers, activations, path)


def random_lstm(seed, inputs, hidden, num_layers, sequence_length, head_dims, activations, path):
    rng = np.random.default_rng(seed)
    bound = 1 / np.sqrt(hidden)
    u = lambda *shape: rng.uniform(-bound, bound, shape)  # noqa: E731
    layers = []
    for k in range(num_layers):
        fan_in = inputs if k == 0 else hidden
        layers.append((u(4 * hidden, fan_in), u(4 * hidden, hidden), u(4 * hidden), u(4 * hidden)))
    head, width = [], hidden
    for o in head_dims:
        head.append((u(o, width), u(o)))
        width = o
    export_lstm(layers, head, activations, sequence_length, path)


def main(argv):
    if len(argv) >= 2 and argv[0] == "samples":
        out = argv[1].rstrip("/")
        random_mlp(7, [8, 32, 16, 1], ["relu", "relu", "none"], f"{out}/sample-mlp.safetensors")
        random_lstm(11, 4, 8, 2, 10, [1], ["none"], f"{out}/sample-lstm.safetensors")
        return 0
    if len(argv) == 5 and argv[0] == "mlp":
        dims = [int(d) for d in argv[3].split(",")]
        random_mlp(int(argv[2]), dims, argv[4].split(","), argv[1])
        return 0
    if len(argv) == 9 and argv[0] == "lstm":
        _, out, seed, inputs, hidden, layers, seq, head, acts = argv
        head_dims = [int(d) for d in head.split(",")] if head else []
        random_lstm(int(seed), int(inputs), int(hidden), int(layers), int(seq), head_dims, acts.split(",") if acts else [], out)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
