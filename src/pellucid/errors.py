"""The one error type that front doors show as a clean message instead of a traceback."""


class PellucidError(Exception):
    """Bad input or an unmet requirement, explained in one paragraph for a person.

    `param` names the offending field where there is one (the HTTP server puts it in the
    error body); `status` is the HTTP status the server answers with.
    """

    def __init__(self, message: str, *, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code
