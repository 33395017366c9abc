"""Knowledge distillation from a teacher endpoint: the three feeds of stage distill.

Each feed is a `data.feed.BatchSource` the trainer draws its micro-batches from
(`train.startup.build_feed` picks one by `distill.method`):

- sequence (`sequence.SequenceFeed`, Kim & Rush 2016): the teacher completes prompts cut from
  the data, a quality filter (parses; passes the prompt's tests in the sandbox) keeps the good
  ones, and the student trains on them with the LM loss.
- topk_logprobs (`topk.TopkFeed`, Hinton et al. 2015 on the teacher's top-k): token-id prompts,
  id-keyed answers (return_tokens_as_token_ids), fetched ahead of the step; the teacher must
  share the student's tokenizer.
- cross_tokenizer (`align.CrossTokenizerFeed`): text prompts; teacher and student tokens aligned
  by character offsets, teacher top-k texts mapped into the student's vocabulary (exact-match
  MinED, Wan et al. 2024), KL at the aligned positions.

`teacher.AsyncTeacher` is the OpenAI-compatible client they share (concurrency, retries; its
connection pool is `transport.py`), `cache.AnswerCache` its on-disk answer cache; the KL losses
are in `train/losses.py`.
"""
