"""Tools that are not benchmarks: the AOT compile gate (aot_check), the GPU-session driver
(gpu_session.sh, first, probe, the one timer timing, prepare_bitsandbytes), the traffic model
(model), the report (report, matrix_report), the model-level harness (model_level), the
contenders the suites compare (layers), PEFT's conformance runner (peft_upstream,
peft_served_plugin), and the shipped tuning table's writer (tuning_table)."""
