"""llama2: Meta Llama 2 on PyTorch."""
