"""Our training loss and gradients equal transformers' Llama on the same random weights and batch."""

from __future__ import annotations

import pytest
import torch

from llama2.model import Transformer
from llama2.train.packing import Batch
from llama2.train.trainer import causal_lm_loss
from llama2.weights import read_hf
from llama2.weights.hf import canonical_name, to_meta_layout

from helpers import make_hf_llama, random_tokens
from train_helpers import one_thread  # noqa: F401 (autouse fixture)

RTOL = 1e-5


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference over the reference tensor's largest magnitude."""
    return float((got - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("gqa, tie", [(False, False), (True, True)])
def test_loss_and_every_gradient_match_transformers(tmp_path, gqa, tie):
    hf_model = make_hf_llama(tmp_path, gqa=gqa, tie=tie, seed=3).train()
    checkpoint = read_hf(tmp_path)
    ours = Transformer(checkpoint.args)
    ours.load_state_dict(checkpoint.state_dict, strict=True)
    ours.train()

    tokens = random_tokens(checkpoint.args.vocab_size, batch=3, length=17, seed=5)
    labels = tokens.clone()
    labels[0, :6] = -100  # e.g. a prompt without loss
    labels[2, 11:] = -100  # e.g. padding
    # transformers shifts the labels inside; we feed inputs and next-token targets.
    reference = hf_model(input_ids=tokens, labels=labels).loss
    reference.backward()
    batch = Batch(tokens[:, :-1], labels[:, 1:], None, None, tokens[:, :-1].numel())
    loss = causal_lm_loss(ours, batch) / batch.num_targets
    loss.backward()

    assert abs(loss.item() - reference.item()) <= RTOL * abs(reference.item())
    compared = 0
    for hf_name, param in hf_model.named_parameters():
        name = canonical_name(hf_name, tmp_path)
        expected = to_meta_layout(name, param.grad, checkpoint.args)  # q/k rows as we store them
        got = ours.get_parameter(name).grad
        assert relative_error(got, expected) <= RTOL, name
        compared += 1
    assert compared == len(list(ours.parameters()))
