"""grader: the autograding system and the `inferlab` command line.

The Python API is the source of truth; `grader.cli` is a thin layer over it.
"""
