"""tools.model: the traffic model's arithmetic on hand-counted passes."""
import pytest

from tools import model

M, K, N, R = 8192, 4096, 4096, 16


def case(method="lora_fa", dropout=False, **kw):
    return model.Case(method, M, K, N, R, dropout, **kw)


def test_bare_linear_ratio_is_one():
    code, hw = model.Code(), model.Hardware()
    c = case()
    lines = model.table(code, hw).splitlines()
    # A frozen Linear costs two GEMMs fwd+bwd, one fwd: the table's bare column says so.
    fwd, both = (float(line.split("|")[6]) for line in lines[2:4])
    assert both / fwd == pytest.approx(2.0, rel=1e-2)
    # Forward: one GEMM at the assumed cuBLAS rate (compute-bound), plus a launch.
    assert model.predict("bare", c, code, hw, False) == pytest.approx(
        2 * M * N * K / 700e12 + 4e-6)


def test_known_passes_move_hand_counted_bytes():
    code = model.Code()
    seq = {p.name: p for p in model.triton_backend(case(), code, backward=True)}
    # project reads x (bf16) and A (fp32), writes P (fp32)
    assert seq["project"].bytes == 2 * M * K + 4 * (R * K + M * R)
    # fused_linear: x, W, y in bf16, P and B_eff in fp32
    assert seq["fused_linear"].bytes == 2 * (M * K + N * K + M * N) + 4 * (M * R + N * R)
    # one read of G, B_eff and P; dP written in fp32
    assert seq["grad_output_pass"].bytes == 2 * M * N + 4 * (N * R + M * R) + 4 * M * R
    assert seq["grad_output_pass"].atomics == {"red": M / 64 * N * R}
    assert "grad_a" not in seq  # LoRA-FA never needs dA
    peft = {p.name: p for p in model.peft_lora(case(), code, backward=False)}
    assert peft["y + lora"].bytes == 3 * 2 * M * N


def test_cuda_passes_run_on_the_units_of_the_kernels():
    # csrc over a 16-bit base: every rank pass on tensor cores, fp32 adapters rounded at load;
    # over an fp32 base, CUDA cores; atomicAdd compiles to RED
    def units(c, code=model.Code()):
        return {p.name: set(p.flops) for p in model.cuda_backend(c, code, backward=True)}
    on_bf16 = units(case("lora", dropout=True))
    for name in ("project", "grad_output_pass", "dropped_low_rank", "grad_a"):
        assert on_bf16[name] == {"tc"}, name
    on_fp32 = units(case("lora", dropout=True, base_bytes=4))
    assert on_fp32["grad_a"] == on_fp32["dropped_low_rank"] == {"fma"}
    old = model.Code(cuda_fp32_adapter_unit="fma", cuda_grad_a_unit="fma",
                     cuda_dropout_term_unit="fma")
    assert units(case("lora"), old)["project"] == {"fma"}
    assert units(case("lora", adapter_bytes=2), old)["project"] == {"tc"}  # 16-bit adapters
    seq = {p.name: p for p in model.cuda_backend(case(), model.Code(), backward=True)}
    assert seq["grad_output_pass"].atomics == {"red": M / 64 * N * R}


def test_memory_bound_pass_time_and_launch():
    hw = model.Hardware(hbm_tb_s=1.0, launch_us=10.0)
    p = model.Pass("copy", bytes=1e9)
    assert model.pass_time(p, hw) == pytest.approx(1e-3 + 10e-6)


def test_a_kernel_change_is_one_field():
    hw = model.Hardware()
    before = model.predict("triton", case(), model.Code(triton_fp32_adapter_unit="fma",
                                                       triton_atomic="atom"), hw, True)
    after = model.predict("triton", case(), model.Code(), hw, True)
    assert after < before
    code, hw2 = model._apply(["triton_gemm_efficiency=0.5", "triton_db_memset=false"],
                             model.Code(), hw)
    assert hw2.triton_gemm_efficiency == 0.5 and code.triton_db_memset is False


