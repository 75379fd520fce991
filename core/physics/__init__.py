"""Map physics in torch: bilinear lookup, the physics likelihood, refinement, analytic test maps."""
