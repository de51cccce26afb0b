"""Generated protobuf and gRPC modules (make protos); the only cross-process message definitions."""
