"""AdamW and the bf16 converters through the raw C ABI, as any FFI sees them: cffi in ABI mode over the
header's CDEF block and the installed library (README, "Use it from another runtime"), no Python backend.

AdamW is checked against a float64 numpy reference of torch.optim.AdamW's formula (decoupled weight decay,
bias correction) with torch.nn.utils.clip_grad_norm_'s clipping, over 20 steps, for f32 and bf16 parameters,
with weight decay, with clipping, and with poisoned steps that must change nothing; against torch itself
where torch is importable. The converters are checked bit for bit against ml_dtypes."""
import os

import ml_dtypes
import numpy as np
import pytest

import moe_sft

cffi = pytest.importorskip("cffi", reason="cffi is not installed (pip install 'moe_sft[cffi]')")


BF16 = ml_dtypes.bfloat16


# ---- the library through cffi --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def abi():
    header = open(os.path.join(moe_sft.get_include(), "moe_sft.h")).read()
    ffi = cffi.FFI()
    ffi.cdef(header.split("/* MOE_SFT_CDEF_BEGIN */")[1].split("/* MOE_SFT_CDEF_END */")[0])
    return ffi, ffi.dlopen(moe_sft.get_library())


def last_error(abi):
    ffi, lib = abi
    return ffi.string(lib.moe_sft_last_error()).decode()


def ptr(ffi, a, ctype):
    return ffi.cast(ctype, a.ctypes.data)


class Opt:
    """An optimizer made through the ABI over numpy arrays (kept alive here)."""

    def __init__(self, abi, params, **hyper):
        ffi, lib = abi
        self.ffi, self.lib, self.params = ffi, lib, params
        self.cfg = ffi.new("moe_sft_adamw_config *")
        lib.moe_sft_adamw_config_init(self.cfg)
        for k, v in hyper.items():
            setattr(self.cfg, k, v)
        self.names = [ffi.new("char[]", name.encode()) for name in params]
        descs = ffi.new("moe_sft_adamw_param[]", len(params))
        for i, (name, a) in enumerate(params.items()):
            descs[i].name = self.names[i]
            descs[i].dtype = lib.MOE_SFT_DTYPE_F32 if a.dtype == np.float32 else lib.MOE_SFT_DTYPE_BF16
            descs[i].data = ptr(ffi, a, "void *")
            descs[i].count = a.size
        out = ffi.new("moe_sft_adamw **")
        status = lib.moe_sft_adamw_create(self.cfg, len(params), descs, out)
        assert status == lib.MOE_SFT_OK, last_error(abi)
        self.handle = ffi.gc(out[0], lib.moe_sft_adamw_destroy)

    def step(self, grads):
        ffi, lib = self.ffi, self.lib
        gp = ffi.new("float *[]", [ptr(ffi, grads[n], "float *") for n in self.params])
        report = ffi.new("moe_sft_adamw_report *")
        report.struct_size = ffi.sizeof("moe_sft_adamw_report")
        status = lib.moe_sft_adamw_step(self.handle, gp, report)
        assert status == lib.MOE_SFT_OK, last_error((ffi, lib))
        return report

    def state(self, i):
        """(m, v, master or None, step): copies of the optimizer's arrays for parameter i."""
        ffi, lib = self.ffi, self.lib
        m, v, master, step = ffi.new("float **"), ffi.new("float **"), ffi.new("float **"), ffi.new("int64_t *")
        assert lib.moe_sft_adamw_state(self.handle, i, m, v, master, step) == lib.MOE_SFT_OK
        n = list(self.params.values())[i].size

        def arr(p):
            return None if p == ffi.NULL else np.frombuffer(ffi.buffer(p, 4 * n), np.float32).copy()
        return arr(m[0]), arr(v[0]), arr(master[0]), step[0]

    def views(self, i):
        """Writable numpy views of parameter i's m, v and master (None for f32)."""
        ffi, lib = self.ffi, self.lib
        m, v, master = ffi.new("float **"), ffi.new("float **"), ffi.new("float **")
        assert lib.moe_sft_adamw_state(self.handle, i, m, v, master, ffi.NULL) == lib.MOE_SFT_OK
        n = list(self.params.values())[i].size

        def arr(p):
            return None if p == ffi.NULL else np.frombuffer(ffi.buffer(p, 4 * n), np.float32)
        return arr(m[0]), arr(v[0]), arr(master[0])

    def snapshot(self):
        """Everything a step may change: parameter bits, state arrays, step count."""
        snap = {}
        for i, (name, a) in enumerate(self.params.items()):
            m, v, master, step = self.state(i)
            snap[name] = (a.view(np.uint8).copy(), m, v, master)
        return snap, step


