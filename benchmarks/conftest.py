"""pytest-benchmark's machine record gets which CPU ran the cases and the instruction-set tier of each library."""

from ._device import cpu_line


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["fastdarts_cpu"] = cpu_line()


def pytest_report_header(config):
    return cpu_line()
