"""benchmarks/test_memory.py's peak-memory measurement: warm-up first, then the peak reset."""
from tools.peak_memory import peak_extra_bytes


class FakeCuda:
    """torch.cuda's memory counters, with a log of what was called when."""

    def __init__(self, log):
        self.log, self.allocated, self.peak = log, 100, 100

    def synchronize(self):
        self.log.append("synchronize")

    def reset_peak_memory_stats(self):
        self.log.append("reset_peak")
        self.peak = self.allocated

    def memory_allocated(self):
        return self.allocated

    def max_memory_allocated(self):
        return self.peak


def test_peak_is_measured_after_a_warm_up_call():
    log = []
    cuda = FakeCuda(log)
    calls = []

    def step():
        calls.append(len(calls))
        log.append("step")
        # the first call also holds an autotuner's trial buffers (1000 bytes); each holds 10
        cuda.peak = max(cuda.peak, cuda.allocated + (1000 if len(calls) == 1 else 10))

    assert peak_extra_bytes(step, cuda) == 10  # the warm-up's trial buffers are not counted
    assert log == ["step", "synchronize", "reset_peak", "step", "synchronize"]
