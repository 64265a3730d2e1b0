"""The training loop: exact resume, schedule, optimizer groups, SFT masking end to end, export."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llama2.train.checkpoint import completed_checkpoints, latest_checkpoint
from llama2.train.config import TrainConfig
from llama2.train.model_setup import build_optimizer, cosine_with_warmup
from llama2.train.trainer import Trainer
from llama2.weights import read_meta

from helpers import expect_error
from train_helpers import losses, one_thread, tiny_config, write_chat_corpus  # noqa: F401 (one_thread: autouse fixture)


class Crash(Exception):
    """Stands for the process dying."""


def crash_at(step: int):
    def callback(current: int, record: dict) -> None:
        if current == step:
            raise Crash(step)

    return callback


def trained_parameters(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "overrides",
    [{}, {"lora_rank": 4, "lora_dropout": 0.2}],
    ids=["full", "lora-with-dropout"],
)
def test_crash_and_rerun_gives_the_uninterrupted_loss_curve(tmp_path, overrides):
    uninterrupted = Trainer(tiny_config(tmp_path, "uninterrupted", **overrides))
    uninterrupted.train()
    config = tiny_config(tmp_path, "crashed", **overrides)
    with pytest.raises(Crash):
        Trainer(config, callbacks=[crash_at(5)]).train()
    assert latest_checkpoint(tmp_path / "crashed").name == "step_00000003"
    assert max(losses(tmp_path / "crashed")) == 5  # steps 4 and 5 were logged, then lost

    resumed = Trainer(config)
    assert resumed.state["step"] == 3 and max(losses(tmp_path / "crashed")) == 3
    resumed.train()

    expected = losses(tmp_path / "uninterrupted")
    assert sorted(expected) == list(range(1, 9))
    assert losses(tmp_path / "crashed") == pytest.approx(expected, rel=1e-6, abs=0)
    final, reference = trained_parameters(resumed), trained_parameters(uninterrupted)
    assert final.keys() == reference.keys()
    for name, tensor in final.items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-6, atol=0, msg=name)
    assert [p.name for p in completed_checkpoints(tmp_path / "crashed")] == ["step_00000006", "step_00000008"]


def test_schedule_follows_the_paper():
    # Linear warmup over 2000 steps, then cosine down to 10% of the peak.
    ratio = lambda step: cosine_with_warmup(step, 2000, 10000, 0.1)  # noqa: E731
    assert ratio(0) == pytest.approx(1 / 2000) and ratio(1999) == 1.0
    assert ratio(2000) == 1.0
    assert ratio(6000) == pytest.approx(0.55)
    assert ratio(10000) == pytest.approx(0.1) and ratio(12000) == pytest.approx(0.1)


def test_paper_defaults():
    pretrain = TrainConfig(mode="pretrain", output_dir="x", data=["d"]).resolved()
    assert (pretrain.lr, pretrain.warmup_steps, pretrain.batch_size) == (3e-4, 100, 1024)
    assert (pretrain.betas, pretrain.eps, pretrain.weight_decay, pretrain.grad_clip) == ((0.9, 0.95), 1e-5, 0.1, 1.0)
    assert TrainConfig(mode="pretrain", output_dir="x", data=["d"], max_steps=500_000).resolved().warmup_steps == 2000
    sft = TrainConfig(mode="sft", output_dir="x", data=["d"]).resolved()
    assert (sft.lr, sft.batch_size, sft.min_lr_ratio, sft.model) == (2e-5, 64, 0.1, "smollm2-135m-instruct")
    assert TrainConfig(mode="sft", output_dir="x", data=["d"], lora_rank=8).resolved().lr == 2e-4


def test_weight_decay_applies_to_matrices_only():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    optimizer = build_optimizer(model, TrainConfig(lr=1e-3))
    decayed, plain = optimizer.param_groups
    assert [p.shape for p in decayed["params"]] == [(4, 3)] and decayed["weight_decay"] == 0.1
    assert all(p.ndim == 1 for p in plain["params"]) and plain["weight_decay"] == 0.0
    assert optimizer.defaults["betas"] == (0.9, 0.95) and optimizer.defaults["eps"] == 1e-5


def test_sft_trains_on_answers_only_and_exports_a_loadable_model(tmp_path):
    chat = write_chat_corpus(tmp_path / "chat.jsonl")
    config = tiny_config(
        tmp_path,
        "sft",
        mode="sft",
        data=[str(chat)],
        val_data=[str(chat)],
        chat_format="llama-2",
        lora_rank=4,
        max_steps=3,
        export="meta",
        eval_every=3,
    )
    trainer = Trainer(config)
    batch = trainer._batch(range(4))
    targets = trainer.loaded.tokenizer.decode([t for t in batch.labels.flatten().tolist() if t >= 0])
    assert "Answer:" in targets and "What is" not in targets and "[INST]" not in targets
    result = trainer.train()
    assert math.isfinite(result["val_loss"]) and result["step"] == 3
    exported = read_meta(tmp_path / "sft" / "final")
    merged = {name: p.detach() for name, p in trainer.model.state_dict().items() if "lora" not in name}
    wq = merged["layers.0.attention.wq.base.weight"]
    lora = trainer.model.layers[0].attention.wq
    torch.testing.assert_close(exported.state_dict["layers.0.attention.wq.weight"], lora.merged_weight())
    assert not torch.equal(exported.state_dict["layers.0.attention.wq.weight"], wq)  # the adapters moved it
    adapter_config = json.loads((tmp_path / "sft" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["rank"] == 4 and adapter_config["base_model"] == "tiny"


def test_activation_checkpointing_is_exact_and_bf16_autocast_is_close(tmp_path):
    def first_losses(name, **overrides):
        Trainer(tiny_config(tmp_path, name, max_steps=2, save_every=100, **overrides)).train()
        return losses(tmp_path / name)

    reference = first_losses("fp32")
    assert first_losses("checkpointed", activation_checkpointing=True) == pytest.approx(reference, rel=1e-6)
    assert first_losses("bf16", bf16=True) == pytest.approx(reference, rel=2e-2)


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_export_through_the_weights_writers(tmp_path, fmt):
    trainer = Trainer(tiny_config(tmp_path, fmt, max_steps=1, export=fmt))
    trainer.train()
    tokens = torch.randint(32000, (1, 9), generator=torch.Generator().manual_seed(0))
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(tokens)
    if fmt == "hf":  # transformers itself reads the exported folder
        import transformers

        reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / fmt / "final", dtype=torch.float32)
        with torch.no_grad():
            got = reference(input_ids=tokens).logits
    else:
        from llama2.weights import read_gguf

        from helpers import our_model

        with torch.no_grad():
            got = our_model(read_gguf(tmp_path / fmt / "final.gguf"))(tokens)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_resuming_into_a_different_model_is_a_one_line_error(tmp_path):
    Trainer(tiny_config(tmp_path, "run", max_steps=3)).train()
    expect_error(
        lambda: Trainer(tiny_config(tmp_path, "run", max_steps=6, lora_rank=4)), "cannot resume", "step_00000003"
    )
