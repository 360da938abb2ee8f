"""vaultkern.hf.DPTrainer: Hugging Face fine-tuning with DP-SGD (tiny models from configs,
nothing downloaded)."""
import math
import os
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
import dp_accounting  # noqa: E402

import vaultkern as vk  # noqa: E402
from hf_zoo import make  # noqa: E402
from vaultkern.hf import DPTrainer, per_example_lm_loss  # noqa: E402
from vaultkern.privacy.sampling import PoissonBatchSampler, split_microbatches  # noqa: E402

N = 30


def dataset(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 10, (n,), generator=g)
    return [{"input_ids": torch.randint(3, 61, (int(L),), generator=g).tolist()} for L in lengths]


def collate(items):
    """Right padding, pads labelled -100 (what DataCollatorForLanguageModeling produces)."""
    T = max(len(x["input_ids"]) for x in items)
    ids = torch.zeros(len(items), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, x in enumerate(items):
        ids[i, :len(x["input_ids"])] = torch.tensor(x["input_ids"])
        mask[i, :len(x["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def targs(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=3, gradient_accumulation_steps=2,
                max_steps=4, learning_rate=0.05, logging_steps=2, save_strategy="no",
                report_to=[], use_cpu=True, disable_tqdm=True)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def lora(model):
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                      lora_dropout=0.0))


def quiet(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


def eps_dp_accounting(q, sigma, steps, delta):
    acc = dp_accounting.pld.PLDAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("name,adapters", [("llama", False), ("llama", True), ("vaultgemma", False)])
def test_epsilon_is_accounted_and_within_target(name, adapters, tmp_path):
    model = make(name, dtype=torch.float32)
    model = lora(model) if adapters else model
    trainer = DPTrainer(model=model, args=targs(tmp_path), train_dataset=dataset(),
                        data_collator=collate, target_epsilon=8.0, target_delta=1e-3)
    quiet(trainer.train)
    q = 6 / N
    assert trainer.dp.sample_rate == q and trainer.dp.accountant.total_steps == 4
    want = eps_dp_accounting(q, trainer.noise_multiplier, 4, 1e-3)
    assert abs(trainer.get_epsilon() - want) / want < 0.01
    assert trainer.get_epsilon() <= 8.0
    logged = [h["epsilon"] for h in trainer.state.log_history if "epsilon" in h]
    assert logged and logged[-1] == pytest.approx(trainer.get_epsilon(), rel=1e-6)
    if adapters:
        frozen = [p for n, p in trainer.model.named_parameters() if not p.requires_grad]
        assert frozen and all(p.grad is None for p in frozen)


def test_three_steps_equal_the_same_steps_by_hand(tmp_path):
    """σ = 0, a fixed dp_seed, SGD: the Trainer's weights are vk.patch + DPOptimizer's."""
    data = dataset()

    def sgd(model):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model = make("llama", dtype=torch.float64)
    trainer = DPTrainer(model=model, args=targs(tmp_path, max_steps=3), train_dataset=data,
                        data_collator=collate, noise_multiplier=0.0, target_delta=1e-3,
                        max_grad_norm=0.5, dp_seed=7, optimizers=sgd(model))
    quiet(trainer.train)

    ref = make("llama", dtype=torch.float64)
    vk.patch(ref, max_grad_norm=0.5, loss_reduction="sum", allow_empty_batch=True)
    opt = vk.DPOptimizer(sgd(ref)[0], noise_multiplier=0.0, max_grad_norm=0.5,
                         expected_batch_size=6, loss_reduction="mean", seed=7)
    sampler = PoissonBatchSampler(N, 6 / N, 3, seed=7)  # the trainer's: dp_seed=7
    for indices in sampler:
        for chunk in split_microbatches(indices, 3):
            per_example_lm_loss(ref, collate([data[i] for i in chunk])).sum().backward()
        opt.step()
        opt.zero_grad()
    for (n, p), (_, r) in zip(model.named_parameters(), ref.named_parameters()):
        assert rel(p, r) <= 1e-6, n


def rel(a, b):
    return float((a.detach() - b.detach()).norm() / b.detach().norm().clamp(min=1e-12))


def test_resume_gives_the_same_epsilon_and_weights(tmp_path):
    def run(out, resume=None, max_steps=4):
        model = make("llama", dtype=torch.float64)
        t = DPTrainer(model=model, args=targs(out, save_strategy="steps", save_steps=2,
                                              max_steps=max_steps),
                      train_dataset=dataset(), data_collator=collate, noise_multiplier=1.0,
                      target_delta=1e-3, dp_seed=3)
        quiet(lambda: t.train(resume_from_checkpoint=resume))
        return t
    whole = run(tmp_path / "whole")
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "whole" / "checkpoint-2"))
    assert resumed.dp.accountant.total_steps == 4
    assert resumed.get_epsilon() == pytest.approx(whole.get_epsilon(), rel=1e-12)
    for (n, p), (_, q) in zip(whole.model.named_parameters(), resumed.model.named_parameters()):
        assert rel(q, p) <= 1e-9, n


