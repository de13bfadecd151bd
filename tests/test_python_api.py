"""The Python API cannot corrupt memory and says what went wrong in Python terms: layers are not copyable,
their shape and format are read-only, saved forwards can be discarded, grads accumulate over micro-batches of
any size, a rank>0 layer without adapters runs the base layer, one exception class per status, the typed
binding refuses wrong arrays and keeps bound ones alive, the names and the version come from the library."""
import copy
import gc
import importlib.metadata
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest

import moe_sft
import reference as R
from conftest import bind_lora, make_layer
from moe_sft import _arrays, _backend, _errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
E, H, I, K, T, RANK = 4, 32, 24, 2, 6, 4


@pytest.fixture
def prob():
    return R.make_problem(E, H, I, K, T, RANK, seed=7)


def _problem_with_tokens(p, tokens, seed):
    """p's layer and adapters with a fresh batch of ``tokens`` tokens."""
    q = R.make_problem(E, H, I, K, tokens, RANK, seed=seed)
    q.gate, q.up, q.down, q.lora = p.gate, p.up, p.down, p.lora
    return q


# ---- not copyable, read-only configuration ----

def test_layer_is_not_copyable(prob):
    layer = make_layer(prob)
    for attempt in (copy.copy, copy.deepcopy, pickle.dumps):
        with pytest.raises(TypeError, match="cannot be copied or pickled"):
            attempt(layer)
    for attempt in (copy.copy, copy.deepcopy, pickle.dumps):  # nor is the backend's handle under it
        with pytest.raises(TypeError, match="cannot be copied or pickled"):
            attempt(layer._layer)
    assert R.rel_err(layer.forward(prob.x, prob.ids, prob.weights), R.forward(prob)) < 1e-2


def test_shape_and_format_attributes_are_read_only(prob):
    layer = make_layer(prob, max_cache_depth=2)
    before = {name: getattr(layer, name) for name in moe_sft.MoESFT._READ_ONLY}
    assert before == dict(expert_num=E, hidden_size=H, intermediate_size=I, lora_rank=RANK, lora_alpha=prob.alpha,
                          max_cache_depth=2, tp_count=1, weight_format="bf16", group_size=0, activation="silu",
                          swiglu_alpha=None, swiglu_limit=None)
    for name in before:
        with pytest.raises(AttributeError, match=f"MoESFT.{name} is read-only"):
            setattr(layer, name, 2)
        with pytest.raises(AttributeError, match="read-only"):
            delattr(layer, name)
    assert {name: getattr(layer, name) for name in before} == before
    assert layer.busy is False  # no call runs (moe_sft.torch's finalizers depend on it: tests/test_torch.py)
    out = layer.forward(prob.x, prob.ids, prob.weights, save_for_backward=True)
    grad_error = R.rel_err(layer.backward(prob.grad_out).gate_a, R.backward(prob)["gate_a"])
    assert R.rel_err(out, R.forward(prob)) < 1e-2 and grad_error < 1e-2


NEW_USER_SCRIPT = """
import copy, sys
import numpy as np
sys.path.insert(0, {tests!r})
import moe_sft, reference as R
p = R.make_problem(4, 32, 24, 2, 6, 4, seed=3)
layer = moe_sft.MoESFT(p.gate, p.up, p.down, lora_rank=4, lora_alpha=p.alpha)
layer.update_lora(*(p.lora[n] for n in R.LORA_NAMES))
for poke in (lambda: copy.copy(layer), lambda: copy.deepcopy(layer), lambda: setattr(layer, "lora_rank", 2),
             lambda: setattr(layer, "hidden_size", 128), lambda: setattr(layer, "lora_alpha", 0.0)):
    try:
        poke()
    except (TypeError, AttributeError):
        pass
layer.forward(p.x, p.ids, p.weights, save_for_backward=True)
layer.backward(p.grad_out)
print("clean")
"""


