"""What every stage service shares: config, gRPC server setup, the error table."""
