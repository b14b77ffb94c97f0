"""Studies that are not part of the product (run from the repository root; results live in docs/)."""