def assert_same_snapshot(a, b):
    (sa, step_a), (sb, step_b) = a, b
    assert step_a == step_b
    for name in sa:
        for x, y in zip(sa[name], sb[name]):
            if x is None:
                assert y is None
            else:
                assert x.view(np.uint8).tobytes() == y.view(np.uint8).tobytes(), name


# ---- the float64 reference -----------------------------------------------------------------------------------

class RefAdamW:
    """torch.optim.AdamW (decoupled weight decay, bias correction) with clip_grad_norm_ over all tensors, in
    float64. Parameters are float64 copies of the initial values (a bf16 parameter's f32 master)."""

    def __init__(self, params, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, max_grad_norm=0.0):
        self.p = {n: np.asarray(a, np.float64).copy() for n, a in params.items()}
        self.m = {n: np.zeros_like(a) for n, a in self.p.items()}
        self.v = {n: np.zeros_like(a) for n, a in self.p.items()}
        self.lr, self.b1, self.b2, self.eps, self.wd, self.max_norm = lr, beta1, beta2, eps, weight_decay, max_grad_norm
        self.t = 0

    def step(self, grads):
        g = {n: np.asarray(a, np.float64) for n, a in grads.items()}
        norm = np.sqrt(sum(float(np.sum(a * a)) for a in g.values()))
        if not np.isfinite(norm):
            return norm, True
        coef = 1.0
        if self.max_norm > 0 and self.max_norm / (norm + 1e-6) < 1:
            coef = self.max_norm / (norm + 1e-6)
        self.t += 1
        bc1, bc2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        for n in self.p:
            gn = g[n] * coef
            self.p[n] *= 1 - self.lr * self.wd
            self.m[n] = self.b1 * self.m[n] + (1 - self.b1) * gn
            self.v[n] = self.b2 * self.v[n] + (1 - self.b2) * gn * gn
            self.p[n] -= (self.lr / bc1) * self.m[n] / (np.sqrt(self.v[n]) / np.sqrt(bc2) + self.eps)
        return norm, False


def make_params(rng, dtype, shapes=(("gate_a", (4, 3, 40)), ("gate_b", (4, 24, 3)), ("down_b", (1000,)))):
    return {n: (rng.standard_normal(s) * 0.5).astype(dtype) for n, s in shapes}


def make_grads(rng, params, scale=1.0):
    return {n: (rng.standard_normal(a.shape) * scale).astype(np.float32) for n, a in params.items()}


def master_of(a):
    return a.astype(np.float32) if a.dtype == BF16 else a


