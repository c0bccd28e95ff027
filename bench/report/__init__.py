"""Reports: read only the results store; aggregate with pandas; write tables."""