def test_table_has_every_case_and_cli_runs(capsys):
    assert model.main(["--after", "triton_atomic=atom"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 4096")]
    assert len(rows) == 2 * 2 * 3 * 2 * 2  # shapes 4096*, r, method, dropout, direction
    assert "→" in out


def test_a_4bit_base_reads_packed_w_and_pays_its_dequantization():
    code, hw = model.Code(), model.Hardware()
    seq = {p.name: p for p in model.triton_backend(case(quant="nf4"), code, backward=True)}
    # W read as N·K/2 packed bytes plus one fp32 absmax per 64 elements, no dense W
    w_bytes = N * K * (0.5 + 4 / 64)
    assert seq["fused_linear_4bit"].bytes == 2 * (M * K + M * N) + w_bytes + 4 * (M * R + N * R)
    # dequantized once per BLOCK_M rows, in both GEMMs
    ops = (M // code.dequant_block_m) * N * K * code.dequant_ops
    assert seq["fused_linear_4bit"].issue_ops == seq["grad_input_4bit"].issue_ops == ops
    ratio = model.qlora_ratio(code, hw)
    # serial: the dequantization adds to the GEMMs; overlapped: each GEMM the longer of the two
    assert 1.0 < ratio["ratio_overlapped"] < ratio["ratio_serial"]
    assert ratio["dense_ms"] == pytest.approx(model.predict("triton", case(), code, hw, True) * 1e3)
# --- DoRA rows -------------------------------------------------------------------------------

def _small_dora(method="lora_fa", dropout=False):
    # M = 128 tokens, K = 64, N = 32, r = 4; bf16 base (2 bytes), fp32 adapters (4 bytes)
    return model.Case(method, 128, 64, 32, 4, dropout)


def test_fused_dora_passes_move_hand_counted_bytes():
    code = model.Code()
    seq = {p.name: p for p in model.fused_dora(_small_dora(), code, backward=True)}
    # norm from cached terms: ‖W‖² (N fp32), W·Aᵀ (N x r fp32), A (r x K), B (N x r), c written:
    # 128 + 512 + 1024 + 512 + 128
    assert seq["DoRA norm, c (cached ‖W‖², W·Aᵀ)"].bytes == 2304
    # P = x·Aᵀ: x 128 x 64 bf16 (16384), A 4 x 64 fp32 (1024), P 128 x 4 fp32 (2048)
    assert seq["project"].bytes == 16384 + 1024 + 2048
    # x (16384) + W 32 x 64 (4096) + y 128 x 32 (8192) in bf16, P (2048) + B (512) fp32, c (128)
    assert seq["fused_linear (c in the epilogue)"].bytes == 16384 + 4096 + 8192 + 2048 + 512 + 128
    # G and y (8192 each), B (512), P (2048), dP written (2048), dm (128); atomics: 2 row
    # blocks of 64, each adding dB (32 x 4) and dm (32)
    gop = seq["grad_output_pass (c on load, dm)"]
    assert gop.bytes == 8192 + 8192 + 512 + 2048 + 2048 + 128
    assert gop.atomics == {"red": 2 * (32 * 4 + 32)}
    # G (8192), W (4096), dx (16384) in bf16, dP (2048), A (1024), c (128)
    assert seq["grad_input (c on load)"].bytes == 8192 + 4096 + 16384 + 2048 + 1024 + 128
    assert "grad_a" not in seq
    # A trainable: W·Aᵀ is recomputed, one more read of W (4096), and dA reads x
    train = {p.name: p for p in model.fused_dora(_small_dora("lora"), code, backward=True)}
    assert train["DoRA norm, c (W·Aᵀ fresh)"].bytes == 2304 + 4096
    assert train["grad_a"].bytes == 16384 + 2048 + 1024


def test_fused_dora_dropout_doubles_the_gemm_not_the_reads():
    code = model.Code()
    seq = {p.name: p for p in model.fused_dora(_small_dora(dropout=True), code, backward=True)}
    # the P pass also writes x̃ (16384 more); the GEMM reads x and x̃, writes y and Z
    assert seq["project (+ x̃ written)"].bytes == 2 * 16384 + 1024 + 2048
    fwd = seq["fused_linear, 2 accumulators (y, Z)"]
    assert fwd.bytes == 2 * 16384 + 4096 + 2 * 8192 + 2048 + 512 + 128
    assert fwd.flops["gemm"] == 2 * (2 * 128 * 32 * 64)
    bwd = seq["grad_input, 2 accumulators (G·W, ((c − 1) ⊙ G)·W)"]
    assert bwd.flops["gemm"] == 2 * (2 * 128 * 32 * 64)
    assert bwd.bytes == 8192 + 4096 + 16384 + 2048 + 1024 + 128


def test_peft_dora_passes_move_hand_counted_bytes():
    code = model.Code()
    seq = {p.name: p for p in model.peft_dora(_small_dora(), code, backward=True)}
    # the dense B·A through an identity: eye(64) in bf16, then two skinny products
    assert seq["eye(K)"].bytes == 2 * 64 * 64
    assert seq["lora_B(·) = (B·A)ᵀ"].bytes == 2 * (64 * 4 + 32 * 4 + 64 * 32)
    assert seq["W + s·B·A"].bytes == 3 * 2 * 32 * 64
    # every M x N elementwise pass: 128 x 32 bf16 = 8192 bytes per tensor read or written
    assert seq["(c − 1) * base"].bytes == 2 * 8192
    assert seq["result + result_dora"].bytes == 3 * 8192
    forward = sum(p.bytes for p in model.peft_dora(_small_dora(), code, backward=False)
                  if p.name in ("(c − 1) * base", "c * lora", "* scaling", "+ (result_dora)",
                                "result + result_dora"))
    assert forward == (2 + 2 + 2 + 3 + 3) * 8192
    assert seq["dx = G'·W"].bytes == 8192 + 4096 + 16384
    with_dropout = [p.name for p in model.peft_dora(_small_dora(dropout=True), code, True)
                    if p.flops.get("gemm")]
    assert with_dropout == ["F.linear", "F.linear(x̃, W)", "dx̃ += dbase·W", "dx = G·W"]


def test_dora_predictions_and_table():
    code, hw = model.Code(), model.Hardware()
    c = model.Case("lora_fa", M, K, N, R, False)
    bare = model.predict_dora("bare", c, code, hw, True)
    fused = model.predict_dora("fused", c, code, hw, True)
    peft = model.predict_dora("peft", c, code, hw, True)
    assert bare < fused < peft
    # dropout: PEFT's rule needs x̃·Wᵀ, so the fused design runs twice the GEMM FLOPs
    d = model.Case("lora_fa", M, K, N, R, True)
    assert model.predict_dora("fused", d, code, hw, True) > 1.9 * bare
    assert model.main(["--dora"]) == 0
    rows = [line for line in model.dora_table(code, hw).splitlines() if line.startswith("| 4096")]
    assert len(rows) == 2 * 2 * 2 * 2  # shapes 4096*, r, method (lora, lora_fa), dropout
