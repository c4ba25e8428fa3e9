"""gRPC message-size limits shared by every server and channel of the project. Kept apart from
wire.py (tensors, torch) so that the client package needs only grpcio and protobuf."""

# No message on any stream may exceed 1 MiB (wire.py chunks tensors to fit).
MAX_MESSAGE_BYTES = 1 << 20
MESSAGE_SIZE_OPTIONS = (("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES))
