"""Training data: where documents come from and how they become token batches.

from nanochat_trainer.data.sources import iter_documents   # text documents of a DataConfig
from nanochat_trainer.data.synthetic import generate        # seeded synthetic Python snippets
from nanochat_trainer.data.loader import TokenLoader        # packed (x, y) batches, resumable
from nanochat_trainer.data.feed import LoaderFeed           # the trainer's batch source
"""
