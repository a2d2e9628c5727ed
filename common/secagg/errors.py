"""Errors raised by secure aggregation; each message names the stage, client or value that is wrong."""

from __future__ import annotations

from feddem.common.errors import FeddemError


class SecAggError(FeddemError):
    """A secure-aggregation round cannot go on: bad input, a call out of order, or an inconsistent peer."""


class ThresholdError(SecAggError):
    """Fewer participants (or shares) than the Shamir threshold t remain at some stage of a round."""

    def __init__(self, stage: str, got: int, need: int, what: str = "clients") -> None:
        self.stage = stage
        self.got = got
        self.need = need
        super().__init__(
            f"secure aggregation stage '{stage}': only {got} {what} available, "
            f"the threshold needs {need}; the round is aborted"
        )


class TamperError(SecAggError):
    """Data failed an integrity check: an encrypted share, a revealed share, or the zero check block."""

    def __init__(self, message: str, sender: int | None = None) -> None:
        self.sender = sender
        super().__init__(message)


class RefusalError(SecAggError):
    """A client refuses a request that would reveal its peer's input (both share kinds for one peer)."""
