"""Generated gRPC stubs of protos/blockpilot/v1 (`make protos`; do not edit the *_pb2* files)."""
