"""tools.aot_check: its parsers on known text, launch discovery, and one real build."""
import multiprocessing

from tools import aot_check

WGMMA = ("%acc_1 = ttng.warp_group_dot %x, %a {inputPrecision = 0 : i32} : !ttg.memdesc<64x64xbf16>"
         " * !ttg.memdesc<64x16xbf16> -> tensor<64x16xf32, #mma> loc(#loc1)\n"
         "%acc_2 = ttng.warp_group_dot_wait %acc_1 {pendings = 0 : i32} : tensor<64x16xf32, #mma>")
MMA_SYNC = ("%acc = tt.dot %a, %b, %c : tensor<64x64xbf16> * tensor<64x16xbf16> "
            "-> tensor<64x16xf32, #mma1>")
FMA = ("%acc = tt.dot %a, %b, %c : tensor<64x64xf32> * tensor<64x16xf32> "
       "-> tensor<64x16xf32, #blocked>")
TF32_MMA = ("%acc = tt.dot %x, %a, %c, inputPrecision = tf32 : tensor<64x64xf32, #ttg.dot_op<{"
            "opIdx = 0, parent = #mma, kWidth = 1}>> * tensor<64x16xf32, #ttg.dot_op<{opIdx = 1, "
            "parent = #mma, kWidth = 1}>> -> tensor<64x16xf32, #mma> loc(#loc95)")
TF32_WGMMA = ("%acc = ttng.warp_group_dot %x, %a, %c {inputPrecision = 0 : i32, isAsync = true} "
              ": !ttg.memdesc<64x64xf32, #shared, #smem, mutable> * !ttg.memdesc<64x16xf32, "
              "#shared1, #smem, mutable> -> tensor<64x16xf32, #mma> loc(#loc95)")


def _dots(**counts):
    return {"wgmma": 0, "mma": 0, "fma": 0, "fp32_tc": 0, "fp32_fma": 0, **counts}


def test_dots_are_classified_by_their_lowering():
    assert aot_check.classify_dots(WGMMA) == _dots(wgmma=1)
    assert aot_check.classify_dots(MMA_SYNC + "\n" + FMA) == _dots(mma=1, fma=1, fp32_fma=1)
    assert aot_check.classify_dots(TF32_MMA) == _dots(mma=1, fp32_tc=1)
    assert aot_check.classify_dots(TF32_WGMMA) == _dots(wgmma=1, fp32_tc=1)


def test_fp32_dots_are_checked_against_their_precision():
    no_tf32, tf32 = {"tf32": 0}, {"tf32": 4}
    ieee = aot_check.fp32_precision_of({"PRECISION": ("value", "ieee"),
                                        "LR_PRECISION": ("value", "tf32")})
    assert ieee == "ieee"
    assert aot_check.fp32_precision_of({"PRECISION": ("value", "tf32")}) == "tf32"
    # ieee: fp32 dots on CUDA cores, no TF32 instruction anywhere in the kernel
    assert aot_check.dot_problems(_dots(fma=1, fp32_fma=1, mma=1), no_tf32, "ieee") == []
    assert aot_check.dot_problems(_dots(mma=1, fp32_tc=1), tf32, "ieee") == [
        "1 ieee fp32 dot(s) on tensor cores", "4 TF32 instruction(s) in an ieee kernel"]
    # tf32: fp32 dots on tensor cores, as TF32 instructions
    assert aot_check.dot_problems(_dots(wgmma=2, fp32_tc=2), tf32, "tf32") == []
    assert aot_check.dot_problems(_dots(fma=1, fp32_fma=1), no_tf32, "tf32") == [
        "1 tf32 dot(s) on CUDA cores"]
    assert aot_check.dot_problems(_dots(mma=1, fp32_tc=1), no_tf32, "tf32") == [
        "tf32 dots without a TF32 instruction"]
    # 16-bit dots: tensor cores whatever the precision
    assert aot_check.dot_problems(_dots(fma=1), no_tf32, "tf32") == [
        "1 16-bit dot(s) on CUDA cores"]


def test_ptx_counts_and_ptxas_log():
    ptx = ("\twgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {...};\n"
           "\t@%p1 red.global.add.f32 [%rd1], %f1;\n"
           "\t@%p2 atom.global.acq_rel.add.f32 %f2, [%rd2], %f3;\n"
           "\tfma.rn.f32 %f4, %f5, %f6, %f7;\n"
           "\tcp.async.bulk.tensor.2d.shared::cluster.global [x];\n"
           "\tmma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {...};\n"
           "\twgmma.mma_async.sync.aligned.m64n8k8.f32.tf32.tf32 {...};\n")
    counts = aot_check.count_ptx(ptx)
    assert (counts["wgmma"], counts["red"], counts["atom"], counts["fma_f32"], counts["tma"]) == (
        2, 1, 1, 1, 1)
    assert counts["tf32"] == 2 and counts["mma_sync"] == 1
    log = ("    0 bytes stack frame, 1136 bytes spill stores, 1200 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers\n")
    assert aot_check.parse_ptxas_log(log) == (255, 1136)


