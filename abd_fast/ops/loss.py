"""ClipLoss: a drop-in for open_clip.loss.ClipLoss on the fused contrastive kernels."""
from __future__ import annotations

from typing import Optional

from torch import nn

from .contrastive import clip_loss, info_nce


class ClipLoss(nn.Module):
    """Same constructor and forward as open_clip's ClipLoss, same loss and gradients.

    With world_size > 1 the features are gathered as open_clip does (gather_with_grad,
    local_loss, horovod); local_loss uses info_nce against the gathered features with
    offset rank * N. cache_labels is accepted for compatibility: no labels are built.
    logit_bias shifts every logit of a row equally, which the softmax ignores, so the loss
    does not depend on it (as in open_clip).
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False,
                 cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 use_horovod: bool = False, backend: Optional[str] = None):
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.backend = backend

    def forward(self, image_features, text_features, logit_scale, logit_bias=None,
                output_dict: bool = False):
        if self.world_size > 1:
            from open_clip.loss import gather_features
            all_image, all_text = gather_features(
                image_features, text_features, local_loss=self.local_loss,
                gather_with_grad=self.gather_with_grad, rank=self.rank,
                world_size=self.world_size, use_horovod=self.use_horovod)
            if self.local_loss:
                offset = self.rank * image_features.shape[0]
                loss = (info_nce(image_features, all_text, logit_scale, offset, backend=self.backend)
                        + info_nce(text_features, all_image, logit_scale, offset,
                                   backend=self.backend)) / 2
            else:
                loss = clip_loss(all_image, all_text, logit_scale, backend=self.backend)
        else:
            loss = clip_loss(image_features, text_features, logit_scale, backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss


def patch_open_clip():
    """Makes open_clip build abd_fast's ClipLoss wherever it builds its own (open_clip.ClipLoss,
    open_clip.loss.ClipLoss and the one open_clip's create_loss returns), so an open_clip
    training script runs on the fused kernels unchanged. Call it before the loss is created."""
    import open_clip
    import open_clip.factory
    import open_clip.loss
    for module in (open_clip, open_clip.factory, open_clip.loss):
        module.ClipLoss = ClipLoss
