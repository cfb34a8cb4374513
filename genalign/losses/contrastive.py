"""CLIP's contrastive objective (InfoNCE; Radford et al., "Learning Transferable Visual Models From Natural
Language Supervision", arXiv 2103.00020), in the form the world's CLIP pretraining uses.

A batch holds N images and M distinct captions; image i is a picture of caption `image_caption[i]`. With unit
features and `s = exp(logit_scale)`, the logits are `L = s * I @ T^T` (N x M) and the loss is the mean of the two
directions:

    image -> text:  -log softmax_j(L[i, :])[image_caption[i]]                      (mean over the N images)
    text -> image:  -sum_i q[j, i] log softmax_i(L[:, j])[i],  q[j] uniform over the positives of caption j
                                                                                    (mean over captions with one)

With one image per caption and `image_caption = arange(N)` this is CLIP's symmetric cross-entropy exactly.
Captions are distinct, so two images of the same caption are never each other's negatives (the multi-positive
form). `text_positive` (M x N, bool) narrows the text -> image positives: an image of caption j that is not a
positive of j (e.g. a degraded copy) is a negative of j in that direction only, so the caption learns to prefer
the clean picture while the picture still matches its caption better than the other captions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    image_caption: torch.Tensor | None = None,
    text_positive: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Symmetric InfoNCE over N images and M captions (module docstring).

    image_features (N, E), text_features (M, E): unit-norm features. logit_scale: the log of the temperature's
    inverse (CLIP's `logit_scale`; exp is taken here). image_caption (N,): each image's caption index (default:
    arange, N == M). text_positive (M, N) bool: the text -> image positives (default: image_caption[i] == j).
    Returns (loss, stats) with stats `i2t` / `t2i` (each direction's loss) and `i2t_accuracy` / `t2i_accuracy`
    (share of images whose own caption scores highest; of captions whose best image is a positive).
    """
    n, m = image_features.shape[0], text_features.shape[0]
    device = image_features.device
    if image_caption is None:
        if n != m:
            raise ValueError(f"{n} images and {m} captions: give image_caption (each image's caption index)")
        image_caption = torch.arange(n, device=device)
    image_caption = image_caption.to(device=device, dtype=torch.long)
    own = image_caption[None, :] == torch.arange(m, device=device)[:, None]  # (M, N): image i shows caption j
    positive = own if text_positive is None else text_positive.to(device=device, dtype=torch.bool)
    if positive.shape != (m, n):
        raise ValueError(f"text_positive must be ({m}, {n}), got {tuple(positive.shape)}")

    scale = torch.as_tensor(logit_scale, dtype=torch.float32, device=device).exp()
    logits = scale * image_features.float() @ text_features.float().T  # (N, M)

    i2t = F.cross_entropy(logits, image_caption)
    has_positive = positive.any(dim=1)
    if not bool(has_positive.any()):
        raise ValueError("no caption has a text -> image positive")
    log_p = torch.log_softmax(logits.T[has_positive], dim=-1)  # (M', N) over images, per caption
    q = positive[has_positive].float()
    q = q / q.sum(dim=1, keepdim=True)
    t2i = -(q * log_p).sum(dim=1).mean()
    loss = 0.5 * (i2t + t2i)

    with torch.no_grad():
        i2t_acc = (logits.argmax(dim=1) == image_caption).float().mean()
        best = logits.T[has_positive].argmax(dim=1)
        t2i_acc = positive[has_positive].gather(1, best[:, None]).float().mean()
    return loss, {"i2t": i2t.detach(), "t2i": t2i.detach(), "i2t_accuracy": i2t_acc, "t2i_accuracy": t2i_acc}
