"""Pure operator policies: token-aware autoscaling and stage colocation. No clients, no clocks."""