def test_saved_model_reloads_with_its_card(tmp_path):
    model = lora(make("llama", dtype=torch.float32))
    trainer = DPTrainer(model=model, args=targs(tmp_path, max_steps=2), train_dataset=dataset(),
                        data_collator=collate, target_epsilon=4.0, target_delta=1e-3)
    quiet(trainer.train)
    out = tmp_path / "final"
    quiet(lambda: trainer.save_model(str(out)))
    import json
    card = json.load(open(out / "model_card.json"))
    assert card["privacy"]["epsilon"] == pytest.approx(trainer.get_epsilon())
    assert card["privacy"]["steps"] == 2 and card["privacy"]["formal_guarantee"] is True
    assert "ε" in open(out / "MODEL_CARD.md").read()
    peft = pytest.importorskip("peft")
    reloaded = peft.PeftModel.from_pretrained(make("llama", dtype=torch.float32), str(out))
    for n, p in reloaded.named_parameters():
        if "lora_" in n:
            assert torch.equal(p, dict(trainer.model.named_parameters())[n].detach())


def test_budget_stops_training_and_replaced_sampler_is_refused(tmp_path):
    trainer = DPTrainer(model=make("llama", dtype=torch.float32), args=targs(tmp_path, max_steps=50),
                        train_dataset=dataset(), data_collator=collate, noise_multiplier=0.8,
                        target_epsilon=3.0, target_delta=1e-3)
    assert 0 < trainer.dp_budget_steps < 50
    quiet(trainer.train)
    assert trainer.state.global_step == trainer.dp_budget_steps
    assert trainer.get_epsilon() <= 3.0

    class Shuffled(DPTrainer):
        def _get_train_sampler(self, *a):
            return torch.utils.data.RandomSampler(self.train_dataset)
    bad = Shuffled(model=make("llama", dtype=torch.float32), args=targs(tmp_path / "b"),
                   train_dataset=dataset(), data_collator=collate, target_epsilon=3.0,
                   target_delta=1e-3)
    with pytest.raises(RuntimeError, match="Poisson"):
        quiet(bad.train)
    with pytest.raises(ValueError, match="1/N"):
        DPTrainer(model=make("llama"), args=targs(tmp_path / "c"), train_dataset=dataset(),
                  data_collator=collate, target_epsilon=3.0, target_delta=0.1)


def test_bf16_and_gradient_checkpointing_run(tmp_path):
    trainer = DPTrainer(model=make("llama", dtype=torch.float32),
                        args=targs(tmp_path, max_steps=2, bf16=True, gradient_checkpointing=True),
                        train_dataset=dataset(), data_collator=collate, target_epsilon=8.0,
                        target_delta=1e-3)
    quiet(trainer.train)
    assert trainer.dp.accountant.total_steps == 2
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert not math.isnan(trainer.get_epsilon())
    assert os.path.isdir(tmp_path)


def test_fp16_loss_scaling_is_refused(tmp_path):
    """fp16's GradScaler scales every example's gradient before it is clipped."""
    with pytest.raises(ValueError, match="fp16=True is not supported.*bf16=True"):
        DPTrainer(model=make("llama", dtype=torch.float32), args=targs(tmp_path, fp16=True),
                  train_dataset=dataset(), data_collator=collate, target_epsilon=8.0,
                  target_delta=1e-3)


