"""InRank (arXiv 2306.11250): layers whose cumulative update is a low-rank product of growing
rank (layers) and the controller that grows it (controller)."""
