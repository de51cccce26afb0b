"""The five stage services (thin gRPC shells over engine and policies) and what they share."""
