"""Custom ops, their dispatch to implementations, and the fully-masked-row semantics."""
