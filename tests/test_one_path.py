"""One path for every call (issue 31): DoRA and a 4-bit base are operands of the one operator, so
they trace under torch.compile(fullgraph=True) like a plain call and give the eager result and
gradients; the walk of x from LowRankLinear.forward to a Triton kernel passes each file once."""
import os
import sys

import pytest
import torch
from torch import nn

import lowrank_fused as lf
from lowrank_fused import stats

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton_here = pytest.mark.skipif(
    DEVICE == "cpu" and not INTERPRETED, reason="needs a GPU or TRITON_INTERPRET=1")
K, N, R = 40, 24, 4


def _leaves(dtype=torch.float32, *, bias=True, train_a=True, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)

    def t(*shape, grad, scale=1.0, shift=0.0):
        v = torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift
        return v.to(dtype).to(device).requires_grad_(grad)

    return dict(x=t(2, 5, K, grad=True), weight=t(N, K, grad=False, scale=K ** -0.5),
                bias=t(N, grad=True) if bias else None,
                lora_a=t(R, K, grad=train_a, scale=K ** -0.5),
                lora_b=t(N, R, grad=True, scale=R ** -0.5),
                magnitude=t(N, grad=True, scale=0.2, shift=1.0))


def _run(fn, leaves, weight=None):
    """y and the gradient of every leaf that requires grad."""
    y = fn(leaves, weight)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(y)
    names = [n for n, t in leaves.items() if t is not None and t.requires_grad]
    grads = torch.autograd.grad(y, [leaves[n] for n in names], grad)
    return dict(y=y.detach(), **{f"d{n}": g for n, g in zip(names, grads)})


def _compare_compiled(call, leaves, weight=None, exact=True):
    """The eager call against torch.compile(fullgraph=True) of it (AOTAutograd traces the custom
    ops and their autograd formula), outputs and every gradient."""
    torch._dynamo.reset()
    want = _run(call, leaves, weight)
    got = _run(torch.compile(call, backend="aot_eager", fullgraph=True), leaves, weight)
    assert set(got) == set(want)
    for name in want:
        if exact:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
        else:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=name)


def _dora(backend, p=0.0):
    def call(leaves, weight):
        return lf.low_rank_linear(leaves["x"], leaves["weight"] if weight is None else weight,
                                  leaves["lora_a"], leaves["lora_b"], bias=leaves["bias"],
                                  scaling=1.5, dropout_p=p, dropout_seed=7, backend=backend,
                                  magnitude=leaves["magnitude"])
    return call


def _plain(backend, p=0.0):
    def call(leaves, weight):
        return lf.low_rank_linear(leaves["x"], leaves["weight"] if weight is None else weight,
                                  leaves["lora_a"], leaves["lora_b"], bias=leaves["bias"],
                                  scaling=1.5, dropout_p=p, dropout_seed=7, backend=backend)
    return call


def _params4bit(weight, quant_type="nf4", nested=False):
    bnb = pytest.importorskip("bitsandbytes")
    return bnb.nn.Params4bit(weight.detach().cpu().clone(), requires_grad=False,
                             quant_type=quant_type, blocksize=64,
                             compress_statistics=nested).to(weight.device)


# ---- torch.compile(fullgraph=True): DoRA and a 4-bit base trace whole ----

