"""abd_fast: fast backdoor attacks on CLIP and Adversarial Backdoor Defense (ABD)."""
__version__ = "0.1.0"
