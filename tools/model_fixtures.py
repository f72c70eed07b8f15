#!/usr/bin/env python3
"""NumPy reference outputs for the model tests, committed as __test__/fixtures/model-reference.json
so that `npm test` needs no Python. Regenerate (NumPy in a throwaway venv, nothing installed globally):

    python3 -m venv /tmp/qm-numpy && /tmp/qm-numpy/bin/pip install 'numpy>=1.26'
    /tmp/qm-numpy/bin/python tools/model_fixtures.py            # writes the fixture
    /tmp/qm-numpy/bin/python tools/model_fixtures.py --check    # compares with the committed one

The generated models are seeded with mulberry32, the PRNG of benchmark/models-support.ts
(`rng`), so that __test__/model-fixtures.ts writes byte-identical files in JavaScript: weights
uniform in +-1/sqrt(fan_in) (PyTorch's default init; 1/sqrt(hidden) for LSTMs), drawn in the
order of export_safetensors.random_mlp/random_lstm. The inputs are `randomInput(n, seed)` of
the same file (mulberry32(seed) * 4 - 2, rounded to float32) with seed = batch, as the tests
always used. The fixture records the sha256 of every model file and input, so a drift on either
side fails loudly instead of comparing different numbers. The outputs are float64, from
reference_numpy.forward (the NumPy forward pass the live cross-check uses too).
"""

import hashlib
import json
import math
import os
import platform
import sys
import tempfile

import numpy as np

from export_safetensors import export_lstm, export_mlp, read_safetensors
from reference_numpy import forward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "__test__", "fixtures", "model-reference.json")
BATCHES = (1, 64)
COMMAND = (
    "python3 -m venv /tmp/qm-numpy && /tmp/qm-numpy/bin/pip install 'numpy>=1.26' && "
    "/tmp/qm-numpy/bin/python tools/model_fixtures.py"
)

# The cases of __test__/models.spec.ts ("CPU inference matches NumPy to 1e-5").
CASES = [
    {"name": "MLP 64→256→256→1 relu", "generate": "mlp", "seed": 1, "dims": [64, 256, 256, 1], "activations": ["relu", "relu", "none"]},
    {"name": "MLP with gelu/tanh/sigmoid", "generate": "mlp", "seed": 2, "dims": [16, 32, 32, 8, 4], "activations": ["gelu", "tanh", "sigmoid", "none"]},
    {"name": "LSTM 2 layers + 2-layer head", "generate": "lstm", "seed": 3, "input": 5, "hidden": 16, "layers": 2, "sequenceLength": 12, "head": [8, 3], "activations": ["relu", "none"]},
    {"name": "LSTM 3 layers, no dense head", "generate": "lstm", "seed": 4, "input": 3, "hidden": 8, "layers": 3, "sequenceLength": 6, "head": [], "activations": []},
    {"name": "sample-mlp", "file": "models/sample-mlp.safetensors"},
    {"name": "sample-lstm", "file": "models/sample-lstm.safetensors"},
]

M32 = 0xFFFFFFFF


def mulberry32(seed):
    """benchmark/models-support.ts `rng`: floats in [0, 1), bit for bit."""
    a = seed & M32

    def imul(x, y):
        return (x * y) & M32

    def draw():
        nonlocal a
        a = (a + 0x6D2B79F5) & M32
        t = a
        t = imul(t ^ (t >> 15), t | 1)
        t ^= (t + imul(t ^ (t >> 7), t | 61)) & M32
        return ((t ^ (t >> 14)) & M32) / 4294967296

    return draw


def random_input(n, seed):
    """benchmark/models-support.ts `randomInput`: float32."""
    r = mulberry32(seed)
    return np.array([r() * 4 - 2 for _ in range(n)], dtype=np.float64).astype("<f4")


def uniform(r, bound, shape):
    count = int(np.prod(shape)) if shape else 1
    return np.array([(r() * 2 - 1) * bound for _ in range(count)], dtype=np.float64).reshape(shape)


def write_model(case, path):
    r = mulberry32(case["seed"])
    if case["generate"] == "mlp":
        layers = []
        for i, o in zip(case["dims"][:-1], case["dims"][1:]):
            bound = 1 / math.sqrt(i)
            layers.append((uniform(r, bound, (o, i)), uniform(r, bound, (o,))))
        export_mlp(layers, case["activations"], path)
        return
    hidden = case["hidden"]
    bound = 1 / math.sqrt(hidden)
    layers = []
    for k in range(case["layers"]):
        fan_in = case["input"] if k == 0 else hidden
        layers.append(
            (uniform(r, bound, (4 * hidden, fan_in)), uniform(r, bound, (4 * hidden, hidden)), uniform(r, bound, (4 * hidden,)), uniform(r, bound, (4 * hidden,)))
        )
    head, width = [], hidden
    for o in case["head"]:
        head.append((uniform(r, bound, (o, width)), uniform(r, bound, (o,))))
        width = o
    export_lstm(layers, head, case["activations"], case["sequenceLength"], path)


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def shape_of(tensors, meta):
    """(input size, sequence length, output size) of a model, as the binding reports them."""
    if meta["arch"] == "mlp":
        inputs, steps = tensors["dense.0.weight"].shape[1], 1
    else:
        inputs, steps = tensors["weight_ih_l0"].shape[1], int(meta["sequence_length"])
    n = 0
    while f"dense.{n}.weight" in tensors:
        n += 1
    if n:
        outputs = tensors[f"dense.{n - 1}.weight"].shape[0]
    else:
        k = 0
        while f"weight_hh_l{k + 1}" in tensors:
            k += 1
        outputs = tensors[f"weight_hh_l{k}"].shape[1]
    return int(inputs), steps, int(outputs)


