"""Authentication of admin API calls: every call carries `authorization: Bearer <token>` in its metadata. A call
without it is refused with UNAUTHENTICATED, one with another token with PERMISSION_DENIED, before any handler runs.
(With a client CA the TLS layer itself refuses clients without a certificate it signed.)"""

import hmac

import grpc

HEADER = "authorization"
SCHEME = "bearer "


def _refusal(code: grpc.StatusCode, message: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as `handler` that only refuses the call."""

    def refuse(_request, context):
        context.abort(code, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


class TokenAuth(grpc.ServerInterceptor):
    def __init__(self, token: str):
        if not token:
            raise ValueError("an empty token would let anybody in")
        self._token = token.encode()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED
            return None
        values = [v for k, v in handler_call_details.invocation_metadata or () if k == HEADER]
        if not values:
            return _refusal(grpc.StatusCode.UNAUTHENTICATED,
                            "no credentials: send 'authorization: Bearer <token>' (feddem-admin --token or "
                            "FEDDEM_ADMIN_TOKEN)", handler)
        value = values[0] if isinstance(values[0], str) else values[0].decode("latin-1")
        given = value[len(SCHEME):].strip() if value.lower().startswith(SCHEME) else ""
        if len(values) != 1 or not hmac.compare_digest(given.encode("utf-8", "replace"), self._token):
            return _refusal(grpc.StatusCode.PERMISSION_DENIED, "the token is not valid for this server", handler)
        return handler
