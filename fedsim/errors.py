"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class FedsimError(Exception):
    """Bad input or an unusable environment, reported to the user without a traceback.

    The message is one line that names the problem and the fix, e.g.
    ``"data.alpha must be > 0 (got -1.0); set a positive Dirichlet alpha such as 0.5"``.
    """
