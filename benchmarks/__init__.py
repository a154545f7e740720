"""Benchmarks: ``make bench`` runs every ``benchmarks/bench_*.py`` module's ``main()``.

Each prints what it measured on this machine, as ratios against a baseline run in the
same process. Speed targets live here, never in timed unit tests.
"""
