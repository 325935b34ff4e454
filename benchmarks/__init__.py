"""madness_ppl's benchmark suite: one module per study, run with ``python -m benchmarks <study>``.

Each study module has a one-line summary (its docstring's first line), a ``main(argv)`` that
parses its own arguments, writes ``results/<name>.{json,md}`` (stamped with the code commit,
package versions and machine by :func:`benchmarks._common.write_results`) and a ``SMOKE``
argument list: the same study on one tiny field, which ``python -m benchmarks --smoke`` runs
into a scratch results directory (CI runs every study that way).
"""