def build(scratch):
    cases = []
    for case in CASES:
        entry = {"name": case["name"]}
        if "file" in case:
            path = os.path.join(ROOT, case["file"])
            entry["model"] = {"file": case["file"]}
        else:
            path = os.path.join(scratch, f"case-{len(cases)}.safetensors")
            write_model(case, path)
            entry["model"] = {k: v for k, v in case.items() if k != "name"}
        with open(path, "rb") as f:
            entry["modelSha256"] = sha256(f.read())
        tensors, meta = read_safetensors(path)
        inputs, steps, outputs = shape_of(tensors, meta)
        entry.update({"inputSize": inputs, "sequenceLength": steps, "outputSize": outputs, "runs": []})
        for batch in BATCHES:
            x = random_input(batch * inputs * steps, batch)
            y = forward(tensors, meta, x.astype(np.float64), batch)
            expected = np.ascontiguousarray(y, dtype=np.float64).reshape(-1)
            assert expected.size == batch * outputs, (case["name"], expected.size, batch * outputs)
            entry["runs"].append(
                {"batch": batch, "inputSeed": batch, "inputLength": int(x.size), "inputSha256": sha256(x.tobytes()), "expected": [float(v) for v in expected]}
            )
        cases.append(entry)
    return {
        "about": "NumPy (float64) reference outputs for __test__/models.spec.ts. Generated by tools/model_fixtures.py; do not edit by hand.",
        "command": COMMAND,
        "check": "tools/model_fixtures.py --check (run by __test__/models.numpy.spec.ts when numpy is installed)",
        "generatedWith": {"python": platform.python_version(), "numpy": np.__version__},
        "prng": "mulberry32 (benchmark/models-support.ts rng); model seeds per case, input seed = batch",
        "weights": "uniform(-b, b), b = 1/sqrt(fan_in) (LSTM: 1/sqrt(hidden)), float32, drawn in export_safetensors.random_mlp/random_lstm order",
        "inputs": "randomInput(n, batch): mulberry32(batch) * 4 - 2, float32, sample-major then time step then feature",
        "tolerance": "1e-5 relative, 1e-6 absolute near zero (closeness in benchmark/models-support.ts)",
        "cases": cases,
    }


def dump(fixture):
    """Indented, each run's outputs on one line; floats as repr, which JSON.parse reads back exactly."""
    outputs = {}
    shallow = json.loads(json.dumps(fixture))
    for c, case in enumerate(shallow["cases"]):
        for r, run in enumerate(case["runs"]):
            key = f"@outputs-{c}-{r}@"
            outputs[key] = json.dumps(run["expected"], separators=(",", ":"))
            run["expected"] = key
    text = json.dumps(shallow, indent=2, ensure_ascii=False)
    for key, value in outputs.items():
        text = text.replace(json.dumps(key), value)
    return text + "\n"


def compare(old, new):
    """Differences that matter: anything but the generator's versions, and outputs beyond 1e-12."""
    problems = []
    strip = lambda f: {k: v for k, v in f.items() if k not in ("generatedWith", "cases")}  # noqa: E731
    if strip(old) != strip(new):
        problems.append("the fixture's description fields differ")
    worst = 0.0
    if [c["name"] for c in old["cases"]] != [c["name"] for c in new["cases"]]:
        return problems + ["the cases differ"], worst
    for a, b in zip(old["cases"], new["cases"]):
        for key in ("model", "modelSha256", "inputSize", "sequenceLength", "outputSize"):
            if a[key] != b[key]:
                problems.append(f"{a['name']}: {key} {a[key]} vs {b[key]}")
        for ra, rb in zip(a["runs"], b["runs"]):
            for key in ("batch", "inputSeed", "inputLength", "inputSha256"):
                if ra[key] != rb[key]:
                    problems.append(f"{a['name']} batch {ra['batch']}: {key} {ra[key]} vs {rb[key]}")
            ea, eb = np.array(ra["expected"]), np.array(rb["expected"])
            if ea.shape != eb.shape:
                problems.append(f"{a['name']} batch {ra['batch']}: {ea.size} outputs vs {eb.size}")
                continue
            err = np.abs(ea - eb) / np.maximum(np.abs(eb), 1e-3)
            worst = max(worst, float(err.max()))
            if err.max() > 1e-12:
                problems.append(f"{a['name']} batch {ra['batch']}: outputs differ by up to {err.max():.3g} (relative)")
    return problems, worst


def main(argv):
    check = "--check" in argv
    with tempfile.TemporaryDirectory() as scratch:
        fixture = build(scratch)
    if check:
        with open(FIXTURE, encoding="utf8") as f:
            committed = json.load(f)
        problems, worst = compare(committed, fixture)
        if problems:
            print(f"{os.path.relpath(FIXTURE, ROOT)} is not what NumPy {np.__version__} gives now; regenerate with:\n  {COMMAND}", file=sys.stderr)
            for p in problems:
                print(f"  {p}", file=sys.stderr)
            return 1
        print(f"{os.path.relpath(FIXTURE, ROOT)}: {len(fixture['cases'])} cases match NumPy {np.__version__} (worst relative difference {worst:.3g})")
        return 0
    os.makedirs(os.path.dirname(FIXTURE), exist_ok=True)
    with open(FIXTURE, "w", encoding="utf8") as f:
        f.write(dump(fixture))
    print(f"wrote {os.path.relpath(FIXTURE, ROOT)}: {len(fixture['cases'])} cases, NumPy {np.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
