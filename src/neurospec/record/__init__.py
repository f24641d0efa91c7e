"""Recording: streaming accumulators, the recorder that feeds them through hooks, and the run store."""
