"""JupyterHub configuration of the inferlab classroom hub (compose `hub` service, tests).

Everything is read from INFERLAB_HUB_* environment variables by `grader.hub.configure`,
which checks them before the hub starts: see its docstring, or docs/infra.md.

    jupyterhub -f infra/hub/jupyterhub_config.py
"""

from grader.hub import configure

c = get_config()  # noqa: F821 (provided by JupyterHub when it loads this file)
configure(c)
