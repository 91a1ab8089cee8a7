"""Backdoor attacks: the six triggers (triggers.py), poisoning as a view over a caption
dataset (poison.py) and BadCLIP's trigger optimization (badclip.py)."""
from .poison import PoisonView, names_target, training_pairs
from .triggers import ATTACKS, Trigger, load_patch, make_trigger, save_patch

__all__ = ["ATTACKS", "PoisonView", "Trigger", "load_patch", "make_trigger", "names_target",
           "save_patch", "training_pairs"]
