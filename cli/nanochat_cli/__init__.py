"""`nanochat`: the command line, assembled from the trainer and the operator.

main.py      the parser and the commands (train, params, tokenizer, run, eval, serve, crds)
local.py     `nanochat run`: a manifest's runs on this machine, read by the operator's own code
eval.py      `nanochat eval` and `nanochat serve`
progress.py  the progress bar of local training
"""
