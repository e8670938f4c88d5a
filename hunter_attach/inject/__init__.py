"""Ways to run the bootstrap inside a target: gdb.py (ptrace, any process) and manhole.py."""
