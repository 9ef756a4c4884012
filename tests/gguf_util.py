"""Pieces shared by the tests that write GGUF files with the `gguf` package (test_gguf.py and the
hostile recipes): a tokenizer.json's vocabulary as GGUF lists, a llama-style header, finishing."""

import json


def tokenizer_lists(folder) -> tuple[dict, list, list]:
    """(token -> id, tokens by id, merges as "a b") of a folder's byte-level BPE tokenizer.json."""
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = {**tok["model"]["vocab"], **{a["content"]: a["id"] for a in tok["added_tokens"]}}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    return vocab, tokens, merges


def add_shape(w, config: dict, heads: int, kv: int) -> None:
    """The hyperparameters every family's converter writes, from an HF-style config."""
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config["rope_theta"])


def finish(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
