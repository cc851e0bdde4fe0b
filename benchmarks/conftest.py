"""The benchmark cases run in a process set up as the command-line runs' (_device.prepare_process); pytest-benchmark's
machine record gets which CPU ran them and the instruction-set tier of each library."""

from ._device import cpu_line, prepare_process


def pytest_configure(config):
    prepare_process()


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["fastdarts_cpu"] = cpu_line()


def pytest_report_header(config):
    return cpu_line()
