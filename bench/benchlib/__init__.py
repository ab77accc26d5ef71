"""What the bench scripts share and what is not their timing harness: model shapes, data, FLOP and
memory measurement (``common``) and ``bench_train.py``'s report (``train_report``).

A package rather than modules beside the scripts: every ``bench/*.py`` is a script that answers
``--help`` (``tests/test_bench.py``), and these modules are not scripts."""
