"""Tools that are not benchmarks: the AOT compile gate (aot_check), the GPU-session driver
(gpu_session.sh, first, probe), the traffic model (model), the report, the model-level harness
(model_level), the contenders the suites compare (layers), and PEFT's conformance runner
(peft_upstream, peft_served_plugin)."""
