"""Pure policies: no torch, grpc or kubernetes; time is always an argument."""