def test_user_level_steps_equal_the_same_steps_by_hand(tmp_path):
    """user_ids + max_rows_per_user: ULS over users (q = B̄/U), each user's summed gradient
    clipped as one; σ = 0 and a fixed seed give the weights of the same steps by hand
    (UserPoissonSampler + vk.set_group_ids + DPOptimizer ÷ B̄ users), and ε is dp-accounting's
    for the user-level event."""
    from vaultkern.privacy.user_sampling import UserPoissonSampler, group_microbatches
    data = dataset()
    users = [i % 9 for i in range(N)]  # 9 users of 3-4 examples each

    def sgd(model):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model = make("llama", dtype=torch.float64)
    trainer = DPTrainer(model=model, args=targs(tmp_path, max_steps=3, per_device_train_batch_size=4,
                                                gradient_accumulation_steps=1),
                        train_dataset=data, data_collator=collate, noise_multiplier=0.0,
                        target_delta=1e-3, max_grad_norm=0.5, dp_seed=7, optimizers=sgd(model),
                        user_ids=users, max_rows_per_user=2)
    quiet(trainer.train)
    assert trainer.dp.sample_rate == pytest.approx(4 / 9) and trainer.dp.dataset_size == 9

    ref = make("llama", dtype=torch.float64)
    vk.patch(ref, max_grad_norm=0.5, loss_reduction="sum", allow_empty_batch=True)
    opt = vk.DPOptimizer(sgd(ref)[0], noise_multiplier=0.0, max_grad_norm=0.5,
                         expected_batch_size=4, loss_reduction="mean", seed=7)
    sampler = UserPoissonSampler(users, 4 / 9, 3, max_rows_per_user=2, seed=7)
    grouped = 0
    for indices in sampler:
        groups = sampler.group_ids(indices)
        grouped += len(groups) - len(set(groups.tolist()))  # rows sharing a user's clip
        for a, b in group_microbatches(groups, 4):
            vk.set_group_ids(ref, groups[a:b])
            per_example_lm_loss(ref, collate([data[i] for i in indices[a:b]])).sum().backward()
        opt.step()
        opt.zero_grad()
    assert grouped > 0
    for (n, p), (_, r) in zip(model.named_parameters(), ref.named_parameters()):
        assert rel(p, r) <= 1e-6, n
    from vaultkern.hf.card import trainer_card
    card = trainer_card(trainer)
    assert card["privacy"]["privacy_unit"].startswith("one user")
    assert card["privacy"]["neighbouring_datasets"].startswith("add or remove one user")


def test_user_level_epsilon_is_the_user_level_event(tmp_path):
    users = [f"patient-{i // 3}" for i in range(N)]  # 10 users
    trainer = DPTrainer(model=make("llama", dtype=torch.float32),
                        args=targs(tmp_path, per_device_train_batch_size=3),
                        train_dataset=dataset(), data_collator=collate, noise_multiplier=1.2,
                        target_delta=1e-3, user_ids=users, max_rows_per_user=3)
    quiet(trainer.train)
    q = 6 / 10
    assert trainer.dp.sample_rate == pytest.approx(q)
    want = eps_dp_accounting(q, 1.2, 4, 1e-3)
    assert abs(trainer.get_epsilon() - want) / want < 0.01
    with pytest.raises(ValueError, match="both user_ids"):
        DPTrainer(model=make("llama"), args=targs(tmp_path), train_dataset=dataset(),
                  data_collator=collate, noise_multiplier=1.0, target_delta=1e-3, user_ids=users)
    with pytest.raises(ValueError, match="exceeds per_device_train_batch_size"):
        DPTrainer(model=make("llama"), args=targs(tmp_path), train_dataset=dataset(),
                  data_collator=collate, noise_multiplier=1.0, target_delta=1e-3, user_ids=users,
                  max_rows_per_user=5)


def test_logs_hold_no_gradient_norm_of_the_unnoised_sum(tmp_path):
    """transformers logs ‖p.grad‖ before optimizer.step(); under DP that is the clipped sum
    before the noise (no privacy): DPTrainer's logs have epsilon and no grad_norm."""
    trainer = DPTrainer(model=make("llama", dtype=torch.float32), args=targs(tmp_path),
                        train_dataset=dataset(), data_collator=collate, noise_multiplier=1.0,
                        target_delta=1e-3)
    quiet(trainer.train)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all("epsilon" in h and h.get("grad_norm") is None for h in logs)


def _labelled(kind, n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(3, 61, (6,), generator=g).tolist()
        label = (int(torch.randint(0, 3, (1,), generator=g)) if kind == "classes"
                 else torch.randint(3, 61, (4,), generator=g).tolist())
        rows.append({"input_ids": ids, "labels": label})
    return rows


def _collate_labelled(items):
    ids = torch.tensor([x["input_ids"] for x in items])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": torch.tensor([x["labels"] for x in items])}


@pytest.mark.parametrize("kind", ["classes", "seq2seq"])
def test_classifier_and_seq2seq_models_train(kind, tmp_path):
    """A sequence classifier and an encoder-decoder (T5, sdpa, its default dropout) train
    with their own per-example losses (the causal-LM loss crashed on both before)."""
    if kind == "classes":
        cfg = transformers.BertConfig(vocab_size=61, hidden_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=24, num_labels=3)
        model = transformers.BertForSequenceClassification(cfg)
    else:
        cfg = transformers.T5Config(vocab_size=61, d_model=16, d_kv=4, d_ff=24, num_layers=1,
                                    num_heads=2, decoder_start_token_id=0, pad_token_id=0,
                                    relative_attention_num_buckets=8)
        model = transformers.T5ForConditionalGeneration(cfg)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = DPTrainer(model=model, args=targs(tmp_path, max_steps=2), train_dataset=_labelled(kind),
                        data_collator=_collate_labelled, noise_multiplier=1.0, target_delta=1e-5)
    quiet(trainer.train)
    assert trainer.get_epsilon() > 0
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
