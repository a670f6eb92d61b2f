"""The Open Inference Protocol over gRPC: ``grpc_predict_v2.proto``, its generated stubs, and the server
(:mod:`service.grpc.server`) that ``sdb serve`` runs beside HTTP when ``SDB_GRPC_PORT`` is set.

Importing this package imports no gRPC: only :mod:`service.grpc.server` does, and it needs the
``grpc`` extra.
"""
