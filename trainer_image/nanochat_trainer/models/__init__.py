"""The models: layers, mixture of experts, the hybrid's mixers, the GPT, ternary layers, weight formats.

    layers.py        norms, rotary embeddings, attention, SwiGLU, the KV cache
    moe.py           routed experts with a pluggable token dispatch, the MoE block, expert loads
    hybrid.py        Qwen3-Next's Gated DeltaNet and gated attention
    gpt.py           the decoder (dense, MoE or hybrid), its initialisation, parameter counts
    ternary.py       BitNet b1.58 layers swapped in for chosen linears (quantization-aware training)
    ternary_pack.py  1.6-bit packed ternary weights and packed inference
    hf_adapter.py    Hugging Face Qwen3 / Qwen3-MoE / Qwen3-Next weights in and out

Nothing here knows about processes, devices other than the tensors', or training: the parallel
package shards and wraps these modules from outside, the train package computes the losses.
"""
