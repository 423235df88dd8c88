"""OIALR (arXiv 2401.08505): U Σ Vᵀ layers (layers), the controller that converts, rotates and
cuts them (controller) and the basis-stability trigger (trigger)."""
