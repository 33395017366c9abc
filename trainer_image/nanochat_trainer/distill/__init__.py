"""Knowledge distillation from a teacher endpoint (issue 6).

    teacher = AsyncTeacher.from_config(cfg.distill.teacher, cache_dir="runs/x/teacher-cache")
    entries = teacher.run_batch([teacher.prompt_topk(text, k=20) for text in texts])
    ids, lps, mask = topk_tensors(entries[0], token_id_map(tok), k=20)
    loss = mixed_loss(ce, topk_kl_loss(logits, ids[None], lps[None], mask[None], 1.0), alpha=0.5)

In training (stage "distill", method topk_logprobs) train.py uses `runner.TeacherPrefetcher`:
token-id prompts, id-keyed answers (return_tokens_as_token_ids), fetched ahead of the step.
"""

from .losses import mixed_loss, topk_kl_loss
from .runner import TeacherPrefetcher
from .teacher import AsyncTeacher, TeacherError, token_id_map, topk_tensors

__all__ = ["AsyncTeacher", "TeacherError", "TeacherPrefetcher", "mixed_loss", "token_id_map", "topk_kl_loss",
           "topk_tensors"]