HYPER_CASES = {
    "plain": dict(lr=1e-2),
    "weight_decay": dict(lr=1e-2, weight_decay=0.1),
    "clipping": dict(lr=3e-3, max_grad_norm=0.5, weight_decay=0.01),
    "betas_and_eps": dict(lr=5e-3, beta1=0.5, beta2=0.9, eps=1e-3),
    "beta1_small": dict(lr=1e-2, beta1=0.2, beta2=0.0),  # lerp's other branch (1 - beta1 >= 0.5), beta2 = 0
}


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("case", HYPER_CASES)
def test_twenty_steps_match_the_float64_reference(abi, dtype, case):
    rng = np.random.default_rng(1)
    params = make_params(rng, np.float32 if dtype == "f32" else BF16)
    hyper = HYPER_CASES[case]
    opt = Opt(abi, params, **hyper)
    ref = RefAdamW({n: master_of(a) for n, a in params.items()}, **hyper)
    clipped = 0
    for step in range(20):
        grads = make_grads(rng, params, scale=1.0 + step / 10)
        report = opt.step(grads)
        norm, skipped = ref.step(grads)
        assert report.skipped == 0 and report.bad_param == -1 and report.bad_index == -1
        assert report.bad_param_name == abi[0].NULL and report.step == step + 1
        assert report.grad_norm == pytest.approx(norm, rel=1e-12)
        expected_coef = min(1.0, hyper["max_grad_norm"] / (norm + 1e-6)) if hyper.get("max_grad_norm") else 1.0
        assert report.clip_coef == pytest.approx(expected_coef, rel=1e-12)
        clipped += report.clip_coef < 1
    if hyper.get("max_grad_norm"):
        assert clipped == 20  # the case exercises clipping at every step
    for i, (name, a) in enumerate(params.items()):
        m, v, master, step = opt.state(i)
        assert step == 20
        value = master if dtype == "bf16" else a
        # f32 arithmetic against float64: a few ulps of the update per step, accumulated over 20 steps
        np.testing.assert_allclose(value.ravel(), ref.p[name].ravel(), rtol=2e-6, atol=2e-6 * hyper["lr"] * 20,
                                   err_msg=name)
        np.testing.assert_allclose(m, ref.m[name].ravel(), rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(v, ref.v[name].ravel(), rtol=1e-5, atol=1e-7, err_msg=name)
        if dtype == "bf16":
            # the bf16 parameter is its master rounded to nearest even, bit for bit
            assert np.array_equal(a.ravel().view(np.uint16), master.astype(BF16).view(np.uint16)), name
        else:
            assert master is None


def test_small_updates_accumulate_in_the_bf16_master(abi):
    """An update far below bf16's resolution moves the master every step; the bf16 parameter moves once the
    master has gone half a bf16 ulp: the reason for the master copy."""
    p = np.full(64, 1.0, BF16)
    opt = Opt(abi, {"w": p}, lr=1e-4)  # |update| ~ lr = 1e-4, bf16's ulp at 1.0 is 2^-7 ~ 7.8e-3
    g = np.ones(64, np.float32)
    for _ in range(10):
        opt.step({"w": g})
    master = opt.state(0)[2]
    assert np.all(master < 1.0 - 9e-4)  # ten steps of ~1e-4 each
    assert np.all(p.astype(np.float32) == 1.0)  # still within half an ulp: the bf16 value has not moved yet
    for _ in range(50):
        opt.step({"w": g})
    assert np.all(p.astype(np.float32) < 1.0)


def test_poisoned_steps_change_nothing_and_name_the_value(abi):
    rng = np.random.default_rng(2)
    for dtype in (np.float32, BF16):
        params = make_params(rng, dtype)
        hyper = dict(lr=1e-2, weight_decay=0.05, max_grad_norm=1.0)
        opt = Opt(abi, params, **hyper)
        ref = RefAdamW({n: master_of(a) for n, a in params.items()}, **hyper)
        poison = {5: ("gate_b", (2, 7, 1), np.nan), 9: ("down_b", (999,), np.inf), 13: ("gate_a", (0, 0, 0), -np.inf)}
        applied = 0
        for step in range(20):
            grads = make_grads(rng, params)
            if step in poison:
                name, index, value = poison[step]
                grads[name][index] = value
                if step == 13:  # two bad tensors: the first parameter (then element) is reported
                    grads["down_b"][3] = np.nan
                    grads["gate_a"][3, 2, 39] = np.nan
                before = opt.snapshot()
                report = opt.step(grads)
                assert_same_snapshot(before, opt.snapshot())
                assert report.skipped == 1
                i = list(params).index(name)
                assert report.bad_param == i and abi[0].string(report.bad_param_name).decode() == name
                assert report.bad_index == np.ravel_multi_index(index, params[name].shape)
                if np.isnan(value):
                    assert np.isnan(report.bad_value)
                else:
                    assert report.bad_value == value
                norm, skipped = ref.step(grads)
                assert skipped and (report.grad_norm == norm or np.isnan(report.grad_norm) and np.isnan(norm))
                assert report.step == applied and report.clip_coef == 1.0
            else:
                report = opt.step(grads)
                ref.step(grads)
                applied += 1
                assert report.skipped == 0 and report.step == applied
        for i, (name, a) in enumerate(params.items()):
            m, v, master, step = opt.state(i)
            assert step == 17
            value = master if dtype == BF16 else a.ravel()
            np.testing.assert_allclose(value, ref.p[name].ravel(), rtol=2e-6, atol=1e-6, err_msg=name)


def test_huge_finite_grads_are_not_mistaken_for_inf(abi):
    """Squares beyond f32's range (|g| > 1.8e19) would overflow an f32 sum of squares; the norm is a double
    sum, finite for any finite grads, and the step is applied."""
    p = np.zeros(100_000, np.float32)
    opt = Opt(abi, {"w": p}, lr=1e-3, max_grad_norm=1.0)
    g = np.zeros_like(p)
    g[70_000] = 3e20
    g[5] = -4e20
    report = opt.step({"w": g})
    assert report.skipped == 0
    norm = np.linalg.norm(g.astype(np.float64))
    assert report.grad_norm == pytest.approx(norm, rel=1e-12) and norm == pytest.approx(5e20, rel=1e-6)
    assert report.clip_coef == pytest.approx(1.0 / (norm + 1e-6), rel=1e-12)
    assert p[70_000] < 0 and p[5] > 0 and p[0] == 0


def test_results_do_not_depend_on_the_thread_count(abi):
    rng = np.random.default_rng(3)
    shapes = (("a", (300_000,)), ("b", (5, 17_000)), ("c", (7,)))
    runs = []
    for threads in (1, 2, 3):
        rng = np.random.default_rng(3)
        params = make_params(rng, np.float32, shapes)
        opt = Opt(abi, params, lr=1e-2, max_grad_norm=100.0, num_threads=threads)
        norms = [opt.step(make_grads(rng, params)).grad_norm for _ in range(3)]
        runs.append((norms, [a.copy() for a in params.values()]))
    for norms, arrays in runs[1:]:
        assert norms == runs[0][0]
        for x, y in zip(arrays, runs[0][1]):
            assert np.array_equal(x, y)


def test_optimizers_stepped_from_two_threads_equal_running_them_in_turn(abi):
    """Steps take the library's worker pool in turn (cffi releases the GIL): two optimizers driven from two
    threads at once end exactly where the same steps run one after the other end."""
    import threading

    def run(opts_and_grads, parallel):
        def drive(opt, grads):
            for g in grads:
                opt.step(g)
        if parallel:
            threads = [threading.Thread(target=drive, args=og) for og in opts_and_grads]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        else:
            for og in opts_and_grads:
                drive(*og)

    results = []
    for parallel in (False, True):
        rng = np.random.default_rng(9)
        work = []
        for _ in range(2):
            params = make_params(rng, np.float32, (("a", (200_000,)), ("b", (3, 5))))
            work.append((Opt(abi, params, lr=1e-2, max_grad_norm=50.0), [make_grads(rng, params) for _ in range(4)]))
        run(work, parallel)
        results.append([a.copy() for opt, _ in work for a in opt.params.values()])
    for x, y in zip(*results):
        assert np.array_equal(x, y)


def test_caller_grads_are_not_modified(abi):
    rng = np.random.default_rng(4)
    params = make_params(rng, np.float32)
    opt = Opt(abi, params, max_grad_norm=0.1)
    grads = make_grads(rng, params)
    copies = {n: g.copy() for n, g in grads.items()}
    assert opt.step(grads).clip_coef < 1
    for n in grads:
        assert np.array_equal(grads[n], copies[n])


def test_state_round_trip_continues_bit_for_bit(abi):
    """What state_dict / load_state_dict need: moments, masters and step count read out of one optimizer and
    written into a fresh one over equal parameters make the two continue identically; set_lr and
    set_config take effect at the next step."""
    ffi, lib = abi
    rng = np.random.default_rng(5)
    params = {**make_params(rng, np.float32, (("f", (50, 3)),)), **make_params(rng, BF16, (("h", (77,)),))}
    hyper = dict(lr=1e-2, weight_decay=0.01, max_grad_norm=2.0)
    a = Opt(abi, params, **hyper)
    for _ in range(5):
        a.step(make_grads(rng, params))
    copy = {n: x.copy() for n, x in params.items()}
    b = Opt(abi, copy, lr=0.5)
    cfg = ffi.new("moe_sft_adamw_config *")
    assert lib.moe_sft_adamw_get_config(a.handle, cfg) == lib.MOE_SFT_OK
    assert (cfg.lr, cfg.weight_decay, cfg.max_grad_norm, cfg.beta1) == (1e-2, 0.01, 2.0, 0.9)
    assert cfg.struct_size == ffi.sizeof("moe_sft_adamw_config")
    assert lib.moe_sft_adamw_set_config(b.handle, cfg) == lib.MOE_SFT_OK
    step = ffi.new("int64_t *")
    assert lib.moe_sft_adamw_get_step(a.handle, step) == lib.MOE_SFT_OK and step[0] == 5
    assert lib.moe_sft_adamw_set_step(b.handle, step[0]) == lib.MOE_SFT_OK
    for i in range(2):
        for src, dst in zip(a.views(i), b.views(i)):
            if src is not None:
                dst[:] = src
    for _ in range(3):
        grads = make_grads(rng, params)
        ra, rb = a.step(grads), b.step(grads)
        assert ra.grad_norm == rb.grad_norm and ra.step == rb.step
    for n in params:
        assert params[n].tobytes() == copy[n].tobytes()
    # set_lr: lr 0 freezes the parameters (no weight decay either: 1 - 0 * wd = 1)
    assert lib.moe_sft_adamw_set_lr(a.handle, 0.0) == lib.MOE_SFT_OK
    before = {n: x.copy() for n, x in params.items()}
    a.step(make_grads(rng, params))
    for n in params:
        assert params[n].tobytes() == before[n].tobytes()
    n_params = ffi.new("int32_t *")
    assert lib.moe_sft_adamw_num_params(a.handle, n_params) == lib.MOE_SFT_OK and n_params[0] == 2
    info = ffi.new("moe_sft_adamw_param *")
    assert lib.moe_sft_adamw_param_info(a.handle, 1, info) == lib.MOE_SFT_OK
    assert ffi.string(info.name) == b"h" and info.dtype == lib.MOE_SFT_DTYPE_BF16 and info.count == 77
    assert int(ffi.cast("uintptr_t", info.data)) == params["h"].ctypes.data


def test_config_defaults(abi):
    ffi, lib = abi
    cfg = ffi.new("moe_sft_adamw_config *")
    lib.moe_sft_adamw_config_init(cfg)
    assert cfg.struct_size == ffi.sizeof("moe_sft_adamw_config")
    assert (cfg.lr, cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay, cfg.max_grad_norm, cfg.num_threads) == \
        (1e-3, 0.9, 0.999, 1e-8, 0.0, 0.0, 0)
    lib.moe_sft_adamw_config_init(ffi.NULL)  # does nothing


# ---- bad input -----------------------------------------------------------------------------------------------

BAD_CONFIGS = [
    ("lr", -1.0, "cfg->lr = -1"), ("lr", float("nan"), "cfg->lr = nan"), ("lr", float("inf"), "cfg->lr = inf"),
    ("beta1", 1.0, "cfg->beta1 = 1 is out of range [0, 1)"), ("beta1", -0.1, "cfg->beta1 = -0.1"),
    ("beta1", float("nan"), "cfg->beta1 = nan"), ("beta2", 1.0, "cfg->beta2 = 1 is out of range"),
    ("beta2", 1.5, "cfg->beta2 = 1.5"), ("eps", 0.0, "cfg->eps = 0 must be > 0"), ("eps", -1e-8, "cfg->eps = -1e-08"),
    ("eps", float("inf"), "cfg->eps = inf"), ("weight_decay", -0.01, "cfg->weight_decay = -0.01"),
    ("weight_decay", float("nan"), "cfg->weight_decay = nan"), ("max_grad_norm", -1.0, "cfg->max_grad_norm = -1"),
    ("max_grad_norm", float("inf"), "cfg->max_grad_norm = inf"), ("num_threads", -1, "cfg->num_threads = -1"),
    ("num_threads", 5000, "cfg->num_threads = 5000"), ("struct_size", 0, "cfg->struct_size = 0"),
    ("struct_size", 8, "cfg->struct_size = 8 is smaller"),
]


def _create(abi, cfg, params, n=None):
    ffi, lib = abi
    descs = ffi.new("moe_sft_adamw_param[]", max(len(params), 1))
    for i, (name, dtype, data, count) in enumerate(params):
        descs[i].name = name
        descs[i].dtype = dtype
        descs[i].data = data
        descs[i].count = count
    out = ffi.new("moe_sft_adamw **", ffi.cast("moe_sft_adamw *", 1))  # a sentinel the call must reset
    status = lib.moe_sft_adamw_create(cfg, len(params) if n is None else n, descs, out)
    if status == lib.MOE_SFT_OK:
        lib.moe_sft_adamw_destroy(out[0])
    else:
        assert out[0] == ffi.NULL
    return status


@pytest.mark.parametrize("field,value,message", BAD_CONFIGS, ids=[f"{f}={v}" for f, v, _ in BAD_CONFIGS])
def test_bad_config_is_refused_naming_the_field(abi, field, value, message):
    ffi, lib = abi
    p = np.zeros(8, np.float32)
    cfg = ffi.new("moe_sft_adamw_config *")
    lib.moe_sft_adamw_config_init(cfg)
    setattr(cfg, field, value)
    params = [(ffi.NULL, lib.MOE_SFT_DTYPE_F32, ptr(ffi, p, "void *"), 8)]
    assert _create(abi, cfg, params) == lib.MOE_SFT_ERR_INVALID_ARGUMENT
    assert last_error(abi).startswith("moe_sft_adamw_create: ") and message in last_error(abi), last_error(abi)
    # set_config refuses the same, and changes nothing
    good = ffi.new("moe_sft_adamw_config *")
    lib.moe_sft_adamw_config_init(good)
    opt = Opt(abi, {"p": p}, lr=0.25)
    assert lib.moe_sft_adamw_set_config(opt.handle, cfg) == lib.MOE_SFT_ERR_INVALID_ARGUMENT
    assert message in last_error(abi)
    lib.moe_sft_adamw_get_config(opt.handle, good)
    assert good.lr == 0.25 and good.beta1 == 0.9 and good.num_threads == 0


def test_newer_config_struct(abi):
    """A longer struct (a newer caller's) is accepted when the fields this library does not know are zero."""
    ffi, lib = abi
    size = ffi.sizeof("moe_sft_adamw_config")
    raw = ffi.new("char[]", size + 16)
    cfg = ffi.cast("moe_sft_adamw_config *", raw)
    lib.moe_sft_adamw_config_init(cfg)
    cfg.struct_size = size + 16
    p = np.zeros(8, np.float32)
    params = [(ffi.NULL, lib.MOE_SFT_DTYPE_F32, ptr(ffi, p, "void *"), 8)]
    assert _create(abi, cfg, params) == lib.MOE_SFT_OK
    raw[size + 3] = b"\x01"
    assert _create(abi, cfg, params) == lib.MOE_SFT_ERR_UNSUPPORTED
    assert "does not know" in last_error(abi)


def test_bad_params_are_refused_naming_the_parameter(abi):
    ffi, lib = abi
    cfg = ffi.new("moe_sft_adamw_config *")
    lib.moe_sft_adamw_config_init(cfg)
    buf = np.zeros(64, np.float32)
    f32, bf16 = lib.MOE_SFT_DTYPE_F32, lib.MOE_SFT_DTYPE_BF16
    base = ptr(ffi, buf, "char *")
    name = ffi.new("char[]", b"gate_a")
    good = (name, f32, ffi.cast("void *", base), 8)
    cases = [
        ([], 0, "n_params = 0 must be >= 1"),
        ([good], -1, "n_params = -1"),
        ([good, (ffi.NULL, 7, ffi.cast("void *", base + 64), 8)], None, "params[1] (\"params[1]\").dtype = 7"),
        ([(name, f32, ffi.NULL, 8)], None, "params[0] (\"gate_a\").data is NULL"),
        ([(name, f32, ffi.cast("void *", base + 2), 8)], None, "params[0] (\"gate_a\").data (address"),
        ([(name, bf16, ffi.cast("void *", base + 1), 8)], None, "not aligned to its 2-byte elements"),
        ([(name, f32, ffi.cast("void *", base), 0)], None, "params[0] (\"gate_a\").count = 0 is out of range"),
        ([(name, f32, ffi.cast("void *", base), -3)], None, ".count = -3"),
        ([(name, f32, ffi.cast("void *", base), 2 ** 51)], None, f".count = {2 ** 51}"),
        ([good, (ffi.NULL, bf16, ffi.cast("void *", base + 30), 4)], None,
         "params[0] (\"gate_a\").data and params[1] (\"params[1]\").data overlap"),
        ([good, good], None, "overlap"),
    ]
    for params, n, message in cases:
        assert _create(abi, cfg, params, n) == lib.MOE_SFT_ERR_INVALID_ARGUMENT, message
        assert message in last_error(abi), (message, last_error(abi))
    out = ffi.new("moe_sft_adamw **")
    assert lib.moe_sft_adamw_create(ffi.NULL, 1, ffi.new("moe_sft_adamw_param[1]"), out) == \
        lib.MOE_SFT_ERR_INVALID_ARGUMENT and "cfg is NULL" in last_error(abi)
    assert lib.moe_sft_adamw_create(cfg, 1, ffi.NULL, out) == lib.MOE_SFT_ERR_INVALID_ARGUMENT
    assert "params is NULL" in last_error(abi)
    assert lib.moe_sft_adamw_create(cfg, 1, ffi.new("moe_sft_adamw_param[1]"), ffi.NULL) == \
        lib.MOE_SFT_ERR_INVALID_ARGUMENT and "out is NULL" in last_error(abi)
    lib.moe_sft_adamw_destroy(ffi.NULL)  # fine


def test_bad_steps_write_nothing(abi):
    ffi, lib = abi
    rng = np.random.default_rng(6)
    params = {"a": rng.standard_normal(40).astype(np.float32), "b": rng.standard_normal(24).astype(BF16)}
    opt = Opt(abi, params, lr=1e-2)
    grads = make_grads(rng, params)
    opt.step(grads)
    m_a = opt.views(0)[0]
    g_a, g_b = ptr(ffi, grads["a"], "float *"), ptr(ffi, grads["b"], "float *")
    misaligned = ffi.cast("float *", ptr(ffi, np.zeros(100, np.float32), "char *") + 2)
    param_a = ptr(ffi, params["a"], "float *")
    cases = [
        (opt.handle, ffi.NULL, "grads is NULL"),
        (opt.handle, ffi.new("float *[]", [g_a, ffi.NULL]), "grads[1] is NULL"),
        (opt.handle, ffi.new("float *[]", [misaligned, g_b]), "grads[0] (address"),
        (opt.handle, ffi.new("float *[]", [g_a, param_a + 1]), "grads[1] overlaps params[0] (\"a\").data"),
        (opt.handle, ffi.new("float *[]", [ffi.cast("float *", ptr(ffi, m_a, "char *")), g_b]),
         "grads[0] overlaps the optimizer's own state"),
        (ffi.NULL, ffi.new("float *[]", [g_a, g_b]), "opt is NULL"),
    ]
    for handle, gp, message in cases:
        before = opt.snapshot()
        report = ffi.new("moe_sft_adamw_report *")
        report.struct_size = ffi.sizeof("moe_sft_adamw_report")
        report.grad_norm, report.step = 123.0, 77
        assert lib.moe_sft_adamw_step(handle, gp, report) == lib.MOE_SFT_ERR_INVALID_ARGUMENT, message
        assert message in last_error(abi), (message, last_error(abi))
        assert report.grad_norm == 123.0 and report.step == 77  # untouched
        assert_same_snapshot(before, opt.snapshot())
    report = ffi.new("moe_sft_adamw_report *")
    report.struct_size = 8
    assert lib.moe_sft_adamw_step(opt.handle, ffi.new("float *[]", [g_a, g_b]), report) == \
        lib.MOE_SFT_ERR_INVALID_ARGUMENT and "report->struct_size = 8" in last_error(abi)
    # grads may share memory with each other (read only), and the report may be NULL
    assert lib.moe_sft_adamw_step(opt.handle, ffi.new("float *[]", [g_a, g_a]), ffi.NULL) == lib.MOE_SFT_OK
    assert last_error(abi) == ""


def test_bad_setter_and_getter_arguments(abi):
    ffi, lib = abi
    p = np.zeros(8, np.float32)
    opt = Opt(abi, {"p": p}, lr=0.5)
    invalid = lib.MOE_SFT_ERR_INVALID_ARGUMENT
    for lr, text in ((-1.0, "lr = -1 is negative"), (float("nan"), "lr = nan is not finite"),
                     (float("inf"), "lr = inf is not finite")):
        assert lib.moe_sft_adamw_set_lr(opt.handle, lr) == invalid and text in last_error(abi)
    assert lib.moe_sft_adamw_set_lr(ffi.NULL, 1.0) == invalid and "opt is NULL" in last_error(abi)
    assert lib.moe_sft_adamw_set_step(opt.handle, -1) == invalid and "step = -1 is negative" in last_error(abi)
    for index in (-1, 1):
        assert lib.moe_sft_adamw_state(opt.handle, index, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL) == invalid
        assert f"param_index = {index} is out of range [0, 1)" in last_error(abi)
        assert lib.moe_sft_adamw_param_info(opt.handle, index, ffi.new("moe_sft_adamw_param *")) == invalid
    assert lib.moe_sft_adamw_get_step(opt.handle, ffi.NULL) == invalid and "step is NULL" in last_error(abi)
    assert lib.moe_sft_adamw_get_config(opt.handle, ffi.NULL) == invalid
    assert lib.moe_sft_adamw_set_config(opt.handle, ffi.NULL) == invalid and "cfg is NULL" in last_error(abi)
    assert lib.moe_sft_adamw_num_params(ffi.NULL, ffi.new("int32_t *")) == invalid
    cfg = ffi.new("moe_sft_adamw_config *")
    lib.moe_sft_adamw_get_config(opt.handle, cfg)
    assert cfg.lr == 0.5  # nothing changed


# ---- bf16 converters -----------------------------------------------------------------------------------------

def _from_f32(abi, x):
    ffi, lib = abi
    x = np.ascontiguousarray(x, np.float32)
    out = np.full(x.size, 0xABCD, np.uint16)
    assert lib.moe_sft_bf16_from_f32(ptr(ffi, x, "float *"), ptr(ffi, out, "uint16_t *"), x.size) == lib.MOE_SFT_OK
    return out


def _to_f32(abi, b):
    ffi, lib = abi
    b = np.ascontiguousarray(b, np.uint16)
    out = np.full(b.size, 7.0, np.float32)
    assert lib.moe_sft_bf16_to_f32(ptr(ffi, b, "uint16_t *"), ptr(ffi, out, "float *"), b.size) == lib.MOE_SFT_OK
    return out


def _ml_dtypes_bits(x):
    with np.errstate(invalid="ignore", over="ignore"):
        return np.asarray(x, np.float32).astype(BF16).view(np.uint16)


def test_bf16_from_f32_matches_ml_dtypes_bit_for_bit(abi):
    special = np.array([
        0x00000000, 0x80000000,              # zeros
        0x3f800000, 0x3f808000, 0x3f818000,  # 1, a tie to even (down), a tie to even (up)
        0x3f808001, 0x3f807fff,              # just above / below a tie
        0x7f7fffff, 0xff7fffff, 0x7f7f8000, 0x7f7f7fff,  # FLT_MAX rounds to Inf; a tie at the top; below it
        0x7f800000, 0xff800000,              # +-Inf
        0x7fc00000, 0xffc00000, 0x7f800001, 0xff800001, 0x7fa12345, 0x7fffffff, 0xffffffff,  # NaNs
        0x00000001, 0x80000001, 0x00008000, 0x00018000, 0x007fffff, 0x00400000, 0x807f8000,  # subnormals
        0x00800000, 0x00ff8000,              # smallest normal, a tie just above it
    ], np.uint32)
    rng = np.random.default_rng(7)
    random_bits = rng.integers(0, 2 ** 32, 1_000_003, dtype=np.uint64).astype(np.uint32)
    ties = (rng.integers(0, 2 ** 16, 4099, dtype=np.uint64).astype(np.uint32) << 16) | 0x8000
    for bits in (special, random_bits, ties):
        x = bits.view(np.float32)
        assert np.array_equal(_from_f32(abi, x), _ml_dtypes_bits(x))
    # a NaN stays a NaN with its sign; unaligned lengths and offsets (vector tails)
    assert list(_from_f32(abi, np.array([0x7f800001, 0xff800001], np.uint32).view(np.float32))) == [0x7fc0, 0xffc0]
    x = rng.standard_normal(1000).astype(np.float32)
    for start, stop in ((1, 2), (3, 40), (5, 1000)):
        assert np.array_equal(_from_f32(abi, x[start:stop]), _ml_dtypes_bits(x[start:stop]))


def test_bf16_to_f32_is_exact_for_every_value(abi):
    every = np.arange(2 ** 16, dtype=np.uint32).astype(np.uint16)
    out = _to_f32(abi, every)
    assert np.array_equal(out.view(np.uint32), every.astype(np.uint32) << 16)
    finite = ~np.isnan(out)
    assert np.array_equal(out[finite], every.view(BF16).astype(np.float32)[finite])
    # and back: every bf16 value survives the round trip, NaNs as their canonical quiet NaN
    back = _from_f32(abi, out)
    assert np.array_equal(back[finite], every[finite])
    assert np.all((back[~finite] & 0x7fff) == 0x7fc0)


def test_bf16_converter_bad_input(abi):
    ffi, lib = abi
    x = np.zeros(16, np.float32)
    b = np.zeros(16, np.uint16)
    invalid = lib.MOE_SFT_ERR_INVALID_ARGUMENT
    fx, ub = ptr(ffi, x, "float *"), ptr(ffi, b, "uint16_t *")
    assert lib.moe_sft_bf16_from_f32(fx, ub, -1) == invalid and "n = -1 is negative" in last_error(abi)
    assert lib.moe_sft_bf16_from_f32(ffi.NULL, ub, 4) == invalid and "src is NULL" in last_error(abi)
    assert lib.moe_sft_bf16_from_f32(fx, ffi.NULL, 4) == invalid and "dst is NULL" in last_error(abi)
    assert lib.moe_sft_bf16_from_f32(ffi.cast("float *", ptr(ffi, x, "char *") + 1), ub, 4) == invalid
    assert "src (address" in last_error(abi)
    assert lib.moe_sft_bf16_from_f32(fx, ffi.cast("uint16_t *", fx) + 2, 4) == invalid
    assert "src and dst overlap" in last_error(abi)
    assert lib.moe_sft_bf16_to_f32(ub, ffi.cast("float *", ub), 2) == invalid
    assert lib.moe_sft_bf16_to_f32(ub, fx, -5) == invalid and "n = -5" in last_error(abi)
    assert lib.moe_sft_bf16_to_f32(ffi.cast("uint16_t *", ptr(ffi, b, "char *") + 1), fx, 3) == invalid
    b[:] = 0x1234
    x[:] = 3.0
    assert lib.moe_sft_bf16_from_f32(fx, ub, 0) == lib.MOE_SFT_OK  # n = 0: nothing, NULLs allowed too
    assert lib.moe_sft_bf16_from_f32(ffi.NULL, ffi.NULL, 0) == lib.MOE_SFT_OK
    assert np.all(b == 0x1234) and np.all(x == 3.0)


# ---- torch, where it is installed ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_matches_torch_adamw_where_installed(abi, dtype):
    torch = pytest.importorskip("torch", reason="torch is not installed (pip install torch==2.13.0)")
    rng = np.random.default_rng(8)
    params = make_params(rng, np.float32 if dtype == "f32" else BF16)
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    max_norm = 1.5
    opt = Opt(abi, params, lr=hyper["lr"], beta1=0.9, beta2=0.99, weight_decay=0.05, max_grad_norm=max_norm)
    # torch's parameters are f32: the bf16 case's masters
    tparams = [torch.tensor(master_of(a).copy(), requires_grad=True) for a in params.values()]
    topt = torch.optim.AdamW(tparams, foreach=False, **hyper)
    for step in range(20):
        grads = make_grads(rng, params, scale=3.0)
        if step == 7:
            grads["gate_b"][1, 2, 0] = np.nan  # skipped here; torch is simply not stepped
        report = opt.step(grads)
        if step == 7:
            assert report.skipped == 1
            continue
        for t, g in zip(tparams, grads.values()):
            t.grad = torch.tensor(g)
        norm = torch.nn.utils.clip_grad_norm_(tparams, max_norm)
        assert report.grad_norm == pytest.approx(float(norm), rel=1e-5)
        topt.step()
    for i, (t, (name, a)) in enumerate(zip(tparams, params.items())):
        value = opt.state(i)[2] if dtype == "bf16" else a.ravel()
        np.testing.assert_allclose(value, t.detach().numpy().ravel(), rtol=1e-6, atol=1e-7, err_msg=name)
        m, v = opt.state(i)[:2]
        state = topt.state[t]
        np.testing.assert_allclose(m, state["exp_avg"].numpy().ravel(), rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(v, state["exp_avg_sq"].numpy().ravel(), rtol=1e-5, atol=1e-10)
