"""The benchmarks behind ``tools/bench_*.py`` and ``tools/estimate_memory.py``, one module each.

``encode`` (the encode modes' speed; what it times in ``encode_timing``), ``train`` (plain against
GradCache steps; ``train_step`` measures one configuration, ``train_report`` sums them up), ``memory``
(a backbone's weight dtypes), ``data`` (the input pipeline against a training step), ``memory_model``
(the single-GPU memory model) and ``memory_probe`` (the CPU measurement that checks it). ``common`` holds
their fixed inputs, ``process_memory`` the Linux process-memory probes. Each benchmark's ``main(argv)``
is its command line. The submodules are not imported here, so that ``python -m
lame_pl.benchmarks.train`` (or ``.memory``: a benchmark's child process) runs its module once.
"""
