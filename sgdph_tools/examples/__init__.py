"""Small, complete examples of using the optimizer from plain PyTorch."""
