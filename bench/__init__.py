"""Benchmarks of cachesaver-dist against the original single-process CacheSaver (issue #4).

Nothing here is imported by the package. Modules that the original's venv runs
(``_original``, ``workloads``) import only the standard library and ``cachesaver``.
"""
