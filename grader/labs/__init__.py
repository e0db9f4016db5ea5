"""grader.labs: one module of checks per lab, named as the lab."""
