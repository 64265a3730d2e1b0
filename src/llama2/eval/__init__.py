"""Evaluation that counts the way other tools count, and says which way it counted.

- `llama2.eval.windows`: how a token stream is cut into scored windows (llama.cpp's
  chunks, Hugging Face's strided loop, lm-evaluation-harness's rolling windows).
- `llama2.eval.scoring`: forwarding windows through a `Llama`, per-token statistics.
- `llama2.eval.perplexity`: perplexity of texts in each of those modes.
- `llama2.eval.kld`: llama.cpp's KL-divergence statistics of a model against a reference.
- `llama2.eval.cli`: the `llama2 eval` commands.

The package imports nothing heavy here, so the command line parser stays fast.
"""
