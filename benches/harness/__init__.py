"""The harness behind benches/run.py, one idea a module:

    common     paths, BenchError, log
    prepare    build the load client, check the Python side, record machine and build
    processes  a benchmark server, the load client, /proc and CPU-clock readings
    workloads  B1, E1, L1, M1, HELLO, DISPATCH: parameters and one run of each
    report     the markdown report, the targets, the per-run progress line
"""