def test_every_kernel_the_backend_launches_is_discovered():
    launches = aot_check.record_launches("bfloat16", "float32", 16, 0.1)
    kernels = {launch[1] for launch in launches}
    assert {"_project_kernel", "_fused_linear_kernel", "_grad_output_pass_kernel",
            "_grad_input_kernel", "_grad_a_kernel", "_grad_b_kernel",
            "_fused_linear_tma_kernel", "_fused_linear_4bit_kernel",
            "_grad_input_4bit_kernel"} <= kernels
    # DoRA's (triton_kernels/dora.py), with dropout on the two-accumulator configs; its pass
    # over G is the plain kernels' with the column scale, on DoRA's own configs
    dora = {launch[1]: launch[2] for launch in launches if launch[5].startswith("dora")}
    assert dora == {"_project_kernel": "skinny", "_dora_linear_kernel": "gemm_dual",
                    "_grad_output_pass_kernel": "grad_output_dora",
                    "_grad_b_kernel": "skinny", "_dora_grad_input_kernel": "gemm_dual",
                    "_grad_a_kernel": "skinny"}
    stored = [launch[4]["STORE_DROPPED"] for launch in launches
              if launch[1] == "_project_kernel"]
    assert ("value", True) in stored and ("value", False) in stored  # x̃ only for DoRA
    # without dropout, the persistent dx kernel too
    assert "_grad_input_tma_kernel" in {x[1] for x in aot_check.record_launches(
        "bfloat16", "float32", 16, 0.0)}
    families = {launch[2] for launch in launches}
    for generation in aot_check.TARGETS:
        for family in families:
            only = aot_check.TARGET_ONLY.get(family, (generation,))[0]
            assert bool(aot_check.family_configs(family, generation)) == (generation == only)


def test_fp32_bases_are_recorded_at_both_precisions():
    # An fp32 base launches every kernel with its fp32 config family and the precision torch's
    # TF32 setting gives (set for the recording, then restored); ieee keeps the persistent
    # kernels off (CUDA-core dots).
    import torch
    before = torch.backends.cuda.matmul.fp32_precision
    ieee = aot_check.record_launches("float32", "float32", 16, 0.0, "ieee")
    tf32 = aot_check.record_launches("float32", "float32", 16, 0.0, "tf32")
    assert torch.backends.cuda.matmul.fp32_precision == before
    # (DoRA's launches add the fp32 lists of its own families, the 4-bit GEMMs gemm_4bit*_fp32)
    extra = {"gemm_dora_fp32", "grad_output_dora_fp32", "gemm_4bit_fp32", "gemm_4bit_dx_fp32"}
    assert {launch[2] for launch in ieee} == {"gemm_fp32", "skinny_fp32", "grad_output_fp32",
                                              *extra}
    assert {launch[2] for launch in tf32} == {"gemm_fp32", "skinny_fp32", "grad_output_fp32",
                                              "gemm_tma", *extra}
    assert {aot_check.fp32_precision_of(launch[4]) for launch in ieee} == {"ieee"}
    assert {aot_check.fp32_precision_of(launch[4]) for launch in tf32} == {"tf32"}
    points = {job[5].split(" ", 1)[1] for job in aot_check._plan(_args())
              if job[2].endswith("_fp32")}
    assert points == {"floa/floa r=128 p=0.1 tf32"}


def _args(**kwargs):
    import argparse
    return argparse.Namespace(**{**dict(quick=False, full=False, arch=["sm90", "sm80"],
                                        every_target=False, only=set(), skipped=set()),
                                 **kwargs})


def test_a_real_build_compiles_for_sm90_without_a_gpu():
    # A fresh process: the kernels must be compiled, not interpreted (conftest sets the
    # interpreter for this one).
    launch = next(x for x in aot_check.record_launches("bfloat16", "bfloat16", 16, 0.0)
                  if x[1] == "_project_kernel")
    module, name, family, args, kwargs, case = launch
    config = aot_check.family_configs(family, "sm90")[0]
    job = (module, name, family, args, kwargs, case, "sm90", config)
    with multiprocessing.get_context("spawn").Pool(1, initializer=aot_check._worker_init) as pool:
        build = pool.apply(aot_check.check_build, (job,))
    assert build.error == ""
    assert 0 < build.registers <= 255
    assert build.shared_bytes > 0
    assert sum(build.dots.values()) >= 1


def test_a_persistent_build_uses_tma_and_wgmma():
    launch = next(x for x in aot_check.record_launches("bfloat16", "float32", 16, 0.0)
                  if x[1] == "_grad_input_tma_kernel")
    module, name, family, args, kwargs, case = launch
    config = aot_check.family_configs(family, "sm90")[-1]  # the smallest tile: fastest build
    job = (module, name, family, args, kwargs, case, "sm90", config)
    with multiprocessing.get_context("spawn").Pool(1, initializer=aot_check._worker_init) as pool:
        build = pool.apply(aot_check.check_build, (job,))
    assert build.problems == [] and build.error == ""
    assert build.ptx["tma"] > 0 and build.dots["wgmma"] >= 2 and build.spill_bytes == 0


def test_an_ieee_fp32_build_stays_off_tf32():
    launch = next(x for x in aot_check.record_launches("float32", "float32", 16, 0.0, "ieee")
                  if x[1] == "_project_kernel")
    module, name, family, args, kwargs, case = launch
    job = (module, name, family, args, kwargs, case, "sm80",
           aot_check.family_configs(family, "sm80", "float32")[0])
    with multiprocessing.get_context("spawn").Pool(1, initializer=aot_check._worker_init) as pool:
        build = pool.apply(aot_check.check_build, (job,))
    assert build.problems == [] and build.error == ""
    assert build.dots["fp32_fma"] == 1 and build.ptx["tf32"] == 0


def test_sass_integer_pattern():
    sass = ("        /*0090*/                   IMAD.WIDE.U32 R2, R5, -0x2d4a91f1, RZ ;\n"
            "        /*00a0*/                   LOP3.LUT R7, R2, R9, R6, 0x96, !PT ;\n"
            "        /*00b0*/              @!P0 IADD3 R4, R4, 0x1, RZ ;\n"
            "        /*00c0*/                   FFMA R1, R2, R3, R4 ;\n")
    assert len(aot_check._SASS_INT.findall(sass)) == 3
