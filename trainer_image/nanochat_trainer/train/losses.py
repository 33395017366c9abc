"""The training losses, all of them: language modelling and distillation.

lm_loss: next-token cross-entropy in float32, ignoring targets of -1.

model_loss: what every training step minimises: lm_loss, mixed with a distillation loss when there
is one, plus the model's auxiliary losses of the same forward (MoE load balancing and router
z-loss) outside the mix, so their configured weights hold at any distillation alpha.

full_kl_loss: KL(teacher || student) over the whole vocabulary, for a teacher whose logits are at
hand (the ternary stage's frozen full-precision parent): no top-k truncation, no rest bucket.

topk_kl_loss: KL(teacher || student) over the teacher's top-k tokens plus one "rest" bucket for
the remaining probability mass, so an API that returns only k logprobs still gives a proper KL
between two (k+1)-way distributions:

    teacher: p_j = exp(lp_j) (j < k),   p_rest = 1 - sum_j p_j   (clamped at 0)
    student: q_j = softmax(z)[id_j],    q_rest = 1 - sum_j q_j
    KL = sum_j p_j (log p_j - log q_j) + p_rest (log p_rest - log q_rest)

With temperature T != 1 both (k+1)-way distributions are softened the same way, as
softmax(log p / T) and softmax(log q / T) over the k+1 slots (the rest bucket one token on both
sides, since the teacher's rest members are unknown), and the loss is scaled by T^2 (Hinton et
al.), so its gradients keep their size across temperatures. The student must not be softened
over its whole vocabulary before its rest is summed: its rest bucket would then hold a different
event than the teacher's, and a student equal to the teacher would be pushed off it. The KL is
averaged over positions where mask is True.

A slot whose teacher logprob is -inf is empty: it is left out on both sides, so the teacher's
probability missing from the remaining slots is rest mass, and the student's rest is everything
but the remaining ids. The cross-tokenizer method uses this for teacher tokens that have no
equal in the student's vocabulary (their ids are then ignored).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.gpt import GPT


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: logits (B, T, V), targets (B, T) with -1 ignored."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)


def model_loss(
    model: GPT, logits: torch.Tensor, targets: torch.Tensor, kd: torch.Tensor | None = None, alpha: float = 0.0
) -> torch.Tensor:
    """lm_loss, mixed with the distillation loss `kd` by `alpha` when given (mixed_loss), plus the
    auxiliary losses `model` kept from the forward that made `logits`. Those stay out of the mix:
    scaled by 1 - alpha, pure distillation (alpha 1) would leave an MoE router unbalanced."""
    loss = lm_loss(logits, targets)
    if kd is not None:
        loss = mixed_loss(loss, kd, alpha)
    return loss + model.aux_loss()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends and finite at x = 0."""
    x = x.clamp(max=0.0)
    out = torch.where(
        x > -0.6931, torch.log((-torch.expm1(x)).clamp_min(1e-30)), torch.log1p(-torch.exp(x.clamp(max=-0.6931)))
    )
    return out


def topk_kl_loss(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """student_logits (B,T,V), teacher_topk_ids (B,T,k) long, teacher_topk_logprobs (B,T,k),
    mask (B,T) bool -> scalar mean KL(teacher || student) over masked positions (0 if none)."""
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    b, t, v = student_logits.shape
    if teacher_topk_ids.shape[:2] != (b, t) or teacher_topk_logprobs.shape != teacher_topk_ids.shape:
        raise ValueError(
            f"shapes: logits {tuple(student_logits.shape)}, ids {tuple(teacher_topk_ids.shape)}, "
            f"logprobs {tuple(teacher_topk_logprobs.shape)}"
        )
    if mask.shape != (b, t):
        raise ValueError(f"mask shape {tuple(mask.shape)} != {(b, t)}")
    k = teacher_topk_ids.shape[-1]
    mask = mask.bool()
    m3 = mask[..., None]
    # Masked positions may hold padding (-inf, junk ids): make them harmless so no NaN leaks into grads.
    slot = torch.isfinite(teacher_topk_logprobs) | ~m3  # -inf at a masked-in position: an empty slot
    ids = torch.where(m3 & slot, teacher_topk_ids, torch.zeros_like(teacher_topk_ids)).clamp(0, v - 1)
    t_lp = torch.where(
        m3,
        teacher_topk_logprobs.float().detach(),
        torch.full_like(teacher_topk_logprobs, -float(torch.log(torch.tensor(float(k)))), dtype=torch.float32),
    )
    t_lp = torch.where(slot, t_lp, torch.zeros_like(t_lp)).clamp(max=0.0)

    # Teacher (k+1)-way log distribution.
    t_rest = (1.0 - torch.where(slot, t_lp.exp(), torch.zeros_like(t_lp)).sum(-1, keepdim=True)).clamp_min(0.0)
    t_log = torch.cat([t_lp, torch.log(t_rest.clamp_min(1e-30))], dim=-1)
    t_zero = torch.cat([~slot, t_rest <= 0], dim=-1)
    t_log = t_log.masked_fill(t_zero, -float("inf"))

    # Student (k+1)-way log distribution, on the same ids, at T = 1 like the teacher's.
    s_logp = F.log_softmax(student_logits.float(), dim=-1)
    # Empty slots: a finite, negligible logprob (not -inf, whose logsumexp gradient is NaN).
    s_top = s_logp.gather(-1, ids).masked_fill(~slot, -1e4)
    s_rest = _log1mexp(torch.logsumexp(s_top, dim=-1, keepdim=True))
    s_log = torch.cat([s_top, s_rest], dim=-1)

    if temperature != 1.0:
        t_log = F.log_softmax(t_log / temperature, dim=-1)
        s_log = F.log_softmax(s_log / temperature, dim=-1)
    t_p = t_log.exp()

    terms = torch.where(t_p > 0, t_p * (t_log.masked_fill(t_zero, 0.0) - s_log), torch.zeros_like(t_p))
    kl = terms.sum(-1)
    kl = torch.where(mask, kl, torch.zeros_like(kl))
    return kl.sum() / mask.sum().clamp_min(1) * temperature**2


def full_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """KL(teacher || student) on the full vocabulary (same tokenizer, e.g. a ternary student and
    its full-precision parent): student_logits and teacher_logits (B,T,V), mask (B,T) bool or None
    -> scalar mean KL over masked positions (0 if none), times T^2 like topk_kl_loss.

    Both sides are softened by `temperature`; computed in float32; no gradient to the teacher.
    """
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"shapes: student {tuple(student_logits.shape)}, teacher {tuple(teacher_logits.shape)}")
    s_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t_logp = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    kl = F.kl_div(s_logp, t_logp, reduction="none", log_target=True).sum(-1)  # (B,T)
    if mask is None:
        return kl.mean() * temperature**2
    if mask.shape != kl.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != {tuple(kl.shape)}")
    mask = mask.bool()
    kl = torch.where(mask, kl, torch.zeros_like(kl))
    return kl.sum() / mask.sum().clamp_min(1) * temperature**2


def mixed_loss(ce: torch.Tensor, kd: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 - alpha) * ce + alpha * kd."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError("alpha must be in [0, 1]")
    return (1.0 - alpha) * ce + alpha * kd
