"""The tlscache demo HTTPS farm: backends, balancer, orchestrator."""
