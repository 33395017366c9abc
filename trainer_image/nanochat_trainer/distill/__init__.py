"""Knowledge distillation from a teacher endpoint (issue 6).

    teacher = AsyncTeacher.from_config(cfg.distill.teacher, cache_dir="runs/x/teacher-cache")
    entries = teacher.run_batch([teacher.prompt_topk(text, k=20) for text in texts])
    ids, lps, mask = topk_tensors(entries[0], token_id_map(tok), k=20)
    loss = mixed_loss(ce, topk_kl_loss(logits, ids[None], lps[None], mask[None], 1.0), alpha=0.5)

In training (stage "distill") train.py picks the micro-batch source by `distill.method`:

- sequence (`sequence.SequenceFeed`, Kim & Rush 2016): the teacher completes prompts cut from
  the data, a quality filter (parses; passes the prompt's tests in the sandbox) keeps the good
  ones, and the student trains on them with the LM loss.
- topk_logprobs (`runner.TeacherPrefetcher`, Hinton et al. 2015 on the teacher's top-k): token-id
  prompts, id-keyed answers (return_tokens_as_token_ids), fetched ahead of the step; the teacher
  must share the student's tokenizer.
- cross_tokenizer (`align.CrossTokenizerPrefetcher`): text prompts; teacher and student tokens
  aligned by character offsets, teacher top-k texts mapped into the student's vocabulary
  (exact-match MinED, Wan et al. 2024), KL at the aligned positions.
"""

from .losses import mixed_loss, topk_kl_loss
from .runner import TeacherPrefetcher
from .teacher import AsyncTeacher, TeacherError, TeacherUnavailable, token_id_map, topk_tensors

__all__ = ["AsyncTeacher", "TeacherError", "TeacherPrefetcher", "TeacherUnavailable", "mixed_loss", "token_id_map",
           "topk_kl_loss", "topk_tensors"]
