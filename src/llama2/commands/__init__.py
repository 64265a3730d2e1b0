"""The `llama2` command's subcommands, one module per group (`llama2.cli` assembles them).

- `options`: the options shared by the commands that load a model, and `build_llama`.
- `run`: chat, generate, bench, perplexity, serve.
- `models`: tokenize, info, pull, list, convert, quantize.
- `training`: train, plot.

`eval` and `align` register theirs from `llama2.eval.cli` and `llama2.align.cli`.
No module here imports torch at the top, so `llama2 --help` stays fast.
"""
