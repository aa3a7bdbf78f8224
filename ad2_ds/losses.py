"""Pure distillation losses: tensors in, a scalar tensor out.

    from ad2_ds.losses import kd_loss
    loss = kd_loss(logits_s, logits_t, temperature=2.0)

Every function computes in fp32 whatever the input dtype (bf16/fp16 logits and cached fp16 teacher outputs are common),
so the loss and its gradient do not lose the small differences distillation is about.
"""

import torch
import torch.nn.functional as F

_TINY = 1e-12


def hard_loss(logits_s: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Loss on hard labels. logits_s: [B, C]; labels: [B] (long). C == 1 means regression: squared error to labels."""
    if logits_s.shape[-1] == 1:
        return F.mse_loss(logits_s.float().squeeze(-1), labels.float())
    return F.cross_entropy(logits_s.float(), labels.long())


def kd_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(logits_t / t) || softmax(logits_s / t)) averaged over the batch, times t**2.

    logits_s, logits_t: [B, C]. The t**2 factor keeps gradient magnitudes comparable across temperatures (Hinton et
    al.). C == 1 means regression: squared error to the teacher's prediction (no temperature).
    """
    if logits_s.shape != logits_t.shape:
        raise ValueError(f"student logits {tuple(logits_s.shape)} and teacher logits {tuple(logits_t.shape)} differ")
    if logits_s.shape[-1] == 1:
        return F.mse_loss(logits_s.float(), logits_t.float())
    log_p_s = F.log_softmax(logits_s.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(logits_t.float() / temperature, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


def hidden_mse(hidden_s: torch.Tensor, hidden_t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the non-padding tokens. hidden_s, hidden_t: [B, T, H]; mask: [B, T] (1 = token)."""
    m = mask.to(torch.float32).unsqueeze(-1)
    sq = (hidden_s.float() - hidden_t.float()).pow(2) * m
    return sq.sum() / (m.sum() * hidden_s.shape[-1]).clamp_min(1.0)


def _row_mask(mask: torch.Tensor, heads: int) -> torch.Tensor:
    # [B, T] -> [B, heads, T] float: which query rows count
    return mask.to(torch.float32).unsqueeze(1).expand(-1, heads, -1)


def attention_kl(attn_s: torch.Tensor, attn_t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(attn_t || attn_s) per query row, averaged over heads and non-padding query rows.

    attn_s, attn_t: [B, heads, T, T] attention probabilities (rows sum to 1); mask: [B, T]. Padded keys carry ~0
    probability in both maps and so add ~0; padded query rows are excluded.
    """
    p_t = attn_t.float()
    kl = torch.special.xlogy(p_t, p_t) - p_t * attn_s.float().clamp_min(_TINY).log()
    rows = _row_mask(mask, attn_s.shape[1])
    return (kl.sum(-1) * rows).sum() / rows.sum().clamp_min(1.0)


def attention_mse(attn_s: torch.Tensor, attn_t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error between attention maps over non-padding (query, key) pairs. Shapes as attention_kl."""
    m = mask.to(torch.float32)
    pair = (m.unsqueeze(-1) * m.unsqueeze(-2)).unsqueeze(1)  # [B, 1, T, T]
    sq = (attn_s.float() - attn_t.float()).pow(2) * pair
    return sq.sum() / (pair.sum() * attn_s.shape[1]).clamp_min(1.0)


def patient_loss(cls_s: torch.Tensor, cls_t: torch.Tensor) -> torch.Tensor:
    """BERT-PKD's patient loss for one layer pair: squared distance of L2-normalised [CLS] states, batch mean.

    cls_s: [B, H_s], cls_t: [B, H_t] with H_s == H_t (project first when widths differ).
    """
    d = F.normalize(cls_s.float(), dim=-1) - F.normalize(cls_t.float(), dim=-1)
    return d.pow(2).sum(-1).mean()


LOSSES = {
    "mse": hidden_mse,
    "kl": attention_kl,
    "attention_mse": attention_mse,
    "pkd": patient_loss,
}
