"""Backdoor defenses: ABD's universal adversarial perturbation (generator, discriminator,
AdvCLIP's loss and ABD's backdoor loss) and the fine-tuning objectives of FT, CleanCLIP,
RoCLIP and ABD."""
