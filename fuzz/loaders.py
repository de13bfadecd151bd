"""Fuzz target for the Python file readers: the safetensors reader (SafetensorsFile), load_adapter and
load_experts, on fuzzed files. The library documents one exception for a malformed file:
InvalidArgumentError naming the file (moe_sft.MoESFTError subclasses, for the loaders); anything else that
escapes (IndexError, TypeError, OverflowError, a numpy or JSON error, a crash) is a finding.

The input is one test case: a byte that picks the target, then for the directory loaders a 2-byte length and
that many bytes of JSON config, then the safetensors file. With atheris (pip install atheris; libFuzzer for
Python) this runs coverage-guided; without it, a mutation loop over the seed corpus (byte flips, truncation,
digits and JSON tokens spliced into the header) runs for the time given. Either way a file argument replays
that input.

usage: python fuzz/loaders.py CORPUS_DIR [-max_total_time=SECONDS] [libFuzzer flags...]   (atheris)
       python fuzz/loaders.py --no-atheris CORPUS_DIR [SECONDS]                           (mutation loop)
       python fuzz/loaders.py --make-seeds CORPUS_DIR                                     (write the seeds)
"""
import os
import random
import struct
import sys
import tempfile
import time

import numpy as np

TARGETS = ("safetensors", "adapter", "checkpoint")
_DIR = tempfile.mkdtemp(prefix="moe_sft_fuzz_")


def _write(name, data):
    path = os.path.join(_DIR, name)
    with open(path, "wb") as fh:
        fh.write(data)
    return path


def _clean():
    for name in os.listdir(_DIR):
        os.unlink(os.path.join(_DIR, name))


def split(data):
    """(target, config bytes, safetensors bytes) of one input."""
    target = TARGETS[data[0] % len(TARGETS)] if data else TARGETS[0]
    rest = data[1:]
    if target == "safetensors" or len(rest) < 2:
        return target, b"", rest
    n = struct.unpack("<H", rest[:2])[0]
    return target, rest[2:2 + n], rest[2 + n:]


def join(target, config, weights):
    head = bytes([TARGETS.index(target)])
    return head + (b"" if target == "safetensors" else struct.pack("<H", len(config)) + config) + weights


def load(data):
    """Reads the input's files as a user would, touching every array handed out."""
    import moe_sft
    from moe_sft import _safetensors

    target, config, weights = split(bytes(data))
    _clean()
    if target == "safetensors":
        f = _safetensors.SafetensorsFile(_write("model.safetensors", weights))
        for key in f:  # every tensor the header admits must be readable
            np.asarray(f[key]).sum()
    elif target == "adapter":
        _write("adapter_config.json", config)
        _write("adapter_model.safetensors", weights)
        adapter = moe_sft.load_adapter(_DIR)
        for arrays in adapter.layers.values():
            for a in arrays.values():
                np.asarray(a, np.float32).sum()
    else:
        _write("config.json", config)
        _write("model.safetensors", weights)
        experts = moe_sft.load_experts(_DIR, 0)
        for name in ("gate_proj", "up_proj", "down_proj"):
            w = getattr(experts, name)
            if isinstance(w, np.ndarray):
                np.asarray(w, np.float32).sum()


def one_input(data):
    import moe_sft

    try:
        load(data)
    except moe_sft.InvalidArgumentError:
        pass  # the documented outcome for a malformed file


