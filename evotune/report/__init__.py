"""Reading a run back: curves (``evotune plot``) and a one-screen summary (``evotune report``).

Only the files a run leaves in its work dir are read, so both commands work on a
finished run, a killed one and one that is still writing.
"""

from .records import RunRecords, read_records
from .summary import format_summary, summarize

__all__ = ["RunRecords", "format_summary", "read_records", "summarize"]
