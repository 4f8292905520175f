"""Server reflection that also resolves method (and field) symbols.

grpcurl users run `grpcurl describe netferry.v1.HostSwitch.Expose` (or
`grpc.health.v1.Health.Check`): its reflection request asks for the file containing the
symbol `Service.Method`. Python protobuf's descriptor pool resolves messages, enums and
services by name, but not methods (nor fields), so grpcio-reflection answers NOT_FOUND
("Symbol not found"). `MethodResolvingPool` answers such a symbol with the file of its
service (or message); every netferry server (hostd, wsl-proxy, network-setup) enables
reflection through `enable_server_reflection` here.
"""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection

SERVICE_NAME = reflection.SERVICE_NAME


class MethodResolvingPool:
    """A descriptor pool whose FindFileContainingSymbol also knows `Service.Method` and
    `Message.field`; everything else is the wrapped pool's."""

    def __init__(self, pool: descriptor_pool.DescriptorPool | None = None) -> None:
        self._pool = pool or descriptor_pool.Default()

    def __getattr__(self, name: str) -> object:
        return getattr(self._pool, name)

    def FindFileContainingSymbol(self, symbol: str):  # type: ignore[no-untyped-def]
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            parent, _, member = symbol.rpartition(".")
            if not parent:
                raise
        try:
            service = self._pool.FindServiceByName(parent)
        except KeyError:
            service = None
        if service is not None and member in service.methods_by_name:
            return service.file
        try:
            message = self._pool.FindMessageTypeByName(parent)
        except KeyError:
            raise KeyError(symbol) from None
        if member in message.fields_by_name:
            return message.file
        raise KeyError(symbol)


def enable_server_reflection(service_names: Iterable[str], server: object) -> None:
    reflection.enable_server_reflection(tuple(service_names), server, pool=MethodResolvingPool())