def make_seeds(corpus):
    """Valid inputs for every target, written with the package's own writers."""
    import ml_dtypes
    import moe_sft
    from moe_sft import _safetensors

    os.makedirs(corpus, exist_ok=True)
    rng = np.random.default_rng(0)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    E, H, I, r = 2, 8, 8, 2

    def read(path):
        with open(path, "rb") as fh:
            return fh.read()

    with tempfile.TemporaryDirectory() as tmp:
        tensors = {"a": rng.standard_normal((2, 3)).astype(np.float32), "b": np.arange(4, dtype=np.int64),
                   "c": rng.standard_normal(5).astype(bf16), "d": np.zeros((0, 3), np.float16)}
        _safetensors.save_safetensors(os.path.join(tmp, "s.safetensors"), tensors, metadata={"format": "pt"})
        seeds = {"safetensors": join("safetensors", b"", read(os.path.join(tmp, "s.safetensors")))}
        lora = {name: (rng.standard_normal(shape) * 0.1).astype(np.float32) for name, shape in (
            ("gate_a", (E, r, H)), ("gate_b", (E, I, r)), ("up_a", (E, r, H)), ("up_b", (E, I, r)),
            ("down_a", (E, r, I)), ("down_b", (E, H, r)))}
        for layout in ("per_expert", "fused"):
            d = os.path.join(tmp, layout)
            if layout == "fused":
                lora["up_a"] = lora["gate_a"]
            moe_sft.save_adapter(d, {0: lora}, lora_rank=r, lora_alpha=4.0, layout=layout)
            seeds[f"adapter_{layout}"] = join("adapter", read(os.path.join(d, "adapter_config.json")),
                                              read(os.path.join(d, "adapter_model.safetensors")))
        w = {f"model.layers.0.mlp.experts.{e}.{name}.weight": rng.standard_normal(shape).astype(bf16)
             for e in range(E) for name, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I)))}
        _safetensors.save_safetensors(os.path.join(tmp, "m.safetensors"), w)
        config = b'{"num_local_experts": 2, "hidden_size": 8, "intermediate_size": 8}'
        seeds["checkpoint"] = join("checkpoint", config, read(os.path.join(tmp, "m.safetensors")))
    for name, data in seeds.items():
        load(data)  # a seed must load
        with open(os.path.join(corpus, name), "wb") as fh:
            fh.write(data)


def mutate(data, rng):
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(5)
        if kind == 0 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == 1 and data:
            del data[rng.randrange(len(data)):]
        elif kind == 2:  # a token spliced into the (JSON) front of a file
            at = rng.randrange(min(len(data), 400) + 1)
            token = rng.choice([b"-1", b"1e999", b"99999999999999999999", b"[", b"]", b"{}", b'"', b"null", b"0",
                                b'"BF16"', b'"F8_E4M3"', b'"U64"', b",", b"[0,0]", b"[1,2,3]", b"\xff"])
            data[at:at] = token
        elif kind == 3 and len(data) > 8:  # digits replaced
            at = rng.randrange(len(data))
            if chr(data[at]).isdigit():
                data[at] = ord(rng.choice("0123456789"))
        elif len(data) > 10:  # a byte range duplicated
            a = rng.randrange(len(data))
            b = min(len(data), a + rng.randrange(1, 32))
            data[a:a] = data[a:b]
    return bytes(data)


def mutation_loop(corpus, seconds):
    seeds = [open(os.path.join(corpus, n), "rb").read() for n in sorted(os.listdir(corpus))]
    rng = random.Random(0)
    stop, runs = time.monotonic() + seconds, 0
    while time.monotonic() < stop:
        data = mutate(rng.choice(seeds), rng)
        try:
            one_input(data)
        except Exception:
            path = os.path.join(os.getcwd(), f"crash-loaders-{runs}")
            with open(path, "wb") as fh:
                fh.write(data)
            print(f"loaders: input written to {path}", file=sys.stderr)
            raise
        runs += 1
    print(f"loaders: {runs} mutated inputs in {seconds:g} s, no undocumented exception")


def main(argv):
    if argv[1:2] == ["--make-seeds"]:
        make_seeds(argv[2])
        return
    if argv[1:2] == ["--no-atheris"]:
        mutation_loop(argv[2], float(argv[3]) if len(argv) > 3 else 60)
        return
    import atheris

    with atheris.instrument_imports(include=["moe_sft"]):
        import moe_sft  # noqa: F401
        from moe_sft import _adapters, _checkpoints, _safetensors  # noqa: F401
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
