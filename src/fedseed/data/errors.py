"""The one exception the data package raises.

Every data problem (a missing file, a malformed line, a bad argument) is reported as
:class:`DataError` so callers can catch data mistakes apart from bugs. Messages name
the file, line and field involved and say how to fix the problem.
"""

from __future__ import annotations


class DataError(ValueError):
    """A data file or a data argument is wrong; the message says where and how to fix it.

    It subclasses ``ValueError`` because every case is a bad value supplied by the user
    (a path, a file's content, a partition argument), not a failure of the program.
    """
