"""The one exception type that the command line turns into a clean error message."""


class ErasureError(Exception):
    """A problem the user can fix: bad config, wrong path, mismatched mask, missing data.

    The message names the problem and the fix; the CLI prints it and exits non-zero
    without a traceback.
    """
