"""Test support: what tests, the demo and the benchmarks share to start `mesh serve` and run the `mesh` CLI.

It lives under tests/, not in the installed `mesh` package: an operator's install has no use for it.
"""
