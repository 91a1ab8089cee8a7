"""Backdoor scans without the trigger or the target: is a CLIP backdoored and toward which
class (model.py: a per-class search for universal perturbations, calibrated on clean models),
and which training pairs are poisoned (data.py: local density in embedding space)."""
