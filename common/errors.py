"""The error users see: a FeddemError carries a message that names what is wrong, shown without a traceback."""


class FeddemError(Exception):
    """A problem with the user's input or configuration, or a failed run, explained in words."""
