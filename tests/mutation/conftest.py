# tests/mutation/run.py plants bugs and runs pytest itself; nothing here is a test.
collect_ignore_glob = ["*.py"]
