"""stageserve Kubernetes operator (kopf): thin handlers over pure reconcile, policy and render functions."""
