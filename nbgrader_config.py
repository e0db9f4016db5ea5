"""nbgrader configuration: this repository is the nbgrader course.

solutions/<lab>/<lab>.ipynb  nbgrader sources: solution regions, public and hidden tests, points
labs/<lab>/                  the generated learner release, committed (`inferlab release`)
"""

c = get_config()  # noqa: F821 (provided by nbgrader/traitlets when this file is loaded)

c.CourseDirectory.course_id = "inferlab"
c.CourseDirectory.source_directory = "solutions"
c.CourseDirectory.release_directory = "labs"
# Reference code and sample submissions live outside solutions/<lab>/, because nbgrader
# copies every non-notebook file of a source folder into the release.
c.CourseDirectory.ignore = [".ipynb_checkpoints", "*.pyc", "__pycache__", "feedback", ".*"]
c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}
