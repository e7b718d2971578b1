"""Silence import-time deprecation noise from Lightning before it is imported."""

import warnings

warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
