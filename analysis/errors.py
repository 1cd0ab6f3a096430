"""The exception analysis raises for unusable input (analysis never imports fedsim)."""


class AnalysisError(Exception):
    """A path, table or argument analysis cannot use; the message is one line naming the problem
    and the fix. ``fedsim report`` turns it into ``fedsim.errors.FedsimError`` (exit code 2)."""


class MixedRunsWarning(UserWarning):
    """:func:`analysis.over_seeds` pooled runs that differ in more than the seed, or repeat a seed:
    the mean ± std it returns is not a spread over seeds. The message names what differs."""