def test_new_user_pokes_end_in_python_errors_not_heap_corruption():
    """What crashed before (copy then exit: double free; lora_rank/hidden_size assigned then backward: heap
    corruption) now raises, and the process runs on and exits cleanly."""
    result = subprocess.run([sys.executable, "-c", NEW_USER_SCRIPT.format(tests=os.path.join(ROOT, "tests"))],
                            capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "clean"
    assert "Exception ignored" not in result.stderr and "leaked" not in result.stderr, result.stderr


def test_repr_shows_the_configuration(prob):
    layer = make_layer(prob, tp_count=2)
    text = repr(layer)
    for part in (f"experts={E}", f"hidden_size={H}", f"intermediate_size={I}", f"lora_rank={RANK}",
                 f"lora_alpha={prob.alpha}", "weight_format='bf16'", "tp_count=2", f"isa={layer.isa!r}",
                 f"backend={moe_sft.backend()!r}", "lora=bound", "saved=0"):
        assert part in text, (part, text)
    q = moe_sft.quantize(prob.gate, "int4_awq", 8)
    quantized = moe_sft.MoESFT.from_quantized(q, q, moe_sft.quantize(prob.down, "int4_awq", 8), lora_rank=0)
    assert "weight_format='int4_awq', group_size=8" in repr(quantized)
    quantized.close()
    assert repr(quantized).endswith("closed)")


# ---- saved forwards ----

def test_discard_saved(prob):
    layer = make_layer(prob, max_cache_depth=2)
    small = _problem_with_tokens(prob, 3, seed=8)
    layer.forward(prob.x, prob.ids, prob.weights, save_for_backward=True)
    layer.forward(small.x, small.ids, small.weights, save_for_backward=True)
    assert layer.cache_depth == 2 and "saved=2" in repr(layer)
    layer.discard_saved(0)
    assert layer.cache_depth == 2
    layer.discard_saved()  # the T=3 forward: the next backward takes the T=6 one
    assert layer.cache_depth == 1
    grads = layer.backward(prob.grad_out)
    assert grads.input.shape == (T, H) and R.rel_err(grads.gate_a, R.backward(prob)["gate_a"]) < 1e-2
    for n, needle in ((1, "layer.discard_saved"), (-1, "layer.discard_saved")):
        with pytest.raises(moe_sft.InvalidArgumentError) as err:
            layer.discard_saved(n)
        assert needle in str(err.value) and "moe_sft_" not in str(err.value)
    with pytest.raises(moe_sft.InvalidArgumentError, match="not an integer"):
        layer.discard_saved(1.5)
    layer.forward(prob.x, prob.ids, prob.weights, save_for_backward=True)
    layer.forward(prob.x, prob.ids, prob.weights, save_for_backward=True)
    layer.discard_saved(2)
    assert layer.cache_depth == 0


def test_discard_saved_recovers_from_an_exception_between_forward_and_backward(prob):
    layer = make_layer(prob)
    layer.forward(prob.x, prob.ids, prob.weights, save_for_backward=True)
    with pytest.raises(moe_sft.InvalidArgumentError):
        layer.backward(prob.grad_out[:, :-1])  # the training step fails before its backward
    with pytest.raises(moe_sft.CacheFullError, match="max_cache_depth = 1"):
        layer.forward(prob.x, prob.ids, prob.weights, save_for_backward=True)
    layer.discard_saved()
    out = layer.forward(prob.x, prob.ids, prob.weights, save_for_backward=True)
    assert R.rel_err(out, R.forward(prob)) < 1e-2
    assert R.rel_err(layer.backward(prob.grad_out).down_b, R.backward(prob)["down_b"]) < 1e-2


def test_discard_saved_after_a_non_finite_backward(prob):
    layer = make_layer(prob, check_finite=True)
    layer.forward(prob.x, prob.ids, prob.weights, save_for_backward=True)
    bad = prob.grad_out.astype(np.float32)
    bad[2, 5] = np.nan
    with pytest.raises(moe_sft.NonFiniteError, match="layer.backward"):
        layer.backward(bad)
    assert layer.cache_depth == 1
    layer.discard_saved()
    assert layer.cache_depth == 0
    with pytest.raises(moe_sft.CacheEmptyError, match="layer.backward"):
        layer.backward(prob.grad_out)


# ---- gradient accumulation over micro-batches of different sizes ----

def test_backward_accumulates_over_micro_batches_of_any_size(prob):
    layer = make_layer(prob)
    small = _problem_with_tokens(prob, 3, seed=9)
    ref = {n: R.backward(prob)[n] + R.backward(small)[n] for n in R.LORA_NAMES}
    layer.forward(prob.x, prob.ids, prob.weights, save_for_backward=True)
    grads = layer.backward(prob.grad_out)
    lora_arrays = {n: getattr(grads, n) for n in R.LORA_NAMES}
    layer.forward(small.x, small.ids, small.weights, save_for_backward=True)
    again = layer.backward(small.grad_out, out=grads, accumulate=True)
    assert again is grads
    assert grads.input.shape == (3, H) and grads.routing_weights.shape == (3, K)  # this call's, replaced
    for n in R.LORA_NAMES:
        assert getattr(grads, n) is lora_arrays[n]  # accumulated in place
        assert R.rel_err(getattr(grads, n), ref[n]) < 1e-2, n
    ref_small = R.backward(small)
    assert R.rel_err(grads.input, ref_small["input"]) < 1e-2
    # and back to the first size without accumulating: every array fits again or is replaced
    layer.forward(prob.x, prob.ids, prob.weights, save_for_backward=True)
    grads = layer.backward(prob.grad_out, out=grads)
    assert grads.input.shape == (T, H) and R.rel_err(grads.up_a, R.backward(prob)["up_a"]) < 1e-2


# ---- adapters: unbound means base layer only; keep-alive ----

def _base_problem(p):
    q = R.make_problem(E, H, I, K, T, 0, seed=7)
    q.gate, q.up, q.down, q.x, q.ids, q.weights, q.grad_out = p.gate, p.up, p.down, p.x, p.ids, p.weights, p.grad_out
    return q


def test_rank_layer_without_adapters_runs_the_base_layer(prob):
    base = _base_problem(prob)
    layer = moe_sft.MoESFT(prob.gate, prob.up, prob.down, lora_rank=RANK, lora_alpha=prob.alpha)
    assert layer.lora is None and "lora=unbound" in repr(layer)
    out = layer.forward(prob.x, prob.ids, prob.weights, save_for_backward=True)
    assert R.rel_err(out, R.forward(base)) < 1e-2
    grads = layer.backward(prob.grad_out)
    assert R.rel_err(grads.input, R.backward(base)["input"]) < 1e-2
    assert all(not np.any(getattr(grads, n)) for n in R.LORA_NAMES)  # zero LoRA grads, overwritten
    bind_lora(layer, prob)
    assert layer.lora is not None
    assert R.rel_err(layer.forward(prob.x, prob.ids, prob.weights), R.forward(prob)) < 1e-2
    layer.update_lora(None)  # unbind: the base layer again
    assert layer.lora is None
    assert R.rel_err(layer.forward(prob.x, prob.ids, prob.weights), R.forward(base)) < 1e-2


def test_update_lora_takes_six_arrays_or_none(prob):
    layer = moe_sft.MoESFT(prob.gate, prob.up, prob.down, lora_rank=RANK)
    lora = [prob.lora[n] for n in R.LORA_NAMES]
    with pytest.raises(moe_sft.InvalidArgumentError, match="up_b is missing"):
        layer.update_lora(*lora[:3], None, *lora[4:])
    rank0 = moe_sft.MoESFT(prob.gate, prob.up, prob.down, lora_rank=0)
    with pytest.raises(moe_sft.InvalidArgumentError) as err:
        rank0.update_lora(*lora)
    assert "layer.update_lora" in str(err.value) and "moe_sft_" not in str(err.value)


def test_bound_lora_arrays_are_kept_alive_by_the_backend(prob):
    """The backend's Layer holds the arrays the library reads in place, whoever else drops them."""
    backend = _backend.backend
    status, handle = backend.create(E, H, I, RANK, prob.alpha, 1, 0, 1, None, 0, 0, False, prob.gate.view(np.uint16),
                                    prob.up.view(np.uint16), prob.down.view(np.uint16))
    assert status == 0
    expected = R.forward(prob)
    assert backend.update_lora(handle, [prob.lora[n].copy() for n in R.LORA_NAMES]) == 0  # only the backend holds them
    gc.collect()
    for _ in range(3):  # reuse freed memory, if any was freed
        [np.full(prob.lora[n].shape, np.nan, np.float32) for n in R.LORA_NAMES]
    out = np.empty((T, H), np.uint16)
    assert backend.forward(handle, prob.ids.astype(np.int64), prob.weights, prob.x.view(np.uint16), out, False) == 0
    assert R.rel_err(out.view(moe_sft.bfloat16), expected) < 1e-2
    backend.destroy(handle)
    backend.destroy(handle)  # twice is fine
    with pytest.raises(ValueError, match="closed"):
        backend.forward(handle, prob.ids.astype(np.int64), prob.weights, prob.x.view(np.uint16), out, False)


def test_typed_binding_refuses_wrong_arrays(prob):
    nanobind = _backend.load("nanobind")
    status, handle = nanobind.create(E, H, I, 0, 1.0, 1, 0, 1, None, 0, 0, False, prob.gate.view(np.uint16),
                                     prob.up.view(np.uint16), prob.down.view(np.uint16))
    assert status == 0
    ids, w, x = prob.ids.astype(np.int64), prob.weights, prob.x.view(np.uint16)
    out = np.empty((T, H), np.uint16)
    wrong = {"ids float64": (ids.astype(np.float64), w, x, out), "ids 1-D": (ids.ravel(), w, x, out),
             "weights not contiguous": (ids, np.tile(w, (1, 2))[:, ::2], x, out),
             "input float32": (ids, w, prob.x.astype(np.float32), out),
             "read-only output": (ids, w, x, np.frombuffer(bytes(T * H * 2), np.uint16).reshape(T, H))}
    for case, args in wrong.items():
        with pytest.raises(TypeError):  # never a converted copy: outputs and bound arrays are used in place
            nanobind.forward(handle, *args, False)
            pytest.fail(case)
    status, ranked = nanobind.create(E, H, I, RANK, 1.0, 1, 0, 1, None, 0, 0, False, prob.gate.view(np.uint16),
                                     prob.up.view(np.uint16), prob.down.view(np.uint16))
    lora = [prob.lora[n] for n in R.LORA_NAMES]
    with pytest.raises(TypeError):
        nanobind.update_lora(ranked, [np.asfortranarray(lora[0])] + lora[1:])
    with pytest.raises(TypeError):
        nanobind.update_lora(ranked, [lora[0].astype(np.float64)] + lora[1:])
    with pytest.raises(TypeError):
        nanobind.update_lora(ranked, [lora[0].view(np.uint16)[..., ::2].copy()] + lora[1:])  # mixed dtypes
    assert nanobind.update_lora(ranked, lora) == 0
    nanobind.destroy(ranked)
    with pytest.raises(ValueError, match="forward"):  # shapes that disagree
        nanobind.forward(handle, ids[:3], w[:3], x, out, False)
    assert nanobind.forward(handle, ids, w, x, out, False) == 0
    nanobind.destroy(handle)


# ---- exceptions, names and version from the library ----

def test_one_exception_class_per_status():
    names = [_errors.status_name(code) for code in range(1, 64)]
    names = names[:names.index("unknown status")]
    classes = [_errors.error_for(code, "m") for code in range(1, len(names) + 1)]
    assert [c.status for c in classes] == names
    assert {type(c).status_name for c in classes} == set(names)  # every status has its own class
    assert all(isinstance(c, moe_sft.MoESFTError) for c in classes)
    public = {moe_sft.InvalidArgumentError, moe_sft.OutOfMemoryError, moe_sft.CacheFullError, moe_sft.CacheEmptyError,
              moe_sft.NonFiniteError, moe_sft.UnsupportedError, moe_sft.InternalError}
    assert {type(c) for c in classes} == public
    assert issubclass(moe_sft.InvalidArgumentError, ValueError) and issubclass(moe_sft.OutOfMemoryError, MemoryError)
    assert type(_errors.error_for(99, "m")) is moe_sft.MoESFTError


def test_error_messages_name_the_python_call(prob):
    layer = make_layer(prob)
    ids = prob.ids.copy()
    ids[3, 1] = E
    with pytest.raises(moe_sft.InvalidArgumentError) as err:
        layer.forward(prob.x, ids, prob.weights)
    assert str(err.value).startswith("layer.forward: expert_ids[3, 1] = 4")
    with pytest.raises(moe_sft.InvalidArgumentError) as err:
        moe_sft.MoESFT(prob.gate, prob.up, prob.down, lora_alpha=float("nan"))
    assert str(err.value).startswith("MoESFT: ") and "moe_sft_" not in str(err.value)
    assert _errors.python_message("moe_sft_backward: x; see MOE_SFT_ERR_NON_FINITE in moe_sft.h") == \
        "layer.backward: x; see MOE_SFT_ERR_NON_FINITE in moe_sft.h"


def test_enum_names_come_from_the_library():
    backend = _backend.backend
    assert list(_arrays.enum_codes("weight_format")) == ["bf16", "int8", "int4_awq", "int4_k2", "fp8_e4m3_block",
                                                         "mxfp4"]
    assert list(_arrays.enum_codes("scoring")) == ["softmax", "sigmoid"]
    assert list(_arrays.enum_codes("activation")) == ["silu", "swiglu_clamped"]
    assert len(_arrays.enum_codes("dtype")) == 2
    for kind in ("weight_format", "dtype", "scoring", "activation"):
        lookup = getattr(backend, f"{kind}_name")
        assert lookup(-1) is None and lookup(len(_arrays.enum_codes(kind))) is None


def test_nanobind_enums_match_the_library_names():
    nanobind = _backend.load("nanobind")
    for enum, lookup in ((nanobind.WeightFormat, nanobind.weight_format_name),
                         (nanobind.Scoring, nanobind.scoring_name), (nanobind.DType, nanobind.dtype_name),
                         (nanobind.Activation, nanobind.activation_name)):
        for member in enum:
            assert lookup(int(member)).lower() == member.name.lower()
    for member in nanobind.Status:
        assert nanobind.status_string(int(member)) == "MOE_SFT_" + member.name


def test_version_is_written_once_in_the_header():
    header = open(os.path.join(ROOT, "include", "moe_sft.h"), encoding="utf-8").read()
    parts = [re.search(rf"#define MOE_SFT_VERSION_{p} +(\d+)", header).group(1) for p in ("MAJOR", "MINOR", "PATCH")]
    version = ".".join(parts)
    assert moe_sft.__version__ == version == ".".join(map(str, moe_sft.library_version()))
    assert importlib.metadata.version("moe_sft") == version
    for path in ("pyproject.toml", "CMakeLists.txt", os.path.join("python", "moe_sft", "__init__.py")):
        text = open(os.path.join(ROOT, path), encoding="utf-8").read()
        assert version not in text, f"{path} writes the version {version}; it belongs in moe_sft.h only"
