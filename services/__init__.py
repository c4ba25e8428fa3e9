"""The three gRPC services; each folder holds only its server (shared code is in blockpilot/)."""