@pytest.mark.parametrize("p", [0.0, 0.2], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("train_a", [True, False], ids=["dora", "dora_fa"])
def test_dora_compiles_fullgraph_to_the_eager_result(p, bias, train_a):
    leaves = _leaves(bias=bias, train_a=train_a, device="cpu")
    _compare_compiled(_dora("reference", p), leaves)


@pytest.mark.parametrize("method", ["lora", "lora_fa"])
@pytest.mark.parametrize("quant_type,nested", [("nf4", False), ("fp4", True)],
                         ids=["nf4", "fp4_nested"])
def test_4bit_compiles_fullgraph_to_the_eager_result(method, quant_type, nested):
    leaves = _leaves(train_a=method == "lora", device="cpu")
    del leaves["magnitude"]
    weight = _params4bit(leaves["weight"], quant_type, nested)
    _compare_compiled(_plain("reference", 0.1), leaves, weight)


def test_qdora_compiles_fullgraph_to_the_eager_result():
    leaves = _leaves(device="cpu")
    weight = _params4bit(leaves["weight"], "nf4", True)
    _compare_compiled(_dora("reference", 0.1), leaves, weight)


def test_a_layer_of_each_kind_compiles_with_inductor():
    """LowRankLinear with DoRA, and over a bitsandbytes Linear4bit, under the default backend."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    base4 = bnb.nn.Linear4bit(K, N, compute_dtype=torch.float32, quant_type="nf4")
    base4.weight = bnb.nn.Params4bit(torch.randn(N, K) * K ** -0.5, requires_grad=False,
                                     quant_type="nf4")
    base4 = base4.to("cpu")
    layers = [lf.LowRankLinear(K, N, R, dora=True),
              lf.LowRankLinear.from_linear(base4, R, "lora")]
    for layer in layers:
        with torch.no_grad():
            layer.lora_b.normal_(0, 0.1)
        x = torch.randn(3, K, requires_grad=True)
        torch._dynamo.reset()
        compiled = torch.compile(layer, fullgraph=True)
        y_c = compiled(x)
        y_c.square().sum().backward()
        grads_c = [t.grad.clone() for t in (x, *layer.parameters()) if t.requires_grad]
        for t in (x, *layer.parameters()):
            t.grad = None
        y_e = layer(x)
        y_e.square().sum().backward()
        torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
        grads_e = [t.grad for t in (x, *layer.parameters()) if t.requires_grad]
        for gc, ge in zip(grads_c, grads_e):
            torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-4)


@needs_triton_here
def test_dora_and_4bit_compile_fullgraph_on_triton():
    """The same on the Triton backend (the interpreter without a GPU): the kernels run inside
    the custom ops, the compiled result is the eager one."""
    leaves = _leaves()
    _compare_compiled(_dora("triton", 0.2), leaves, exact=False)
    del leaves["magnitude"]
    weight = _params4bit(leaves["weight"], "fp4", True)
    _compare_compiled(_plain("triton", 0.2), leaves, weight, exact=False)


def test_dora_and_4bit_calls_are_counted_under_compile_without_recompiles():
    leaves = _leaves(device="cpu")
    weight4 = _params4bit(leaves["weight"])
    frames = []

    def backend(gm, example_inputs):
        frames.append(gm)
        return gm.forward

    def call(x):
        y = lf.low_rank_linear(x, leaves["weight"], leaves["lora_a"], leaves["lora_b"],
                               magnitude=leaves["magnitude"], name="dora")
        return y + lf.low_rank_linear(x, weight4, leaves["lora_a"], leaves["lora_b"],
                                      name="4-bit")

    torch._dynamo.reset()
    stats.reset(["dora", "4-bit"])
    compiled = torch.compile(call, backend=backend, fullgraph=True)
    for _ in range(5):
        compiled(leaves["x"]).sum().backward()
    got = stats.snapshot()
    assert got["dora"] == got["4-bit"] == {"reference": {"forward": 5, "backward": 5}}
    assert len(frames) == 1


# ---- the walk of x: each file once ----

def _walk(layer, x):
    """For each Triton launcher called from the package: the package files on the stack (each
    run of frames in one file counted once), outermost first; and, for each package file entered
    from another during the forward, the package files it was entered from."""
    root = os.path.dirname(lf.__file__) + os.sep
    kernels = os.sep + "triton_kernels" + os.sep
    launches, parents = [], {}

    def package_file(frame):
        name = frame.f_code.co_filename
        return name[len(root):] if name.startswith(root) and kernels not in name else None

    def profile(frame, event, arg):
        if event != "call":
            return
        caller = package_file(frame.f_back) if frame.f_back else None
        if kernels in frame.f_code.co_filename and caller is not None:
            stack, f = [], frame.f_back
            while f is not None:
                name = package_file(f)
                if name is not None and (not stack or stack[-1] != name):
                    stack.append(name)
                f = f.f_back
            launches.append(stack[::-1])
        name = package_file(frame)
        if name is not None and caller is not None and caller != name:
            parents.setdefault(name, set()).add(caller)

    sys.setprofile(profile)
    try:
        layer(x)
    finally:
        sys.setprofile(None)
    return launches, parents


@needs_triton_here
@pytest.mark.parametrize("kind", ["plain", "dora", "4-bit"])
def test_the_walk_from_the_layer_to_a_kernel_passes_each_file_once(kind):
    torch.manual_seed(0)
    if kind == "4-bit":
        bnb = pytest.importorskip("bitsandbytes")
        base = bnb.nn.Linear4bit(K, N, compute_dtype=torch.float32).to(DEVICE)
        layer = lf.LowRankLinear.from_linear(base, R, "lora", backend="triton")
    else:
        layer = lf.LowRankLinear(K, N, R, backend="triton", dora=kind == "dora", device=DEVICE)
    x = torch.randn(6, K, device=DEVICE)
    layer(x)  # first use: imports, the first-use check's key
    launches, parents = _walk(layer, x)
    path = ["layer.py", "functional.py", "ops.py", "verification.py", "backends/triton.py"]
    path = [p.replace("/", os.sep) for p in path]
    assert launches and all(stack == path for stack in launches), launches
    # every file is entered from one other (the env reader aside: a leaf both dispatch and
    # verification read through)
    shared = {"_env.py"}
    assert {name: p for name, p in parents.items() if len(p) > 1 and name not in shared} == {}
    assert parents["dispatch.py"] == {"ops.py"} and parents["verification.py"] == {"ops.py"}


# ---- LowRankLinear's calls carry its name ----

def test_layers_made_by_apply_low_rank_count_under_their_names():
    model = nn.Sequential(nn.Linear(K, N), nn.ReLU(), nn.Linear(N, 8))
    lf.apply_low_rank(model, ["0", "2"], R, dora=True)
    stats.reset(["0", "2"])
    model(torch.randn(3, K)).sum().backward()
    got = stats.snapshot()
    assert got["0"] == got["2"] == {"reference": {"forward": 1, "backward": 1}}
    assert lf.LowRankLinear(K, N, R).name is None
