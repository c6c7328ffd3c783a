"""The linear probe (a scikit-learn estimator) and its exact solver."""
