"""Errors of the run store, each naming the gRPC status the admin API answers with (see server/admin/service.py)."""

from feddem.common.errors import FeddemError


class StoreError(FeddemError):
    """A request the store cannot serve; `status` is the name of a grpc.StatusCode."""

    status = "INVALID_ARGUMENT"


class NotFound(StoreError):
    status = "NOT_FOUND"


class InvalidArgument(StoreError):
    status = "INVALID_ARGUMENT"


class FailedPrecondition(StoreError):
    status = "FAILED_PRECONDITION"


class AlreadyExists(StoreError):
    status = "ALREADY_EXISTS"


class DataLoss(StoreError):
    """A stored file does not match its recorded size or sha256."""

    status = "DATA_LOSS"


class ResourceExhausted(StoreError):
    """The store has no room for it (disk space)."""

    status = "RESOURCE_EXHAUSTED"
