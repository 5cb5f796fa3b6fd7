"""benchmarks.aot_check: its parsers on known text, launch discovery, and one real build."""
import multiprocessing

from benchmarks import aot_check

WGMMA = ("%acc_1 = ttng.warp_group_dot %x, %a {inputPrecision = 0 : i32} : !ttg.memdesc<64x64xbf16>"
         " * !ttg.memdesc<64x16xbf16> -> tensor<64x16xf32, #mma> loc(#loc1)\n"
         "%acc_2 = ttng.warp_group_dot_wait %acc_1 {pendings = 0 : i32} : tensor<64x16xf32, #mma>")
MMA_SYNC = ("%acc = tt.dot %a, %b, %c : tensor<64x64xbf16> * tensor<64x16xbf16> "
            "-> tensor<64x16xf32, #mma1>")
FMA = ("%acc = tt.dot %a, %b, %c : tensor<64x64xf32> * tensor<64x16xf32> "
       "-> tensor<64x16xf32, #blocked>")


def test_dots_are_classified_by_their_lowering():
    assert aot_check.classify_dots(WGMMA) == {"wgmma": 1, "mma": 0, "fma": 0}
    assert aot_check.classify_dots(MMA_SYNC + "\n" + FMA) == {"wgmma": 0, "mma": 1, "fma": 1}


def test_ptx_counts_and_ptxas_log():
    ptx = ("\twgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {...};\n"
           "\t@%p1 red.global.add.f32 [%rd1], %f1;\n"
           "\t@%p2 atom.global.acq_rel.add.f32 %f2, [%rd2], %f3;\n"
           "\tfma.rn.f32 %f4, %f5, %f6, %f7;\n"
           "\tcp.async.bulk.tensor.2d.shared::cluster.global [x];\n")
    counts = aot_check.count_ptx(ptx)
    assert (counts["wgmma"], counts["red"], counts["atom"], counts["fma_f32"], counts["tma"]) == (
        1, 1, 1, 1, 1)
    log = ("    0 bytes stack frame, 1136 bytes spill stores, 1200 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers\n")
    assert aot_check.parse_ptxas_log(log) == (255, 1136)


def test_every_kernel_the_backend_launches_is_discovered():
    launches = aot_check.record_launches("bfloat16", "float32", 16, 0.1)
    kernels = {launch[1] for launch in launches}
    assert {"_project_kernel", "_fused_linear_kernel", "_grad_output_pass_kernel",
            "_grad_input_kernel", "_grad_a_kernel", "_grad_b_kernel",
            "_fused_linear_tma_kernel"} <= kernels
    # without dropout, the persistent dx kernel too
    assert "_grad_input_tma_kernel" in {x[1] for x in aot_check.record_launches(
        "bfloat16", "float32", 16, 0.0)}
    families = {launch[2] for launch in launches}
    for generation in aot_check.TARGETS:
        for family in families:
            only = aot_check.TARGET_ONLY.get(family, (generation,))[0]
            assert bool(aot_check.family_configs(family, generation)) == (generation == only)


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


def test_sass_integer_pattern():
    sass = ("        /*0090*/                   IMAD.WIDE.U32 R2, R5, -0x2d4a91f1, RZ ;\n"
            "        /*00a0*/                   LOP3.LUT R7, R2, R9, R6, 0x96, !PT ;\n"
            "        /*00b0*/              @!P0 IADD3 R4, R4, 0x1, RZ ;\n"
            "        /*00c0*/                   FFMA R1, R2, R3, R4 ;\n")
    assert len(aot_check._SASS_INT.findall(sass)) == 3
